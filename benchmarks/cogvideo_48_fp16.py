"""The real 48-layer CogVideo (7.72 B parameters) exported to ONNX in fp16 with external data, on a machine
with less memory than its fp32 weights (31 GB), and checked against PyTorch on a slice that runs here.

    python benchmarks/cogvideo_48_fp16.py --out artifacts/cogvideo-48-fp16    # about 20 min, 16 GB of disk

1. The `full` preset is made directly in fp16 (seeded random weights: this machine has no CogVideo checkpoint;
   a real one loads the same way from its folder): 15.4 GB.
2. The original is exported (fp16, external data) with f3export's exporter, which writes the weights one at a
   time from the model (`export.py`); `onnx.checker` checks it by path.
3. Every temporal channel is removed in place (ratio 1: the plan of any ranking), and the pruned model exported.
4. Each file is checked numerically on a slice: the graph up to the output of transformer layer K (extracted
   from the weightless graph, so that ONNX Runtime maps only the weights the slice reads) against the same
   PyTorch forward stopped there, fp16 on both sides.

Parameter counts are compared with the meta-device figures (a skeleton, no weights). Engines and full
validation of this model need a GPU machine: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from f3export.export import export_onnx, onnx_parameter_count
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.models.memory import peak_rss_mib, reset_peak_rss
from f3export.prune import apply_plan, parameter_count


class Stop(Exception):
    """Raised by a forward hook to end a forward once the slice's last layer has run."""


def torch_slice(model: torch.nn.Module, inputs: dict[str, torch.Tensor], layers: int) -> np.ndarray:
    """The hidden state leaving transformer layer ``layers - 1``, from the model's own forward."""
    captured = []

    def hook(module, args, output):
        captured.append(output.detach().float().numpy())
        raise Stop

    handle = model.transformer.layers[layers - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(*inputs.values())
    except Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def onnx_slice(path: Path, inputs: dict[str, torch.Tensor], layers: int) -> np.ndarray:
    """The same tensor from the exported file: the subgraph up to it, its weights read from the file's data."""
    graph = onnx.load(str(path), load_external_data=False)
    inside, after = f"/layers.{layers - 1}/", f"/layers.{layers}/"  # node names carry the module scope
    produced = {out for node in graph.graph.node if inside in node.name for out in node.output}
    boundary = sorted({name for node in graph.graph.node if after in node.name
                       for name in node.input if name in produced})
    assert len(boundary) == 1, f"expected one tensor from layer {layers - 1} into layer {layers}, found {boundary}"
    piece = onnx.utils.Extractor(graph).extract_model(list(inputs), boundary)
    piece_path = path.with_name(f"{path.stem}.first-{layers}-layers.onnx")  # beside the data it refers to
    onnx.save_model(piece, str(piece_path))
    try:
        session = ort.InferenceSession(str(piece_path), providers=["CPUExecutionProvider"])
        return session.run(None, {name: t.numpy() for name, t in inputs.items()})[0].astype(np.float32)
    finally:
        piece_path.unlink()


def export_and_check(model, spec, path: Path, layers: int, keep: bool) -> dict:
    """Export, check and (unless ``keep``) remove the files again: the two exports need not fit on disk together."""
    reset_peak_rss()
    start = time.perf_counter()
    info = export_onnx(model, spec, path, opset=17, external_data="always")
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    onnx.checker.check_model(str(path), full_check=True)  # by path: the external data's references too
    counted = onnx_parameter_count(onnx.load(str(path), load_external_data=False))
    expected = torch_slice(model, spec.inputs, layers)
    actual = onnx_slice(path, spec.inputs, layers)
    error = np.abs(actual - expected)
    sizes = {f.name: f.stat().st_size for f in info.files}
    if not keep:
        for file in info.files:
            file.unlink()
    return {"seconds": round(seconds, 1), "peak_rss_mib": peak, "parameters_torch": parameter_count(model),
            "parameters_onnx": counted, "bytes": sizes,
            "slice": {"layers": layers, "shape": list(expected.shape), "max_abs": float(error.max()),
                      "rel_l2": float(np.linalg.norm(actual - expected) / np.linalg.norm(expected)),
                      "reference_max_abs": float(np.abs(expected).max())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/cogvideo-48-fp16"))
    parser.add_argument("--preset", default="full")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--check-layers", type=int, default=2, help="layers in the numeric slice (K)")
    parser.add_argument("--keep", action="store_true", help="keep the ONNX files (else each is removed once checked)")
    args = parser.parse_args()
    adapter = get_adapter("cogvideo", {})
    config = adapter.checkpoint.presets[args.preset]
    with torch.device("meta"):
        skeleton = adapter.checkpoint.build(config)
    meta_before = parameter_count(skeleton)
    apply_plan(skeleton, adapter.structure.temporal_sites(skeleton),
               {s.attention: [] for s in adapter.structure.temporal_sites(skeleton)})
    meta_after = parameter_count(skeleton)

    reset_peak_rss()
    start = time.perf_counter()
    torch.set_default_dtype(torch.float16)  # every weight is made in fp16: 15.4 GB, never 31
    try:
        model = adapter.checkpoint.load_preset(args.preset, seed=0).model
    finally:
        torch.set_default_dtype(torch.float32)
    made = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": peak_rss_mib(),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    print(f"made {args.preset} in fp16: {made}", flush=True)
    spec = adapter.export_spec(model, VideoShape(args.frames, 20, 20), batch=1, dynamic=["batch"])
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"preset": args.preset, "layers": config["num_layers"], "frames": args.frames, "made": made,
               "meta_parameters": {"original": meta_before, "pruned": meta_after}}
    results["original"] = export_and_check(model, spec, args.out / "original.onnx", args.check_layers, args.keep)
    print(f"original: {results['original']}", flush=True)
    sites = adapter.structure.temporal_sites(model)
    apply_plan(model, sites, {site.attention: [] for site in sites})  # ratio 1, in place: no second copy
    results["pruned"] = export_and_check(model, spec, args.out / "pruned.onnx", args.check_layers, args.keep)
    print(f"pruned: {results['pruned']}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
