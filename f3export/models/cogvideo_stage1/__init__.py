"""CogVideo stage 1: ``network`` (the transformer), ``checkpoint`` (SwissArmyTransformer folders), ``adapter``."""

from .adapter import CogVideoAdapter

__all__ = ["CogVideoAdapter"]
