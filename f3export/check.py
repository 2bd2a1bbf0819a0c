"""``f3export check``: re-verify a finished build, for CI and after deployment.

Every file the manifest lists must hash as recorded, then every engine is run
on its stored golden inputs and held to the build's export-fidelity gates
against the stored PyTorch outputs.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import MANIFEST, Manifest, sha256_file
from .engines import make_backend
from .errors import CheckError
from .recipe import Recipe
from .validate import Gate, compare_engine, export_gates, load_goldens


def verify_files(manifest: Manifest) -> int:
    """Check every recorded file's SHA-256; returns how many were checked."""
    checked = 0
    for stage, record in manifest.doc["stages"].items():
        for rel, digest in record["files"].items():
            path = manifest.root / rel
            if not path.is_file():
                raise CheckError(f"{path}: missing (recorded by stage '{stage}')")
            if sha256_file(path) != digest:
                raise CheckError(f"{path}: content changed since the build (sha256 mismatch; rebuild it)")
            checked += 1
    return checked


def open_build(root: Path) -> tuple[Manifest, Recipe]:
    """The manifest of a finished build and the recipe it was built from (for check, bench and runtime)."""
    if not (root / MANIFEST).is_file():
        raise CheckError(f"{root}: no {MANIFEST} (not an f3export artifact folder, or the build never finished)")
    manifest = Manifest(root)
    if manifest.doc.get("status") not in ("passed", "failed") or "engines" not in manifest.doc:
        raise CheckError(f"{root / MANIFEST}: the build did not finish; run f3export build again")
    return manifest, Recipe.from_dict(Path(manifest.doc["recipe_file"]), manifest.doc["recipe"])


def check_artifacts(root: Path) -> tuple[int, list[Gate]]:
    manifest, recipe = open_build(root)
    checked = verify_files(manifest)
    gates: list[Gate] = []
    for name, entry in manifest.doc["engines"].items():
        backend = make_backend(entry["backend"], recipe, root)
        worst = compare_engine(backend.load(root / entry["path"]), load_goldens(root / entry["goldens"]))
        gates += export_gates(worst, recipe.validation, backend.precision, f"check.{name}")
    return checked, gates
