"""ONNX export: trace, graph surgery, checks, external data for big models.

torch.onnx (TorchScript exporter, which honours named dynamic axes directly)
writes the raw graph; onnx-graphsurgeon then cleans it up, folds constants
and sorts it topologically, which also drops nodes that pruning left dead;
ONNX shape inference and ``onnx.checker`` (by path, so external data is
checked too) gate the result. Models whose weights exceed 2 GiB, the protobuf
limit, are saved with external data automatically. Every input and output
carries real dims (sizes, or the recipe's axis names where dynamic) and the
file carries the engine's contract (``contract``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime
import torch
from torch import nn
from torch.onnx import symbolic_helper

from .artifacts import staged_model
from .contract import engine_contract, name_axes, write_contract
from .errors import RecipeError
from .models.base import ExportSpec

PROTOBUF_LIMIT = 2**31


@symbolic_helper.parse_args("v", "is", "v", "v")
def _rms_norm(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` (torch.nn.RMSNorm: Wan's q/k norms), which the TorchScript exporter has no symbolic
    for at any opset: x / sqrt(mean(x^2 over the normalized dims) + eps) * weight, in standard ops."""
    eps = symbolic_helper._maybe_get_const(eps, "f")
    if eps is None or symbolic_helper._is_none(eps):
        eps = torch.finfo(torch.float32).eps  # torch's default for a float32 input
    axes = list(range(-len(normalized_shape), 0))
    square = g.op("Mul", x, x)
    if g.opset < 18:  # ReduceMean takes its axes as an attribute before opset 18, as an input from it
        mean_square = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    else:
        mean_square = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
    normed = g.op("Div", x, rms)
    return normed if symbolic_helper._is_none(weight) else g.op("Mul", normed, weight)


torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, 17)
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class OnnxInfo:
    path: Path
    files: list[Path]  # the .onnx file and its external data file, if any
    parameters: int
    bytes_on_disk: int
    external_data: bool
    nodes: int
    contract: dict[str, Any] | None  # as written into the file's metadata_props


def onnx_parameter_count(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers holding weights (scalar constants left out)."""
    total = 0
    for init in model.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type in FLOAT_TYPES and size > 1:
            total += size
    return total


def _surgery(model: onnx.ModelProto) -> onnx.ModelProto:
    onnxruntime.set_default_logger_severity(3)  # constant folding runs ONNX Runtime; keep its notes quiet
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    graph.fold_constants().cleanup().toposort()
    return gs.export_onnx(graph)


@dataclass(frozen=True)
class ContractTerms:
    """What the build adds to a graph's own inputs and outputs in its contract (see ``contract``)."""

    family: str
    ranges: dict[str, list[int]]  # validated [min, max] of each dynamic axis name
    conventions: dict[str, Any]


def _output_shapes(outputs: Any, names: list[str]) -> dict[str, tuple[int, ...]]:
    tensors = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return {name: tuple(int(d) for d in t.shape) for name, t in zip(names, tensors)}


def export_onnx(model: nn.Module, spec: ExportSpec, path: Path, opset: int, external_data: str,
                terms: ContractTerms | None = None) -> OnnxInfo:
    """Export to ``path`` (and ``path.data`` when external); nothing appears there unless every step passed.

    Every input and output gets real dims (static sizes, the spec's axis names where dynamic); with
    ``terms``, the engine's contract is written into the file's metadata_props.
    """
    path = Path(path)
    data_name = path.name + ".data"
    with staged_model(path) as tmp_dir:
        raw = tmp_dir / "raw.onnx"  # the exporter's graph, before surgery (left behind: not a final file)
        shapes = {name: tuple(t.shape) for name, t in spec.inputs.items()}
        # The traced call's output sizes, for the output axes the exporter leaves unnamed.
        hook = model.register_forward_hook(
            lambda _module, _args, outputs: shapes.update(_output_shapes(outputs, spec.output_names)))
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about Python values in shapes are expected
                torch.onnx.export(model, tuple(spec.inputs.values()), str(raw), input_names=list(spec.inputs),
                                  output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
                                  opset_version=opset, dynamo=False, do_constant_folding=True)
        finally:
            hook.remove()
        graph = _surgery(onnx.load(str(raw), load_external_data=True))
        name_axes(graph, shapes, spec.dynamic_axes)
        contract = None
        if terms is not None:
            contract = engine_contract(graph, terms.family, terms.ranges, terms.conventions)
            write_contract(graph, contract)
        weight_bytes = sum(t.ByteSize() for t in graph.graph.initializer)
        external = external_data == "always" or (external_data == "auto" and weight_bytes > PROTOBUF_LIMIT * 0.9)
        if external_data == "never" and weight_bytes > PROTOBUF_LIMIT * 0.9:
            raise RecipeError(f"[export].external_data = 'never', but {path.name} holds "
                              f"{weight_bytes / 2**30:.2f} GiB of weights, over the 2 GiB protobuf limit")
        staged = tmp_dir / path.name
        if external:
            onnx.save_model(graph, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            onnx.shape_inference.infer_shapes_path(str(staged))
        else:
            graph = onnx.shape_inference.infer_shapes(graph)
            onnx.save_model(graph, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        parameters = onnx_parameter_count(graph)
        nodes = len(graph.graph.node)
    files = [path] + ([path.parent / data_name] if external else [])
    return OnnxInfo(path, files, parameters, sum(f.stat().st_size for f in files), external, nodes, contract)
