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
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, RecipeError
from ..weights import read_json
from . import memory
from .pipeline_parts import (MODEL_INDEX, SCHEDULER, TEXT_ENCODER, TOKENIZER, VAE, PipelineParts, PromptEncoder,
                             VideoAutoencoder, named_class)


@dataclass
class ModelBundle:
    """A loaded model and what is needed to drive it."""

    model: nn.Module
    config: dict[str, Any]
    description: str
    random_weights: bool
    encode_text: PromptEncoder | None = None  # the folder's text encoder (else a stand-in embeds prompts)
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
    """A diffusers-layout pipeline folder: the network's own folder, plus the scheduler, text encoder and VAE that
    runs read, each by the class the folder names and the family accepts (``parts``)."""

    parts: PipelineParts = PipelineParts()
    owner: str = "this"  # the family's network, named in refusals

    def bundle(self, folder: Path, model: nn.Module, config: dict[str, Any]) -> ModelBundle:
        scheduler = read_scheduler_config(folder)
        named = named_class(folder, SCHEDULER)  # model_index.json's, which diffusers loads by
        if named is not None:
            scheduler = {**scheduler, "_class_name": named}
        self.parts.scheduler_class(scheduler, str(folder / SCHEDULER_CONFIG), self.owner)  # refused before any run
        random = random_weights(folder)
        return ModelBundle(model, config, f"checkpoint {folder}" + (" (random-initialised weights, as its "
                           f"model_index.json says)" if random else ""), random_weights=random,
                           encode_text=self.parts.text_encoder(folder, self.owner), scheduler_config=scheduler,
                           vae=self.parts.vae(folder, self.owner))

    def sampling_files(self, folder):
        return scheduler_files(folder) + text_encoder_files(folder) + \
            component_files(folder / VAE, MODEL_SUFFIXES) + index_files(folder)

    def conventions_files(self, folder):
        """The contract records the scheduler, and the text encoder's class and token length (not its weights)."""
        configs = [f for f in text_encoder_files(folder) if f.suffix not in (".safetensors", ".bin")]
        return scheduler_files(folder) + configs + index_files(folder)

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


def text_encoder_files(folder: Path) -> list[Path]:
    """What the text encoder reads: nothing without ``text_encoder/``, else the tokenizer and the encoder."""
    if not (folder / TEXT_ENCODER).is_dir():
        return []
    return component_files(folder / TOKENIZER, TOKENIZER_SUFFIXES) + \
        component_files(folder / TEXT_ENCODER, MODEL_SUFFIXES)


RANDOM_WEIGHTS = "_random_weights"  # a model_index.json key: the folder's weights were never trained


def random_weights(folder: Path) -> bool:
    """Whether the folder says its weights are random-initialised (a test or demo folder written here)."""
    path = folder / MODEL_INDEX
    return path.is_file() and read_json(path).get(RANDOM_WEIGHTS) is True


def index_files(folder: Path) -> list[Path]:
    """``model_index.json``, which names each part's class."""
    path = folder / MODEL_INDEX
    return [path] if path.is_file() else []


SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def scheduler_files(folder: Path) -> list[Path]:
    """What ``read_scheduler_config`` reads."""
    path = folder / SCHEDULER_CONFIG
    return [path] if path.is_file() else []


def read_scheduler_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / SCHEDULER_CONFIG) if scheduler_files(folder) else {}
