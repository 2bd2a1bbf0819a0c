"""Errors a user can act on. The CLI prints them as one line, without a traceback.

Exit codes: 0 success, 1 a gate or check failed (CI reads it that way), 2 bad
input or environment (recipe, checkpoint, file system, runtime), 3 an internal
error (a bug: ``--debug`` shows the traceback to report).
"""

import contextlib
import os
import re
from typing import Iterator


@contextlib.contextmanager
def activity(what: str, where: object = None) -> Iterator[None]:
    """Name what f3export is doing (and in which folder), so an operating-system error escaping the block
    can say so; some writers (ONNX's protobuf, for one) report a full disk without a file name."""
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "f3export_activity"):  # the innermost activity is the most precise
            exc.f3export_activity = what
        if isinstance(exc, OSError) and exc.filename is None and where is not None:
            exc.filename = str(where)
        raise


def os_error_from_native(exc: Exception, path: object) -> Exception:
    """An OSError naming ``path`` for a native library's I/O failure that reports only "(os error N)"
    (safetensors' Rust, for one), so a full or read-only disk reads as what it is; else ``exc`` itself."""
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def activity_of(exc: BaseException) -> str:
    return getattr(exc, "f3export_activity", "")


class F3ExportError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class RecipeError(F3ExportError):
    """The recipe (or a --set override) is malformed; the message names the key."""


class CheckpointError(F3ExportError):
    """A model folder or weights file cannot be used; the message names the file."""


class CheckError(F3ExportError):
    """`f3export check` found drift, a missing file or a hash mismatch."""

    exit_code = 1


class EngineError(F3ExportError):
    """An engine runtime refused a model file or its inputs; the message names the file."""


class ShapeError(EngineError):
    """Inputs outside the shapes the build validated its engine at (a static size, a dynamic axis's validated
    range): refused before the engine runs, as nothing vouches for its output there; the message names the input,
    the axis and what the build validated."""


class BackendUnavailable(F3ExportError):
    """An engine backend was asked for, but its runtime is not installed or has no device."""


class Unsupported(F3ExportError):
    """A valid input asks for what f3export does not implement (a scheduler the engines-only sampler has no port
    of, a family a command does not run); the message names what and where."""
