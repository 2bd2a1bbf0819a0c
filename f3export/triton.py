"""``f3export export-triton``: a build's engines as a Triton Inference Server model repository.

    <repo>/<build>_<variant>/config.pbtxt
    <repo>/<build>_<variant>/1/model.onnx      (ONNX Runtime engine; its external data beside it, same name)
    <repo>/<build>_<variant>/1/model.plan      (TensorRT engine)

Names, data types and dims come from the build's engine contract. A dynamic axis becomes -1 only where the
build validated a range of sizes; an axis validated at one size is written as that size, so Triton refuses
what no engine was checked on. Where the batch axis was validated from 1 up, Triton's batching is on
(``max_batch_size`` = the range's top, dims without the batch axis); else the batch is an ordinary dim.
The build's pipeline components (text encoder, VAE decoder) become models of their own, their axes -1.
Engines are copied only after their hashes match the manifest, and the repository is written to a temporary
folder and renamed into place when complete.

The manifest is untrusted input: a model name (the build's ``name``, a component's) must be a plain folder name
of letters, digits, '_', '.' and '-' (``model_name_problem``), checked before any path or config line is made of
it, and every text written into config.pbtxt (model and tensor names) is an escaped string literal
(``text_literal``), so no name can leave the repository or add a line to a config.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST, MODEL_VARIANTS, FinishedBuild, open_build
from .errors import F3ExportError
from .recipe import file_name_problem
from .roots import confine
from .runtime import TensorSpec, contract_tensors, validated_ranges

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
# Triton names a model by its folder in the repository and serves it under that name in URLs
# (/v2/models/<name>) and on command lines; its documentation sets no character rule of its own, so a name is
# held to what is safe in all three: letters, digits, '_', '.', '-', starting with a letter, digit or '_'
# (never '.', '..' or a hidden folder, nor an option-like '-x').
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonModel:
    name: str
    folder: Path
    config: str


def model_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a Triton model's name (a folder of the repository), or None."""
    if not isinstance(name, str):
        return f"not a string but {type(name).__name__}"
    problem = file_name_problem(name)
    if problem is None and not MODEL_NAME.fullmatch(name):
        problem = "only letters, digits, '_', '.' and '-' are taken, not starting with '.' or '-'"
    return problem


def _checked_name(value: Any, field: str) -> str:
    problem = model_name_problem(value)
    if problem:
        raise F3ExportError(f"{field} = {value!r:.80} cannot name a Triton model ({problem})")
    return value


def _model_name(*parts: tuple[Any, str]) -> str:
    """The model name ``<part>_<part>...`` of ``(value, field)`` parts, each checked before any path or config line
    is made of it (a refusal names the field the bad value came from), and the joined name too (its length)."""
    name = "_".join(_checked_name(value, field) for value, field in parts)
    return _checked_name(name, parts[0][1])


def text_literal(text: str, field: str) -> str:
    """``text`` as a protobuf text-format string literal: printable ASCII as is, but ``"``, ``'`` and ``\\``
    backslash-escaped, and every other byte of its UTF-8 as a 3-digit octal escape, which every text-format
    parser (protobuf's C++ one in Triton, its Python one) reads back byte for byte. Text that is not Unicode
    (a lone surrogate from JSON) is refused: a config's strings are UTF-8."""
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise F3ExportError(f"{field} = {text[:80]!r} is not Unicode text (a lone surrogate)") from None
    escaped = "".join("\\" + chr(b) if chr(b) in "\"'\\" else chr(b) if 0x20 <= b < 0x7F else f"\\{b:03o}"
                      for b in encoded)
    return f'"{escaped}"'


def _dims(t: TensorSpec, ranges: dict[str, tuple[int, int]], batched: bool) -> list[int]:
    """A static axis as its size, a named one as its size where the build validated one size, else -1."""
    dims = []
    for size in t.shape[1:] if batched else t.shape:
        if isinstance(size, str):
            validated = ranges.get(size)
            size = validated[0] if validated is not None and validated[0] == validated[1] else -1
        dims.append(size)
    return dims


def _tensor_block(kind: str, tensors: list[TensorSpec], ranges: dict[str, tuple[int, int]], batched: bool,
                  where: str) -> str:
    entries = []
    for index, t in enumerate(tensors):
        field = f"{where}.{kind}s[{index}]"
        if t.dtype.name not in TRITON_TYPES:
            raise F3ExportError(f"{field}.dtype = {t.dtype.name!r} has no Triton type")
        dims = ", ".join(str(d) for d in _dims(t, ranges, batched))
        entries.append(f"  {{\n    name: {text_literal(t.name, f'{field}.name')}\n"
                       f"    data_type: {TRITON_TYPES[t.dtype.name]}\n    dims: [ {dims} ]\n  }}")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def model_config(name: str, backend: str, device: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 ranges: dict[str, tuple[int, int]], where: str) -> str:
    """config.pbtxt of one engine (protobuf text format of Triton's ModelConfig). ``ranges``: each named axis's
    validated [min, max]; an axis without one is -1. ``where``: the manifest section the tensors come from."""
    batch_range = ranges.get("batch")
    # Triton's batcher sends any batch from 1 to max_batch_size: only a range validated from 1 allows it
    batched = batch_range is not None and batch_range[0] == 1 < batch_range[1] and \
        all(t.shape[:1] == ("batch",) for t in inputs + outputs)
    platform = PLATFORMS[backend][0]
    kind = "KIND_GPU" if device == "cuda" or backend == "tensorrt" else "KIND_CPU"
    text = (f"name: {text_literal(name, 'model name')}\nplatform: \"{platform}\"\n"
            f"max_batch_size: {batch_range[1] if batched else 0}\n"
            + _tensor_block("input", inputs, ranges, batched, where)
            + _tensor_block("output", outputs, ranges, batched, where)
            + f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")
    if batched:
        text += "dynamic_batching { }\n"
    return text


def _copy_engine(build: FinishedBuild, path: Path, target: Path) -> None:
    """An engine file under Triton's name, and its external data beside it under the name the engine gives it;
    only data the engine stage recorded (and ``verified_file`` hashed), never a file merely lying beside it."""
    shutil.copyfile(path, target)
    data = path.with_name(path.name + ".data")
    if str(data.relative_to(build.root)) in build.stages["engine"].files:
        shutil.copyfile(data, target.with_name(data.name))


@dataclass(frozen=True)
class _Planned:
    """One model of the repository, named and configured before anything is written."""

    name: str
    backend: str
    engine: Path
    config: str


def export_triton(artifact_dir: Path, repo: Path, variants: tuple[str, ...] = MODEL_VARIANTS) -> list[TritonModel]:
    """Write ``repo`` (which must not exist) with one Triton model per engine of the build's ``variants``.

    Every name is the manifest's (untrusted): each is checked as a folder name before any path or config line is
    made of it, and written into config.pbtxt as an escaped literal. The repository is assembled in a fresh
    temporary folder beside it (a new name: nothing that already lies there is followed or removed) and renamed
    into place when complete."""
    build = open_build(artifact_dir, runtime=True)
    confine(repo, "Triton repository")
    if os.path.lexists(repo):
        raise F3ExportError(f"{repo}: exists; give a new folder (an existing repository is not overwritten)")
    manifest = build.root / MANIFEST
    device = build.recipe.engine.device
    base = (build.doc["name"], f"{manifest}: name") if "name" in build.doc else \
        (artifact_dir.resolve().name, f"{artifact_dir}: the folder's name")
    inputs, outputs = (contract_tensors(build, kind) for kind in ("inputs", "outputs"))
    ranges = validated_ranges(build, inputs + outputs)
    models = []
    several = len(build.recipe.engine.selected) > 1
    for entry in build.engines.values():
        if entry.variant in variants:
            name = _model_name(base, (entry.variant, "variant"), *([(entry.backend, "backend")] if several else []))
            models.append(_Planned(name, entry.backend, build.verified_engine(entry.name).path,
                                   model_config(name, entry.backend, device, inputs, outputs, ranges,
                                                f"{manifest}: contract")))
    components = build.doc.get("components") or {}
    if not isinstance(components, dict):
        raise F3ExportError(f"{manifest}: components: expected a table")
    for component in components:  # the rest of the pipeline
        name = _model_name(base, (component, f"{manifest}: components key"))
        tensors = (contract_tensors(build, kind, ("components", component)) for kind in ("inputs", "outputs"))
        # its axes were checked at several sizes (the export's and validation's inputs) and record no range: -1
        models.append(_Planned(name, "onnxruntime", build.component_engine(component),
                               model_config(name, "onnxruntime", device, *tensors, {},
                                            f"{manifest}: components.{component}")))
    names = [m.name for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise F3ExportError(f"{manifest}: components: the Triton model name {twice[0]!r} would be made twice")
    with tempfile.TemporaryDirectory(dir=repo.parent, prefix=f".{repo.name}.tmp-triton-") as staging:
        tmp = Path(staging) / repo.name  # made by mkdir, so with the mode every folder gets here (not mkdtemp's 0700)
        for model in models:
            (tmp / model.name / "1").mkdir(parents=True)
            _copy_engine(build, model.engine, tmp / model.name / "1" / PLATFORMS[model.backend][1])
            (tmp / model.name / "config.pbtxt").write_text(model.config)
        tmp.rename(repo)
    return [TritonModel(m.name, repo / m.name, m.config) for m in models]
