"""ONNX export: trace, graph surgery, checks, external data for big models.

torch.onnx (TorchScript exporter, which honours named dynamic axes directly)
writes the raw graph *without its weights*: they stay graph inputs named as in
the model's state dict. onnx-graphsurgeon then cleans the graph up, folds
constants and sorts it topologically, which also drops nodes that pruning left
dead, all on a graph of a few megabytes; only then are the weights written,
one tensor at a time, from the model itself (a weight the exporter transposes
is written transposed). So exporting costs little memory beyond the model's
own: the exporter's folding, ONNX's protobuf copies and graph surgery over the
weights each held another copy (a 3.7 GB model peaked at 23 GB). ONNX shape
inference and ``onnx.checker`` (by path, so external data is checked too) gate
the result. Models whose weights exceed 2 GiB, the protobuf limit, are saved
with external data automatically. Every input and output carries real dims
(sizes, or the recipe's axis names where dynamic) and the file carries the
engine's contract (``contract``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


class Weights:
    """The model's weights as the exported graph names them, made one at a time when written: the state
    dict's tensors, and transposes of them where the exporter transposes a weight (``fold_transposes``)."""

    def __init__(self, model: nn.Module):
        self.tensors: dict[str, Callable[[], torch.Tensor]] = {
            name: (lambda t=tensor: t.detach()) for name, tensor in model.state_dict(keep_vars=True).items()}

    def fold_transposes(self, graph: onnx.ModelProto) -> None:
        """Replace each Transpose of a weight by the transposed weight, a new graph input, as the exporter's own
        constant folding would (the engines then read a matrix in the layout they multiply by)."""
        inputs = {value.name: value for value in graph.graph.input}
        kept = []
        for node in graph.graph.node:
            if node.op_type != "Transpose" or node.input[0] not in self.tensors or node.input[0] not in inputs:
                kept.append(node)
                continue
            source = self.tensors[node.input[0]]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            perm = perm if perm is not None else list(reversed(range(source().dim())))
            self.tensors[node.output[0]] = lambda source=source, perm=perm: source().permute(perm)
            shape = [int(n) for n in self.tensors[node.output[0]]().shape]
            graph.graph.input.append(onnx.helper.make_tensor_value_info(
                node.output[0], inputs[node.input[0]].type.tensor_type.elem_type, shape))
        del graph.graph.node[:]
        graph.graph.node.extend(kept)

    def used(self, graph: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
        """The graph inputs that are weights some node reads (pruning and surgery leave others unread)."""
        read = {name for node in graph.graph.node for name in node.input} | {v.name for v in graph.graph.output}
        return [value for value in graph.graph.input if value.name in self.tensors and value.name in read]

    def bytes(self, graph: onnx.ModelProto) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tensors[v.name]() for v in self.used(graph)))

    def into_initializers(self, graph: onnx.ModelProto, data: Path | None) -> None:
        """Turn the graph inputs that are weights into initializers (those no node reads are dropped), each
        written to the file ``data`` (external data beside the model, 1 KiB and larger) or inline."""
        weights = self.used(graph)
        kept = [value for value in graph.graph.input if value.name not in self.tensors]
        del graph.graph.input[:]
        graph.graph.input.extend(kept)
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(data, "wb")) if data is not None else None
            for value in weights:
                tensor = self.tensors[value.name]().contiguous()  # one weight at a time: a copy only if transposed
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                proto = onnx.TensorProto(name=value.name, dims=list(tensor.shape),
                                         data_type=value.type.tensor_type.elem_type)
                if out is not None and raw.nbytes >= EXTERNAL_THRESHOLD:
                    offset = out.tell()
                    offset += out.write(b"\0" * (-offset % EXTERNAL_ALIGNMENT))
                    out.write(raw.data)
                    proto.data_location = onnx.TensorProto.EXTERNAL
                    for key, entry in (("location", data.name), ("offset", offset), ("length", raw.nbytes)):
                        proto.external_data.add(key=key, value=str(entry))
                else:
                    proto.raw_data = raw.tobytes()
                graph.graph.initializer.append(proto)


class _Nothing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _drop_last_trace() -> None:
    """The TorchScript exporter keeps the tensors of the model it traced last alive from C++ until it traces
    another (measured: a 3.7 GB model stayed resident after its export, and went at the next); trace a model
    of nothing so that the build's next step does not carry the exported model's weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Nothing(), (torch.zeros(1),), io.BytesIO(), dynamo=False)


EXTERNAL_THRESHOLD = 1024  # bytes: smaller weights stay inline, as onnx.save_model's size_threshold
EXTERNAL_ALIGNMENT = 4096  # each external tensor starts on a page, so a runtime can map it


def export_onnx(model: nn.Module, spec: ExportSpec, path: Path, opset: int, external_data: str,
                terms: ContractTerms | None = None) -> OnnxInfo:
    """Export to ``path`` (and ``path.data`` when external); nothing appears there unless every step passed.

    Every input and output gets real dims (static sizes, the spec's axis names where dynamic); with
    ``terms``, the engine's contract is written into the file's metadata_props.
    """
    path = Path(path)
    data_name = path.name + ".data"
    weights = Weights(model)
    with staged_model(path) as tmp_dir:
        raw = tmp_dir / "raw.onnx"  # the exporter's graph, before surgery (left behind: not a final file)
        shapes = {name: tuple(t.shape) for name, t in spec.inputs.items()}
        # The traced call's output sizes, for the output axes the exporter leaves unnamed.
        hook = model.register_forward_hook(
            lambda _module, _args, outputs: shapes.update(_output_shapes(outputs, spec.output_names)))
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about Python values in shapes are expected
                # The weights stay out (graph inputs named as in the state dict, unfolded): written below.
                torch.onnx.export(model, tuple(spec.inputs.values()), str(raw), input_names=list(spec.inputs),
                                  output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
                                  opset_version=opset, dynamo=False, export_params=False,
                                  do_constant_folding=False)
        finally:
            hook.remove()
            _drop_last_trace()
        graph = onnx.load(str(raw))
        weights.fold_transposes(graph)
        graph = _surgery(graph)
        weight_bytes = weights.bytes(graph)
        external = external_data == "always" or (external_data == "auto" and weight_bytes > PROTOBUF_LIMIT * 0.9)
        if external_data == "never" and weight_bytes > PROTOBUF_LIMIT * 0.9:
            raise RecipeError(f"[export].external_data = 'never', but {path.name} holds "
                              f"{weight_bytes / 2**30:.2f} GiB of weights, over the 2 GiB protobuf limit")
        staged = tmp_dir / path.name
        weights.into_initializers(graph, tmp_dir / data_name if external else None)
        name_axes(graph, shapes, spec.dynamic_axes)
        contract = None
        if terms is not None:
            contract = engine_contract(graph, terms.family, terms.ranges, terms.conventions)
            write_contract(graph, contract)
        if external:
            onnx.save_model(graph, str(staged))
            onnx.shape_inference.infer_shapes_path(str(staged))
        else:
            graph = onnx.shape_inference.infer_shapes(graph)
            onnx.save_model(graph, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        parameters = onnx_parameter_count(graph)
        nodes = len(graph.graph.node)
    files = [path] + ([path.parent / data_name] if external else [])
    return OnnxInfo(path, files, parameters, sum(f.stat().st_size for f in files), external, nodes, contract)
