"""Shared adapter for video transformers with joint 3D attention (CogVideoX, Wan), through diffusers' classes.

The network is held as diffusers' ``transformer`` inside ``JointVideoNet``, which keeps f3export's call
signature ``noise_pred = net(sample [B, C, F, H, W], timestep [B], encoder_hidden_states [B, T, D])``, gives
every joint self-attention the frame-aware processor and tells it, on every call, how many tokens a frame has.
A family says how to call its transformer (``run``), its attention's ``JointStyle`` and its sampler.
"""

from __future__ import annotations

import fnmatch
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import PipelineCall
from .diffusers_video import DiffusersVideoAdapter, DiffusersVideoNet
from .joint_attention import FrameLayout, JointStyle, install_processors
from .protocols import DiffusionProtocol
from .structure import JointAttentionPatterns


@dataclass
class LayoutFromInput:
    """A forward pre-hook of the diffusers model: the tokens per frame of the latents it is called with."""

    layout: FrameLayout
    patch: int

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.layout.tokens_per_frame = (latents.shape[3] // self.patch) * (latents.shape[4] // self.patch)


class JointVideoNet(DiffusersVideoNet):
    style: ClassVar[JointStyle]
    self_attention: ClassVar[str]  # glob of the joint self-attention modules, inside the diffusers model

    def __init__(self, component: str, model: nn.Module, text_per_frame: bool):
        super().__init__(component, model, text_per_frame)
        self.layout = FrameLayout()
        names = [f"{component}.{name}" for name, _ in model.named_modules()
                 if fnmatch.fnmatchcase(name, self.self_attention)]
        install_processors(self, names, self.style, self.layout)
        # Whoever calls the diffusers model (this net, or a diffusers pipeline it was put into), its attentions
        # learn the frame layout from the call's latents: [B, F, C, H, W] or [B, C, F, H, W], H and W last.
        model.register_forward_pre_hook(LayoutFromInput(self.layout, self.spatial_patch), with_kwargs=True)

    @property
    def spatial_patch(self) -> int:
        return self.inner.config.patch_size[-1]

    @property
    def temporal_patch(self) -> int:
        """Latent frames per token frame (the unit frame-local heads attend within)."""
        return self.inner.config.patch_size[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.run(sample, timestep.reshape(-1).expand(sample.shape[0]), encoder_hidden_states)

    @abstractmethod
    def run(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The diffusers transformer on f3export's inputs, its noise prediction as [B, C, F, H, W]."""


class JointVideoAdapter(DiffusersVideoAdapter):
    """A video transformer whose self-attention is joint over frames: temporal value per head, frame-local or
    removed heads (``structure.actions``)."""

    structure: JointAttentionPatterns
    protocol = DiffusionProtocol(inversion=False)
    pipeline_call = PipelineCall(sample="hidden_states")
    calibration_note = ("statistics over the video tokens' queries (text tokens belong to no frame); "
                        "'mixing' is each head's cross-frame attention mass")

    def shape_error(self, model, shape):
        temporal, spatial = model.temporal_patch, model.spatial_patch
        if shape.latent_height % spatial or shape.latent_width % spatial:
            return f"latent size {shape.latent_height}x{shape.latent_width} is not a multiple of patch size {spatial}"
        if shape.frames % temporal:
            return f"frames = {shape.frames} is not a multiple of the temporal patch size {temporal}"
        return None
