"""Model families. Each registers one adapter; the core looks families up here and nowhere else."""

from __future__ import annotations

from typing import Any

from .animatediff import AnimateDiffAdapter
from .base import ModelAdapter
from .cogvideo_stage1 import CogVideoAdapter
from .cogvideox import CogVideoXAdapter
from .custom import CustomDiffusersAdapter
from .latte import LatteAdapter
from .modelscope import ModelScopeAdapter
from .tune_a_video import TuneAVideoAdapter
from .wan import WanAdapter

FAMILIES: dict[str, type[ModelAdapter]] = {
    cls.family: cls
    for cls in (TuneAVideoAdapter, ModelScopeAdapter, AnimateDiffAdapter, LatteAdapter, CogVideoAdapter,
                CustomDiffusersAdapter, CogVideoXAdapter, WanAdapter)
}


def get_adapter(family: str, options: dict[str, Any] | None = None) -> ModelAdapter:
    """The adapter of a family; ``options`` configure families described by the recipe alone."""
    return FAMILIES[family](**(options or {}))
