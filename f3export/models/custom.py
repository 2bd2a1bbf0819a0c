"""Any diffusers video model, described in the recipe alone.

``[model] family = "diffusers"`` with ``class_name`` (a diffusers model class)
and ``temporal_modules`` (glob patterns over module names selecting its
temporal ``Attention`` modules) prunes a model f3export has no adapter for yet.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention

from .base import unmatched_pattern
from .diffusers_video import DiffusersVideoAdapter


class CustomDiffusersAdapter(DiffusersVideoAdapter):
    family = "diffusers"
    presets = {}

    def __init__(self, class_name: str, temporal_modules: list[str], text_per_frame: bool = False):
        self.class_name = class_name
        self.temporal_patterns = tuple(temporal_modules)
        self.text_per_frame = text_per_frame

    def options_error(self, model):
        names = [name for name, module in model.inner.named_modules() if isinstance(module, Attention)]
        return unmatched_pattern("[model].temporal_modules", list(self.temporal_patterns), names, "Attention module")

    def options(self):
        return {"class_name": self.class_name, "temporal_modules": list(self.temporal_patterns),
                "text_per_frame": self.text_per_frame}
