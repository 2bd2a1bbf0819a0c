"""Reading and writing weights files safely, with errors that name the file and key."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .artifacts import atomic_path
from .errors import CheckpointError, os_error_from_native

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # torch's messages bold parts of their text for terminals

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

# What training metadata beside the weights needs to unpickle, and nothing that can run code: numpy arrays
# (``np.random.get_state()``, as SwissArmyTransformer/DeepSpeed checkpoints store it) under the names numpy 1
# and numpy 2 pickle them with, their numeric dtypes, and the classes of those dtypes (numpy 2 checks them).
# Plain containers, numbers, strings and torch tensors (RNG states) load without being listed.
NUMPY_ARRAY_GLOBALS: list[Callable | tuple[Callable, str]] = [
    (_numpy_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_numpy_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *sorted({type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["Float"]},
            key=lambda cls: cls.__name__),
]


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
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _first_line(exc: BaseException) -> str:
    """An exception's first line of text, without terminal escape codes (its type when it has no text)."""
    text = ANSI_ESCAPE.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refusal(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its many-line message: the global it names, if any."""
    text = ANSI_ESCAPE.sub("", str(exc))
    # "Unsupported global: GLOBAL numpy.dtype was not an allowed global", "GLOBAL os.system whose module os is blocked"
    refused = re.search(r"\bGLOBAL ([\w.]+)", text)
    if refused:
        return f"the global {refused.group(1)!r}"
    detail = re.search(r"WeightsUnpickler error: (.+)", text)
    return detail.group(1).strip() if detail else _first_line(exc)


def load_state_dict(path: Path, container_key: str | None = None,
                    allowed_globals: Sequence[Callable | tuple[Callable, str]] = ()) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or pickled ``.bin``/``.pt`` file (under ``container_key`` if given).

    Pickles are opened with ``weights_only=True``: a checkpoint that needs
    arbitrary code to load is refused rather than executed. ``allowed_globals``
    extends what may be unpickled for this load only (e.g. ``NUMPY_ARRAY_GLOBALS``
    for the training metadata stored beside ``container_key``).
    """
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with torch.serialization.safe_globals(list(allowed_globals)):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({_first_line(exc)})") from None
    except pickle.UnpicklingError as exc:
        loadable = "tensors, plain containers and numpy arrays" if allowed_globals else "tensors and plain containers"
        raise CheckpointError(f"{path}: refused to unpickle {_refusal(exc)} (a weights-only load takes {loadable}, "
                              "never code)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    if container_key is not None:
        if not isinstance(state, dict) or container_key not in state:
            raise CheckpointError(f"{path}: no {container_key!r} entry (expected {{{container_key!r}: state_dict}})")
        state = state[container_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str, assign: bool = False) -> None:
    """Strict load: every key present, none extra, every shape equal; the first problem is named. ``assign``:
    the model takes the tensors themselves (a safetensors file's are mapped from disk) instead of copies."""
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
    model.load_state_dict(state, strict=True, assign=assign)


def save_state_dict(model: nn.Module, path: Path) -> None:
    save_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written to a temporary name and renamed; a full or read-only disk is an OSError
    naming ``path`` (safetensors reports only "os error N")."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            raise os_error_from_native(exc, path) from None
