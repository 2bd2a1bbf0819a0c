"""Allowed roots: on a shared build server, which folders f3export may read models from and write to.

``F3EXPORT_ALLOWED_ROOTS`` holds absolute folders separated by ``os.pathsep``.
Unset means no confinement; set, every path checked here must resolve
(symlinks followed) inside one of them. An empty or relative entry is an
error rather than a silent "no confinement".
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import F3ExportError

ALLOWED_ROOTS_ENV = "F3EXPORT_ALLOWED_ROOTS"


class RootsError(F3ExportError):
    """A path lies outside the allowed roots, or the roots themselves are malformed (exit 2)."""


def allowed_roots() -> list[Path] | None:
    """The resolved allowed roots, or None when the variable is unset."""
    value = os.environ.get(ALLOWED_ROOTS_ENV)
    if value is None:
        return None
    entries = value.split(os.pathsep)
    for entry in entries:
        if not entry.strip():
            raise RootsError(f"{ALLOWED_ROOTS_ENV}={value!r}: empty entry (unset the variable for no confinement)")
        if not os.path.isabs(entry):
            raise RootsError(f"{ALLOWED_ROOTS_ENV}={value!r}: entry {entry!r} is not an absolute path")
    return [Path(entry).resolve() for entry in entries]


def confine(path: str | Path, what: str) -> None:
    """Refuse ``path`` (resolved, symlinks followed) unless it lies inside an allowed root.

    ``what`` names the recipe key or file kind for the error line.
    """
    roots = allowed_roots()
    if roots is None:
        return
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        shown = f"{path}" if resolved == Path(path).absolute() else f"{path} (resolves to {resolved})"
        raise RootsError(f"{what}: {shown} is outside the allowed roots ({ALLOWED_ROOTS_ENV})")
