"""Tune-A-Video: ``network`` (the inflated UNet), ``checkpoint`` (diffusers folders, presets), ``adapter``."""

from .adapter import TuneAVideoAdapter
from .checkpoint import TINY

__all__ = ["TINY", "TuneAVideoAdapter"]
