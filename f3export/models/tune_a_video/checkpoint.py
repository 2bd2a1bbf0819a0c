"""Tune-A-Video checkpoints: diffusers folders, ``unet/config.json`` and
``unet/diffusion_pytorch_model.{safetensors,bin}``, optionally ``text_encoder/``,
``tokenizer/`` and ``scheduler/`` (read by the shared diffusion code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...weights import find_weights, load_into, load_state_dict, read_json
from .network import TuneAVideoConfig, TuneAVideoUNet

UNET = "unet"


def unet_files(folder: Path) -> list[Path]:
    """The network's files: its config and its weights."""
    return [folder / UNET / "config.json", find_weights(folder / UNET)]


def read_unet_config(folder: Path) -> dict[str, Any]:
    config_path = folder / UNET / "config.json"
    return TuneAVideoConfig.from_dict(read_json(config_path), str(config_path)).to_dict()


def load_unet(folder: Path, config: dict[str, Any]) -> TuneAVideoUNet:
    """The UNet of ``config`` with the folder's weights, loaded strictly."""
    model = TuneAVideoUNet(TuneAVideoConfig.from_dict(config, "config")).eval()
    weights = find_weights(folder / UNET)
    load_into(model, load_state_dict(weights), weights)
    return model
