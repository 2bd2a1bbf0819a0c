"""``f3export export-triton``: a build's engines as a Triton Inference Server model repository.

    <repo>/<build>_<variant>/config.pbtxt
    <repo>/<build>_<variant>/1/model.onnx      (ONNX Runtime engine; its external data beside it, same name)
    <repo>/<build>_<variant>/1/model.plan      (TensorRT engine)

Names, data types and dims come from the build's engine contract. A dynamic axis becomes -1 only where the
build validated a range of sizes; an axis validated at one size is written as that size, so Triton refuses
what no engine was checked on. Where the batch axis was validated over a range, Triton's batching is on
(``max_batch_size`` = the range's top, dims without the batch axis); else the batch is an ordinary dim.
The build's pipeline components (text encoder, VAE decoder) become models of their own, their axes -1.
Engines are copied only after their hashes match the manifest, and the repository is written to a temporary
folder and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MODEL_VARIANTS, open_build
from .errors import F3ExportError
from .roots import confine

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


@dataclass(frozen=True)
class TritonModel:
    name: str
    folder: Path
    config: str


def _dims(shape: list, ranges: dict[str, list[int]], batched: bool) -> list[int]:
    dims = []
    for size in shape[1:] if batched else shape:
        if isinstance(size, int):
            dims.append(size)
        else:
            low, high = ranges[size]
            dims.append(low if low == high else -1)
    return dims


def _tensor_block(kind: str, tensors: list[dict], ranges: dict[str, list[int]], batched: bool) -> str:
    entries = []
    for t in tensors:
        if t["dtype"] not in TRITON_TYPES:
            raise F3ExportError(f"contract {kind} {t['name']!r}: dtype {t['dtype']} has no Triton type")
        dims = ", ".join(str(d) for d in _dims(t["shape"], ranges, batched))
        entries.append(f'  {{\n    name: "{t["name"]}"\n    data_type: {TRITON_TYPES[t["dtype"]]}\n'
                       f"    dims: [ {dims} ]\n  }}")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def model_config(name: str, backend: str, device: str, contract: dict) -> str:
    """config.pbtxt of one engine (protobuf text format of Triton's ModelConfig)."""
    ranges = contract["dynamic_axes"]
    tensors = contract["inputs"] + contract["outputs"]
    batch_range = ranges.get("batch")
    batched = batch_range is not None and 1 < batch_range[1] and batch_range[0] < batch_range[1] and \
        all(t["shape"][0] == "batch" for t in tensors)
    platform = PLATFORMS[backend][0]
    kind = "KIND_GPU" if device == "cuda" or backend == "tensorrt" else "KIND_CPU"
    text = (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {batch_range[1] if batched else 0}\n'
            + _tensor_block("input", contract["inputs"], ranges, batched)
            + _tensor_block("output", contract["outputs"], ranges, batched)
            + f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")
    if batched:
        text += "dynamic_batching { }\n"
    return text


def _copy_engine(path: Path, target: Path) -> None:
    """An engine file under Triton's name, and its external data beside it under the name the engine gives it."""
    shutil.copyfile(path, target)
    data = path.with_name(path.name + ".data")
    if data.exists():
        shutil.copyfile(data, target.with_name(data.name))


def export_triton(artifact_dir: Path, repo: Path, variants: tuple[str, ...] = MODEL_VARIANTS) -> list[TritonModel]:
    """Write ``repo`` (which must not exist) with one Triton model per engine of the build's ``variants``."""
    build = open_build(artifact_dir, runtime=True)
    confine(repo, "Triton repository")
    if repo.exists():
        raise F3ExportError(f"{repo}: exists; give a new folder (an existing repository is not overwritten)")
    contract = build.doc["contract"]
    tmp = repo.with_name(f".{repo.name}.tmp-triton")
    shutil.rmtree(tmp, ignore_errors=True)
    models = []
    try:
        for entry in build.engines.values():
            if entry.variant not in variants:
                continue
            build.verified_engine(entry.name)
            name = f"{build.doc.get('name', artifact_dir.name)}_{entry.variant}"
            if len(build.recipe.engine.selected) > 1:
                name += f"_{entry.backend}"
            version = tmp / name / "1"
            version.mkdir(parents=True)
            _copy_engine(entry.path, version / PLATFORMS[entry.backend][1])
            config = model_config(name, entry.backend, build.recipe.engine.device, contract)
            (tmp / name / "config.pbtxt").write_text(config)
            models.append(TritonModel(name, repo / name, config))
        for component, entry in (build.doc.get("components") or {}).items():  # the rest of the pipeline
            path = build.component_engine(component)
            name = f"{build.doc.get('name', artifact_dir.name)}_{component}"
            version = tmp / name / "1"
            version.mkdir(parents=True)
            _copy_engine(path, version / PLATFORMS["onnxruntime"][1])
            # its axes were checked at several sizes (the export's and validation's inputs): left dynamic
            ranges = {d: [0, 1] for t in entry["inputs"] + entry["outputs"] for d in t["shape"] if isinstance(d, str)}
            config = model_config(name, "onnxruntime", build.recipe.engine.device,
                                  {"inputs": entry["inputs"], "outputs": entry["outputs"], "dynamic_axes": ranges})
            (tmp / name / "config.pbtxt").write_text(config)
            models.append(TritonModel(name, repo / name, config))
        tmp.rename(repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return models
