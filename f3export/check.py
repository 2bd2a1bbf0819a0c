"""``f3export check``: re-verify a finished build, for CI and after deployment.

What it proves: the folder holds a build that finished and passed; every file
any stage recorded hashes as recorded; the engines are exactly the ones the
recipe asks for, each carrying the manifest's contract (inputs, validated
ranges, scheduler) in its own file; every recorded validation gate still holds against its
limit; and each engine (the pipeline components' too: text encoder, VAE
decoder), re-run on its stored golden inputs, still meets the export-fidelity
gates against the stored PyTorch outputs.

What it cannot prove on its own: the manifest vouches for itself, so a folder
whose engine, goldens and hashes were all replaced consistently passes. An
external digest of ``manifest.json`` (``--expect-sha256``), kept where the
folder's writer cannot change it, closes that.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from .artifacts import VALIDATION_REPORT, FinishedBuild, open_build
from .engines import make_backend
from .errors import CheckError, EngineError
from .report import unvouched
from .validate import Gate, Golden, compare_engine, export_gates, load_goldens

NUMERIC_KINDS = "biuf"  # bool, int, unsigned, float: what an engine's inputs and outputs hold


def read_goldens(path: Path) -> list[Golden]:
    """Goldens from an untrusted folder: a numeric, non-empty npz of ``<i>/input|expected/<name>``, no pickles."""
    try:
        samples = load_goldens(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckError(f"{path}: malformed goldens ({reason})") from None
    if not samples:
        raise CheckError(f"{path}: no golden samples")
    for i, (inputs, expected) in enumerate(samples):
        if not inputs or not expected:
            raise CheckError(f"{path}: sample {i} lacks {'inputs' if not inputs else 'expected outputs'}")
        for name, array in {**inputs, **expected}.items():
            if array.dtype.kind not in NUMERIC_KINDS or array.size == 0:
                raise CheckError(f"{path}: sample {i} array {name!r} is {array.dtype} {list(array.shape)}, "
                                 "expected a non-empty numeric array")
    return samples


def recorded_gates(build: FinishedBuild) -> list[Gate]:
    """The gates validation recorded, re-evaluated from value and limit (a 'passed' flag is not trusted)."""
    path = build.path(VALIDATION_REPORT, "validation report")
    try:
        raw = json.loads(path.read_text())["gates"]
        gates = [Gate(str(g["metric"]), float(g["value"]), float(g["limit"]), g["kind"]) for g in raw]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckError(f"{path}: malformed validation report ({type(exc).__name__}: {exc})") from None
    if not gates or any(g.kind not in ("max", "min") for g in gates):
        raise CheckError(f"{path}: malformed validation report (no gates, or a gate kind not 'max'/'min')")
    for name in build.engines:
        if not any(g.metric.startswith(f"export.{name}.") for g in gates):
            raise CheckError(f"{path}: no export gate for engine {name!r}")
    return [Gate(f"recorded.{g.metric}", g.value, g.limit, g.kind) for g in gates]


def build_caveats(build: FinishedBuild) -> list[str]:
    """What the build cannot vouch for (random weights, stand-in text), from its calibration's scores.json."""
    try:
        scores = json.loads(build.path("scores.json", "calibration scores").read_text())
    except (OSError, ValueError) as exc:
        raise CheckError(f"{build.root / 'scores.json'}: unreadable ({type(exc).__name__})") from None
    if not isinstance(scores, dict):
        raise CheckError(f"{build.root / 'scores.json'}: expected a JSON object")
    return unvouched(scores)


def check_artifacts(root: Path, expect_sha256: str | None = None) -> tuple[int, list[Gate], list[str]]:
    """Files verified, gates, and what the build cannot vouch for."""
    build = open_build(root, expect_sha256)
    checked = build.verify()
    gates = recorded_gates(build)
    for name, entry in build.engines.items():
        backend = make_backend(entry.backend, build.recipe, root)
        samples = read_goldens(entry.goldens)
        engine = backend.load(entry.path)
        try:
            worst = compare_engine(engine, samples)
        except EngineError as exc:
            raise CheckError(f"{entry.goldens}: the engine refused the golden inputs ({exc})") from None
        gates += export_gates(worst, build.recipe.validation, backend.precision, f"check.{name}")
    gates += component_gates(build)
    return checked, gates, build_caveats(build)  # gates never empty: recorded_gates refuses a report without


def component_gates(build: FinishedBuild) -> list[Gate]:
    """The pipeline components' engines (text encoder, VAE decoder) re-run on their goldens."""
    components = build.doc.get("components") or {}
    if not isinstance(components, dict):
        raise CheckError(f"{build.root / 'manifest.json'}: components: expected a table")
    gates = []
    for name, entry in components.items():
        engine = make_backend("onnxruntime", build.recipe, build.root).load(build.component_engine(name))
        goldens = build.verified_file(entry.get("goldens"), "validate", f"components.{name}.goldens")
        try:
            worst = compare_engine(engine, read_goldens(goldens))
        except EngineError as exc:
            raise CheckError(f"{goldens}: the engine refused the golden inputs ({exc})") from None
        gates += export_gates(worst, build.recipe.validation, "fp32", f"check.{name}.onnxruntime")
    return gates
