"""FLOP counts of one forward pass: of a PyTorch model (FlopCounterMode), or of an exported ONNX graph.

The ONNX count needs nothing but the build's files (bench runs from the artifacts alone): one profiled run of
the unoptimised graph gives every node's actual input and output shapes, from which the matmuls and
convolutions are counted as PyTorch counts them (2 FLOPs per multiply-add; elementwise work not counted)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of PyTorch's fused CPU attention kernel, which FlopCounterMode has no formula for (it would count
    every scaled_dot_product_attention on the CPU as zero): the score and value products, as for the CUDA ones."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model, inputs: dict, temporal: list[str]) -> tuple[int, int]:
    """(total FLOPs of one forward of a PyTorch model, FLOPs inside the listed temporal attention modules)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        model(**inputs)
    per_module = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    inside = sum(sum(per_module.get(prefix + name, {}).values()) for name in temporal)
    return counter.get_total_flops(), inside


def _node_flops(op: str, inputs: list[list[int]], output: list[int], transposed_a: bool) -> int:
    if op == "MatMul":
        return 2 * math.prod(output) * inputs[0][-1]
    if op == "Gemm":
        return 2 * math.prod(output) * (inputs[0][0] if transposed_a else inputs[0][-1])
    if op == "Conv":  # weight [C_out, C_in / groups, *kernel]
        return 2 * math.prod(output) * math.prod(inputs[1][1:])
    if op == "ConvTranspose":  # weight [C_in, C_out / groups, *kernel]: every input position is scattered
        return 2 * math.prod(inputs[0]) * math.prod(inputs[1][1:])
    return 0


COUNTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def _scope(module: str, node_scopes: list[str]) -> str | None:
    """The prefix of ``module``'s nodes: its name, or its name without the leading parts the exporter left out
    (a wrapper's attribute, when the graph was traced from inside it: ``transformer.layers.0.temporal`` is
    ``/layers.0/temporal/...``); the longest that names some node."""
    parts = module.split(".")
    for start in range(len(parts)):
        prefix = ".".join(parts[start:]) + "."
        if any(scope.startswith(prefix) for scope in node_scopes):
            return prefix
    return None


def onnx_flops(onnx_path: Path, feeds: dict[str, np.ndarray], temporal: list[str]) -> tuple[int, int]:
    """(total FLOPs of one run of the ONNX graph on ``feeds``, FLOPs of nodes inside the ``temporal`` modules).

    A node belongs to a module when its name's scope is the module's (the exporter names nodes by module path,
    ``/down_blocks.0/attentions.0/.../attn_temp/to_q/MatMul`` for ``down_blocks.0.attentions.0...attn_temp``)."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    transposed_a = {n.name for n in graph.node if n.op_type == "Gemm"
                    and any(a.name == "transA" and a.i for a in n.attribute)}
    ops = {n.name: n.op_type for n in graph.node if n.op_type in COUNTED_OPS}
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # nodes as exported
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "flops")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    total = inside = 0
    scoped = [n.lstrip("/").replace("/", ".") for n in ops]
    scopes = [_scope(name, scoped) for name in temporal]
    for event in events:
        name = event.get("name", "").removesuffix("_kernel_time")
        if event.get("cat") != "Node" or name not in ops or not event["name"].endswith("_kernel_time"):
            continue
        args = event["args"]
        shapes = [next(iter(s.values())) for s in args["input_type_shape"]]
        output = next(iter(args["output_type_shape"][0].values()))
        flops = _node_flops(ops[name], shapes, output, name in transposed_a)
        total += flops
        if any(scope and name.lstrip("/").replace("/", ".").startswith(scope) for scope in scopes):
            inside += flops
    return total, inside


def joint_attention_pairs(frames: int, tokens_per_frame: int, context: int, window: int | None = None) -> int:
    """Query-key pairs one head of a joint attention scores (each costs 4 * head_dim FLOPs: score and value).

    ``window`` None: the full attention, every pair of the ``context`` text tokens and the video tokens. A
    frame-local (0) or windowed head as ``frame_local_attention`` computes it: text queries still read every
    key; each video query reads the text and the 2w + 1 frame slots around its frame, the slots past the clip's
    ends included (they are computed, then masked)."""
    video = frames * tokens_per_frame
    if window is None:
        return (context + video) ** 2
    return context * (context + video) + video * (context + (2 * window + 1) * tokens_per_frame)


def attention_flops_removed(local: dict[int, int], removed: int, total_heads: int, frames: int,
                            tokens_per_frame: int, context: int, pruned_steps: float = 1.0) -> float:
    """The fraction of a joint-attention model's score and value FLOPs a plan removes: ``local`` maps a window
    to its count of heads, ``removed`` heads cost nothing, the rest are full; ``pruned_steps``: the fraction of
    the denoising steps that run the pruned model (a step schedule)."""
    full = joint_attention_pairs(frames, tokens_per_frame, context)
    saved = removed * full + sum(n * (full - joint_attention_pairs(frames, tokens_per_frame, context, w))
                                 for w, n in local.items())
    return pruned_steps * saved / (total_heads * full)
