"""Shared adapter for video models that diffusers implements (its classes, configs and folders).

The diffusers model is held as the pipeline component it is (``unet`` or
``transformer``) inside a thin module with f3export's call signature
``noise_pred = net(sample [B,C,F,H,W], timestep [B], encoder_hidden_states [B,T,D])``;
its temporal attention modules are selected by glob patterns over module
names (``structure.AttentionPatterns``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from ..errors import CheckpointError
from ..weights import read_json
from .base import LatentVideoDiffusionAdapter
from .loading import MODEL_SUFFIXES, PipelineFolder, component_files
from .pipeline_parts import PipelineParts
from .structure import AttentionPatterns
from .configs import CONFIG_ERRORS, build_diffusers_model


class DiffusersVideoNet(nn.Module):
    """f3export's call signature around a diffusers video model."""

    def __init__(self, component: str, model: nn.Module, text_per_frame: bool):
        super().__init__()
        self.component = component
        self.text_per_frame = text_per_frame
        self.add_module(component, model)

    @property
    def inner(self) -> nn.Module:
        return getattr(self, self.component)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        timestep = timestep.reshape(-1).expand(sample.shape[0])
        if self.text_per_frame:  # e.g. UNetMotionModel takes one text embedding per frame
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
        return self.inner(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def diffusers_class(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(f"{name!r} is not a diffusers model class")
    return cls


class DiffusersFolder(PipelineFolder):
    """A diffusers model class, loaded from a pipeline folder (``<folder>/<component>/``) or a component folder,
    held as that ``component`` inside ``DiffusersVideoNet``."""

    def __init__(self, class_name: str, component: str = "unet", text_per_frame: bool = False,
                 presets: dict[str, dict[str, Any]] | None = None, net: type[DiffusersVideoNet] = DiffusersVideoNet,
                 parts: PipelineParts = PipelineParts()):
        self.class_name, self.component, self.text_per_frame = class_name, component, text_per_frame
        self.presets = presets or {}
        self.net = net
        self.parts, self.owner = parts, class_name

    def wrap(self, model: nn.Module) -> DiffusersVideoNet:
        return self.net(self.component, model, self.text_per_frame).eval()

    def build(self, config, source: str = "config"):
        cls = diffusers_class(self.class_name)
        return self.wrap(build_diffusers_model(cls, {k: v for k, v in config.items() if not k.startswith("_")},
                                               source))

    def recorded_config(self, model, config):
        """The constructor's whole config (its defaults filled in), as diffusers saves it."""
        return {k: v for k, v in dict(model.inner.config).items() if not k.startswith("_")}

    def _component_dir(self, folder: Path) -> Path:
        """A pipeline folder (``<folder>/<component>/config.json``) or the component folder itself."""
        for candidate in (folder / self.component, folder):
            if (candidate / "config.json").is_file():
                return candidate
        raise CheckpointError(f"{folder}: no {self.component}/config.json or config.json")

    def weights_files(self, folder):
        return component_files(self._component_dir(folder), MODEL_SUFFIXES)

    def folder_config(self, folder):
        path = self._component_dir(folder) / "config.json"
        config = read_json(path)
        with torch.device("meta"):  # what the constructor refuses, refused now, naming the file
            self.build(config, str(path))
        return config

    def save_network(self, model, config, folder):
        model.inner.save_pretrained(folder / self.component, safe_serialization=True)

    def load_folder(self, folder):
        component = self._component_dir(folder)
        cls = diffusers_class(self.class_name)
        try:
            # A class that keeps modules in float32 (WanTransformer3DModel) loads only through accelerate's
            # low-memory path; the others as before, their weights read into modules built in full.
            model = cls.from_pretrained(component, local_files_only=True,
                                        low_cpu_mem_usage=cls._keep_in_fp32_modules is not None)
        except (OSError, *CONFIG_ERRORS) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{component}: cannot load {self.class_name} ({reason})") from None
        net = self.wrap(model)
        return self.bundle(folder, net, self.recorded_config(net, {}))


class DiffusersVideoAdapter(LatentVideoDiffusionAdapter):
    """A family = a diffusers class in a folder (``checkpoint``) + the patterns naming its temporal attention
    modules (``structure``)."""

    checkpoint: DiffusersFolder
    structure: AttentionPatterns

    def text_width(self, model):
        return model.inner.config.cross_attention_dim

    def latent_channels(self, model):
        return model.inner.config.in_channels

    def shape_error(self, model, shape):
        # Motion modules (AnimateDiff's UNetMotionModel, or a recipe-described class with them) add
        # sinusoidal frame positions from a table of motion_max_seq_length rows.
        limit = model.inner.config.get("motion_max_seq_length")
        if limit is not None and shape.frames > limit:
            return f"frames = {shape.frames}, but the motion modules' positions cover at most " \
                   f"motion_max_seq_length = {limit} frames"
        return None
