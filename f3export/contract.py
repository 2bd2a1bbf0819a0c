"""The engine's contract: what a runtime must know to drive an exported graph, stored where it finds it.

One JSON document per build, in ``manifest.json`` (``contract``) and in the ``metadata_props`` of every
ONNX file (``onnx/*.onnx`` and the ONNX Runtime engines, key ``f3export.contract``), so that plain
onnxruntime can read it from the file alone::

    {"format": 1, "family": "tune-a-video",
     "inputs":  [{"name": "sample", "dtype": "float32", "shape": ["batch", 4, "frames", "height", "width"]}, ...],
     "outputs": [{"name": "noise_pred", "dtype": "float32", "shape": [...]}],
     "dynamic_axes": {"batch": [2, 2], "frames": [2, 6], ...},   # the [min, max] validation ran at
     "conventions": {...}}                                        # the family's: timestep, scheduler, CFG, ...

A shape lists a static axis as its size and a dynamic one as its axis name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

CONTRACT_KEY = "f3export.contract"
FORMAT = 1


def name_axes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], dynamic_axes: dict[str, dict[int, str]]
              ) -> None:
    """Set every graph input's and output's dims: static axes to their size, dynamic ones to their axis name
    (the exporter invents symbols such as ``Transposenoise_pred_dim_1`` for output axes it cannot trace)."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        named = dynamic_axes.get(value.name, {})
        del dims[:]
        for axis, size in enumerate(shapes[value.name]):
            if axis in named:
                dims.add().dim_param = named[axis]
            else:
                dims.add().dim_value = size


def _tensor(value: onnx.ValueInfoProto) -> dict[str, Any]:
    elem_type = value.type.tensor_type.elem_type
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]}


def graph_io(path: Path | str) -> dict[str, list[dict[str, Any]]]:
    """The inputs and outputs (name, dtype, shape with axis names) of the ONNX file at ``path``."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {"inputs": [_tensor(v) for v in graph.input], "outputs": [_tensor(v) for v in graph.output]}


def engine_contract(model: onnx.ModelProto, family: str, ranges: dict[str, list[int]],
                    conventions: dict[str, Any]) -> dict[str, Any]:
    """The contract of a graph whose dynamic axes are named (``name_axes``): ``ranges`` gives the
    validated [min, max] of each axis name, ``conventions`` the family's (``ModelAdapter.conventions``)."""
    inputs, outputs = [_tensor(v) for v in model.graph.input], [_tensor(v) for v in model.graph.output]
    symbols = {d for t in inputs + outputs for d in t["shape"] if isinstance(d, str)}
    unranged = symbols - set(ranges)
    if unranged:
        raise ValueError(f"dynamic axes {sorted(unranged)} of the graph have no validated range")
    return {"format": FORMAT, "family": family, "inputs": inputs, "outputs": outputs,
            "dynamic_axes": {axis: list(r) for axis, r in ranges.items() if axis in symbols},
            "conventions": conventions}


def write_contract(model: onnx.ModelProto, contract: dict[str, Any]) -> None:
    """Store the contract in the model's ``metadata_props`` (replacing an earlier one)."""
    props = {p.key: p.value for p in model.metadata_props}
    props[CONTRACT_KEY] = json.dumps(contract, sort_keys=True)
    onnx.helper.set_model_props(model, props)


def read_contract(path) -> dict[str, Any] | None:
    """The contract stored in an ONNX file, or None; reads the graph only, never its external data."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[CONTRACT_KEY]) if CONTRACT_KEY in props else None
