"""Shared adapter for video models that diffusers implements (its classes, configs and folders).

The diffusers model is held as the pipeline component it is (``unet`` or
``transformer``) inside a thin module with f3export's call signature
``noise_pred = net(sample [B,C,F,H,W], timestep [B], encoder_hidden_states [B,T,D])``;
temporal attention modules are selected by glob patterns over module names,
and each attention ``...attnN`` is paired with its block's ``...normN``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import CheckpointError
from ..weights import read_json
from .base import (MODEL_SUFFIXES, LatentVideoDiffusionAdapter, ModelBundle, TemporalSite, component_files,
                   load_clip_text_encoder, read_scheduler_config)
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


class DiffusersVideoAdapter(LatentVideoDiffusionAdapter):
    """A family = a diffusers class + the patterns naming its temporal attention modules."""

    class_name: ClassVar[str]
    component: ClassVar[str] = "unet"
    temporal_patterns: ClassVar[tuple[str, ...]]
    text_per_frame: ClassVar[bool] = False

    def wrap(self, model: nn.Module) -> DiffusersVideoNet:
        return DiffusersVideoNet(self.component, model, self.text_per_frame).eval()

    def build(self, config, source: str = "config"):
        cls = diffusers_class(self.class_name)
        return self.wrap(build_diffusers_model(cls, {k: v for k, v in config.items() if not k.startswith("_")},
                                               source))

    def config_dict(self, model: DiffusersVideoNet) -> dict[str, Any]:
        return {k: v for k, v in dict(model.inner.config).items() if not k.startswith("_")}

    def load_preset(self, name, seed):
        bundle = super().load_preset(name, seed)
        bundle.config = self.config_dict(bundle.model)
        return bundle

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

    def load_folder(self, folder):
        component = self._component_dir(folder)
        cls = diffusers_class(self.class_name)
        try:
            model = cls.from_pretrained(component, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, *CONFIG_ERRORS) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{component}: cannot load {self.class_name} ({reason})") from None
        net = self.wrap(model)
        return ModelBundle(self.family, net, self.config_dict(net), f"checkpoint {folder}", random_weights=False,
                           encode_text=load_clip_text_encoder(folder),
                           scheduler_config=read_scheduler_config(folder))

    def temporal_sites(self, model):
        prefix = model.component + "."
        modules = dict(model.inner.named_modules())
        sites = []
        for name, module in modules.items():
            if isinstance(module, Attention) and any(fnmatch.fnmatchcase(name, p) for p in self.temporal_patterns):
                parent, _, leaf = name.rpartition(".")
                norm = f"{parent}.norm{leaf.removeprefix('attn')}" if leaf.startswith("attn") else None
                sites.append(TemporalSite(prefix + name, prefix + norm if norm in modules else None))
        return sites

    def text_width(self, model):
        return model.inner.config.cross_attention_dim

    def shape_error(self, model, shape):
        # Motion modules (AnimateDiff's UNetMotionModel, or a recipe-described class with them) add
        # sinusoidal frame positions from a table of motion_max_seq_length rows.
        limit = model.inner.config.get("motion_max_seq_length")
        if limit is not None and shape.frames > limit:
            return f"frames = {shape.frames}, but the motion modules' positions cover at most " \
                   f"motion_max_seq_length = {limit} frames"
        return None
