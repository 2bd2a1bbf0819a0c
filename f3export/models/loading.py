"""Loading: how a family's network is built from a config and read from its on-disk format.

A ``CheckpointFormat`` owns the family's presets (configs built with seeded weights), its checkpoint folders
and the exact files each stage reads from them, so that the build cache keys on those files and nothing else.
``PipelineFolder`` is the shared part of the diffusion families' folders (diffusers layout: ``scheduler/``,
``tokenizer/``, ``text_encoder/`` beside the network's own folder).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CheckpointError, RecipeError
from ..weights import read_json
from . import memory


@dataclass
class ModelBundle:
    """A loaded model and what is needed to drive it."""

    model: nn.Module
    config: dict[str, Any]
    description: str
    random_weights: bool
    encode_text: Callable[[list[str]], torch.Tensor] | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    vae: VideoAutoencoder | None = None  # the folder's: latents <-> RGB frames


class CheckpointFormat(ABC):
    """A family's loading: presets by name, and its checkpoint folders."""

    presets: dict[str, dict[str, Any]] = {}

    @abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """The network of a config, with freshly initialised weights."""

    @abstractmethod
    def folder_config(self, folder: Path) -> dict[str, Any]:
        """The network config of a checkpoint folder, read (and checked) without its weights."""

    @abstractmethod
    def load_folder(self, folder: Path) -> ModelBundle:
        """A model from a local checkpoint folder in the family's on-disk format."""

    @abstractmethod
    def weights_files(self, folder: Path) -> list[Path]:
        """The network's files in a checkpoint folder (config and weights): every stage that loads it reads them."""

    def sampling_files(self, folder: Path) -> list[Path]:
        """The other files of a checkpoint folder that runs read (scheduler, tokenizer, text encoder).

        They change calibration and validation but not the network, so only those stages key on them.
        """
        return []

    def conventions_files(self, folder: Path) -> list[Path]:
        """The files the engine contract's conventions are read from besides the network's (export keys on them)."""
        return []

    def skeleton(self, preset: str | None, path: str | None) -> nn.Module:
        """The network of a preset or a folder on the meta device: its sizes and limits, no weights allocated."""
        config = self.presets[preset] if preset is not None else self.folder_config(Path(path))
        with torch.device("meta"):
            return self.build(config)

    def fitting_skeleton(self, preset: str | None, path: str | None) -> nn.Module:
        """``skeleton``, refused (one line, nothing allocated) when its weights alone exceed the memory available."""
        skeleton = self.skeleton(preset, path)
        needed, available = memory.weight_bytes(skeleton), memory.available_memory_bytes()
        if available is not None and needed > available:
            subject, error = (f"[model].preset = {preset!r}: its weights", RecipeError) if preset is not None else \
                (f"{path}: the weights its config describes", CheckpointError)
            raise error(f"{subject} alone need {memory.size_text(needed)}, more than the "
                        f"{memory.size_text(available)} of memory available on this machine")
        return skeleton

    def load_preset(self, name: str, seed: int) -> ModelBundle:
        self.fitting_skeleton(name, None)  # what the weights will take, before allocating them
        torch.manual_seed(seed)
        model = self.build(self.presets[name]).eval()
        with torch.no_grad():
            # Norms initialise to ones/zeros; perturb them as training would, so that no two tensors are
            # identical (the ONNX exporter merges identical initializers, which would blur parameter counts).
            for module in model.modules():
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                    module.weight.add_(0.1 * torch.randn_like(module.weight))
                    module.bias.add_(0.1 * torch.randn_like(module.bias))
        return ModelBundle(model, self.recorded_config(model, self.presets[name]),
                           f"preset '{name}' (seeded random weights, seed {seed})", random_weights=True)

    def recorded_config(self, model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
        """The config recorded for a model built from ``config`` (a format may complete it with its defaults)."""
        return config


class PipelineFolder(CheckpointFormat):
    """A diffusers-layout pipeline folder: the network's own folder, plus the scheduler, the CLIP text
    encoder and the VAE that runs read (the contract records the scheduler)."""

    def bundle(self, folder: Path, model: nn.Module, config: dict[str, Any]) -> ModelBundle:
        return ModelBundle(model, config, f"checkpoint {folder}", random_weights=False,
                           encode_text=load_clip_text_encoder(folder), scheduler_config=read_scheduler_config(folder),
                           vae=load_vae(folder))

    def sampling_files(self, folder):
        return scheduler_files(folder) + clip_text_encoder_files(folder) + \
            component_files(folder / VAE, MODEL_SUFFIXES)

    def conventions_files(self, folder):
        return scheduler_files(folder)

    @abstractmethod
    def save_network(self, model: nn.Module, config: dict[str, Any], folder: Path) -> None:
        """Write the network's own folder of a pipeline folder, as ``load_folder`` reads it (a model trained
        here, saved in the family's real format)."""


MODEL_SUFFIXES = (".json", ".safetensors", ".bin")  # configs and weights of a from_pretrained folder
TOKENIZER_SUFFIXES = (".json", ".txt")  # tokenizer configs and vocabularies (vocab.json, merges.txt, ...)


def component_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of a pipeline component folder with these suffixes, sorted; none if there is no folder.

    Which of them a loader opens varies with the library version (tokenizer.json or vocab.json, safetensors
    or bin), so all count; READMEs and the like do not.
    """
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)


def clip_text_encoder_files(folder: Path) -> list[Path]:
    """What ``load_clip_text_encoder`` reads: nothing without ``text_encoder/``, else the tokenizer and the encoder."""
    if not (folder / "text_encoder").is_dir():
        return []
    return component_files(folder / "tokenizer", TOKENIZER_SUFFIXES) + \
        component_files(folder / "text_encoder", MODEL_SUFFIXES)


@dataclass(frozen=True)
class ClipTextEncoder:
    """A folder's CLIP tokenizer and text encoder: called on prompts, their embeddings."""

    folder: Path  # the tokenizer's folder
    tokenizer: Any
    encoder: nn.Module
    tokens: int  # every prompt padded (or truncated) to this many tokens

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokens, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder(self.token_ids(prompts))[0]


def load_clip_text_encoder(folder: Path) -> ClipTextEncoder | None:
    """CLIP text encoder + tokenizer from ``text_encoder/`` and ``tokenizer/``, if the folder has them. Prompts
    are padded to the tokenizer's ``model_max_length``, as diffusers' pipelines do (77 for SD's CLIP), at most
    the encoder's position table (a tokenizer that sets no length reads as 10^30)."""
    if not (folder / "text_encoder").is_dir():
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load the CLIP text encoder ({str(exc).splitlines()[0]})") from None
    return ClipTextEncoder(folder / "tokenizer", tokenizer, encoder,
                           min(tokenizer.model_max_length, encoder.config.max_position_embeddings))


VAE = "vae"


@dataclass(frozen=True)
class VideoAutoencoder:
    """A folder's ``vae/`` (diffusers ``AutoencoderKL``) applied to videos frame by frame, latents scaled by its
    ``scaling_factor`` as the pipelines do."""

    vae: nn.Module

    @property
    def scale(self) -> int:
        """Pixels per latent position along height and width (diffusers pipelines' ``vae_scale_factor``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F, h, w] -> RGB frames [B, 3, F, H, W] in [-1, 1]."""
        return _videos(self.decode_frames(_frames(latents)), latents)

    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents of single frames [N, C, h, w] -> RGB images [N, 3, H, W] in [-1, 1] (what a runtime's VAE
        decoder engine computes)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """RGB frames [B, 3, F, H, W] in [-1, 1] -> latents [B, C, F, h, w]: the mode of the latent
        distribution (Tune-A-Video draws a sample; the mode makes a source's inversion reproducible)."""
        return _videos(self.vae.encode(_frames(video)).latent_dist.mode() * self.vae.config.scaling_factor, video)


def _frames(videos: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B * F, C, H, W]."""
    return videos.permute(0, 2, 1, 3, 4).flatten(0, 1)


def _videos(frames: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B * F, C, H, W] -> [B, C, F, H, W] with ``like``'s batch and frames."""
    return frames.unflatten(0, like.shape[:1] + like.shape[2:3]).permute(0, 2, 1, 3, 4)


def load_vae(folder: Path) -> VideoAutoencoder | None:
    """The folder's ``vae/``, if it has one."""
    if not (folder / VAE).is_dir():
        return None
    from diffusers import AutoencoderKL

    try:
        return VideoAutoencoder(AutoencoderKL.from_pretrained(folder / VAE, local_files_only=True).eval())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / VAE}: cannot load the VAE ({str(exc).splitlines()[0]})") from None


SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def scheduler_files(folder: Path) -> list[Path]:
    """What ``read_scheduler_config`` reads."""
    path = folder / SCHEDULER_CONFIG
    return [path] if path.is_file() else []


def read_scheduler_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / SCHEDULER_CONFIG) if scheduler_files(folder) else {}
