"""Any diffusers video model, described in the recipe alone.

``[model] family = "diffusers"`` with ``class_name`` (a diffusers model class)
and ``temporal_modules`` (glob patterns over module names selecting its
temporal ``Attention`` modules) prunes a model f3export has no adapter for yet.
"""

from __future__ import annotations

from ..errors import CheckpointError, RecipeError
from ..recipe import family_key
from .diffusers_video import DiffusersFolder, DiffusersVideoAdapter, diffusers_class
from .structure import AttentionPatterns


class CustomDiffusersAdapter(DiffusersVideoAdapter):
    family = "diffusers"
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
        component = "unet"
        self.checkpoint = DiffusersFolder(class_name, component, text_per_frame)
        self.structure = AttentionPatterns(tuple(temporal_modules), component)

    def options_error(self, model):
        return self.structure.unmatched(model, "[model].temporal_modules")

    def options(self):
        return {"class_name": self.checkpoint.class_name, "temporal_modules": list(self.structure.patterns),
                "text_per_frame": self.checkpoint.text_per_frame}
