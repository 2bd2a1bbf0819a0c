"""Tune-A-Video: ``network`` (the inflated UNet), ``checkpoint`` (diffusers folders), ``adapter``."""

from .adapter import TINY, TuneAVideoAdapter

__all__ = ["TINY", "TuneAVideoAdapter"]
