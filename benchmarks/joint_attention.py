"""Frame-local heads in joint 3D attention: FLOPs at the real model's real shape, and measured ONNX Runtime speed.

1. ``--meta``: CogVideoX-2B (and Wan 2.1 1.3B) built on the meta device, shapes only, counted with
   FlopCounterMode at their real shape (CogVideoX-2B: 13 latent frames of 60x90, 226 text tokens, CFG batch 2;
   Wan 2.1: 21 latent frames of 60x104, 512 text tokens), original and with the ratio's heads frame-local:
   attention's share of the FLOPs and the ideal speedup.
2. ``--measure``: full-width proxy layers (CogVideoX-2B blocks: width 1920, 30 heads of 64, random weights) at
   13 frames and a spatial size this machine runs, exported by f3export and timed in ONNX Runtime (CPU,
   spinning off), original and pruned runs interleaved; medians with their spread, against the ideal
   speedup counted on the same proxy at the same shape.

    python benchmarks/joint_attention.py --meta
    python benchmarks/joint_attention.py --measure --layers 1 --latent 32 48 --repeats 9 [--window 1]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch.utils.flop_counter import FlopCounterMode

from f3export.calibrate import ModuleScores, Scores
from f3export.export import export_onnx
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.prune import apply_plan, make_plan
from f3export.recipe import PruningSection

RATIOS = (0.5, 0.75, 0.9)
WINDOWS = (0, 1, 2)  # frames on each side the pruned heads read (0: frame-local)
REAL_SHAPES = {"cogvideox": ("cogvideox-2b", VideoShape(13, 60, 90)), "wan": ("wan2.1-1.3b", VideoShape(21, 60, 104))}


def frame_local(adapter, model, ratio: float, window: int = 0):
    """``model`` with the ratio's heads frame-local (``window`` > 0: windowed); which heads does not change the
    count, so uniform scores."""
    sites = adapter.structure.temporal_sites(model)
    scores = Scores({s.attention: ModuleScores(s.heads_of(model).heads, s.heads_of(model).head_dim,
                                               {"contribution": [1.0] * s.heads_of(model).heads}) for s in sites},
                    [], 0)
    action = "temporal-window" if window else "frame-local"
    plan = make_plan(scores, PruningSection(ratio=ratio, action=action, window=max(window, 1)))
    pruned = copy.deepcopy(model)
    apply_plan(pruned, adapter.structure.temporal_sites(pruned), plan.kept_heads, plan.local_heads, plan.window)
    return pruned


def counted(adapter, config: dict, shape: VideoShape, batch: int, window: int = 0) -> dict[float, tuple[int, int]]:
    """Per ratio (0 = the original), the FLOPs of one forward and those of its attention, counted on the meta
    device (shapes only; attention runs as batched matmuls there, the projections as addmm)."""
    with torch.device("meta"):
        original = adapter.checkpoint.build(config).eval()
        inputs = adapter.example_inputs(original, shape, batch=batch, seed=0)
    result = {}
    for ratio in (0.0, *RATIOS):
        model = frame_local(adapter, original, ratio, window) if ratio else original
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
        counts = counter.get_flop_counts()["Global"]
        result[ratio] = (counter.get_total_flops(), sum(n for op, n in counts.items() if str(op) == "aten.bmm"))
    return result


def meta_counts() -> None:
    print("| model | shape (latent frames x h x w, text) | window | ratio | TFLOPs per forward (CFG batch 2) "
          "| attention share | ideal speedup |")
    print("|---|---|---|---|---|---|---|")
    for family, (preset, shape) in REAL_SHAPES.items():
        adapter = get_adapter(family)
        label = f"{shape.frames} x {shape.latent_height} x {shape.latent_width}, {adapter.text_tokens}"
        for window in WINDOWS:
            counts = counted(adapter, adapter.checkpoint.presets[preset], shape, batch=2, window=window)
            for ratio, (total, attention) in counts.items():
                print(f"| {preset} | {label} | {window} | {ratio:g} | {total / 1e12:.1f} "
                      f"| {100 * attention / total:.1f} % | {counts[0.0][0] / total:.3f}x |", flush=True)


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # paired timing on few cores
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(layers: int, latent: tuple[int, int], repeats: int, window: int = 0) -> None:
    adapter = get_adapter("cogvideox")
    config = {**adapter.checkpoint.presets["cogvideox-2b"], "num_layers": layers,
              "sample_height": latent[0], "sample_width": latent[1]}
    torch.manual_seed(0)
    original = adapter.checkpoint.build(config).eval()
    shape = VideoShape(13, *latent)
    spec = adapter.export_spec(original, shape, batch=1, dynamic=[], seed=0)
    feeds = {name: t.numpy() for name, t in spec.inputs.items()}
    tokens = adapter.text_tokens + 13 * (latent[0] // 2) * (latent[1] // 2)
    print(f"proxy: {layers} CogVideoX-2B block(s) at full width, 13 frames of {latent[0]}x{latent[1]} latents "
          f"({tokens} tokens), batch 1; ONNX Runtime {onnxruntime.__version__} CPU, {repeats} interleaved runs")
    counts = counted(adapter, config, shape, batch=1, window=window)
    print(f"heads {'frame-local' if not window else f'reading {window} frame(s) on each side'}")
    print("| ratio | ideal speedup | original ms (median, min-max) | pruned ms (median, min-max) | measured speedup "
          "(median of paired runs, quartiles) | measured / ideal |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        base_session = session(export_onnx(original, spec, Path(folder) / "original.onnx", 17, "auto").path)
        for ratio in RATIOS:
            pruned = frame_local(adapter, original, ratio, window)
            ideal = counts[0.0][0] / counts[ratio][0]
            expected = pruned(**spec.inputs).numpy()
            pruned_session = session(export_onnx(pruned, spec, Path(folder) / f"pruned-{ratio}.onnx", 17, "auto").path)
            del pruned  # one pruned model in memory at a time, beside the original's session
            got = pruned_session.run(None, feeds)[0]
            assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
            times = {"original": [], "pruned": []}
            base_session.run(None, feeds)  # warm-up
            for _ in range(repeats):
                for name, s in (("original", base_session), ("pruned", pruned_session)):
                    start = time.perf_counter()
                    s.run(None, feeds)
                    times[name].append(1000 * (time.perf_counter() - start))
            a, b = (statistics.median(times[n]) for n in ("original", "pruned"))
            spread = lambda n: f"{min(times[n]):.0f}-{max(times[n]):.0f}"
            # each run of the original against the pruned run right after it: a slow moment of the machine
            # slows both, so the paired ratios spread less than either model's times
            paired = [o / q for o, q in zip(times["original"], times["pruned"])]
            low, median, high = statistics.quantiles(paired, n=4)
            print(f"| {ratio} | {ideal:.3f}x | {a:.0f} ({spread('original')}) | {b:.0f} ({spread('pruned')}) "
                  f"| {median:.3f}x ({low:.3f}-{high:.3f}) | {100 * median / ideal:.0f} % |", flush=True)
            del pruned_session
            gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta", action="store_true", help="FLOPs at the real models' real shapes")
    parser.add_argument("--measure", action="store_true", help="ONNX Runtime timings of full-width proxy layers")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--latent", type=int, nargs=2, default=[32, 48], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--window", type=int, default=0, help="--measure: frames on each side (0: frame-local)")
    args = parser.parse_args()
    if args.meta:
        meta_counts()
    if args.measure:
        with torch.no_grad():
            measure(args.layers, tuple(args.latent), args.repeats, args.window)


if __name__ == "__main__":
    main()
