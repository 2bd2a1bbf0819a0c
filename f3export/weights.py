"""Reading and writing weights files safely, with errors that name the file and key."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .artifacts import atomic_path
from .errors import CheckpointError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def find_weights(folder: Path) -> Path:
    """The weights file of a diffusers-style model folder, safetensors preferred."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_NAMES)})")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_state_dict(path: Path, container_key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or pickled ``.bin``/``.pt`` file (under ``container_key`` if given).

    Pickles are opened with ``weights_only=True``: a checkpoint that needs
    arbitrary code to load is refused rather than executed.
    """
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from None
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: refused to unpickle anything but tensors ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if container_key is not None:
        if not isinstance(state, dict) or container_key not in state:
            raise CheckpointError(f"{path}: no {container_key!r} entry (expected {{{container_key!r}: state_dict}})")
        state = state[container_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Strict load: every key present, none extra, every shape equal; the first problem is named."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected)")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {list(state[key].shape)}, the model expects {list(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)


def save_state_dict(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
