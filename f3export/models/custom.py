"""Any diffusers video model, described in the recipe alone.

``[model] family = "diffusers"`` with ``class_name`` (a diffusers model class)
and ``temporal_modules`` (glob patterns over module names selecting its
temporal ``Attention`` modules) prunes a model f3export has no adapter for yet.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention

from ..errors import CheckpointError, RecipeError
from ..recipe import family_key
from .base import unmatched_pattern
from .diffusers_video import DiffusersVideoAdapter, diffusers_class


class CustomDiffusersAdapter(DiffusersVideoAdapter):
    family = "diffusers"
    presets = {}
    option_keys = (
        family_key("model", "class_name", str | None, None),  # diffusers model class, e.g. 'UNet3DConditionModel'
        family_key("model", "temporal_modules", list[str], []),  # glob patterns naming its temporal Attention modules
        family_key("model", "text_per_frame", bool, False),  # the model takes one text embedding per frame
    )

    @classmethod
    def check_options(cls, options, where):
        if options["class_name"] is None or not options["temporal_modules"]:
            raise RecipeError(f"{where}: family 'diffusers' needs 'class_name' and 'temporal_modules'")
        try:
            diffusers_class(options["class_name"])
        except CheckpointError:
            raise RecipeError(f"{where}.class_name = {options['class_name']!r} is not a diffusers model "
                              "class") from None

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
