"""One full-width CogVideoX-2B block on a GPU: original vs frame-local and window-1 heads, measured / ideal.

At the real sequence (13 latent frames of 60x90 = 17,550 video tokens + 226 text, CFG batch 2), in bf16,
PyTorch SDPA for the full heads: each variant's heads chosen by f3export's plan at ratios 0.5 / 0.75 / 0.9
(uniform scores: which heads does not change the cost), timed with CUDA events (warm-up, then the variants
interleaved; medians with their quartiles), against the ideal FLOP ratio of the same block counted on the meta
device. Then the fp16 accuracy of frame-local attention: the frame-local block in fp16 against itself in fp32,
beside the original block's own fp16 error.

    python benchmarks/gpu_joint_block.py                                  # a GPU, the real shape
    python benchmarks/gpu_joint_block.py --device cpu --dtype float32 --frames 3 --latent 4 6 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from f3export.calibrate import ModuleScores, Scores
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.prune import apply_plan, make_plan
from f3export.recipe import PruningSection

RATIOS = (0.5, 0.75, 0.9)
VARIANTS = {"frame-local": ("frame-local", 0), "window-1": ("temporal-window", 1)}


def pruned(adapter, model, ratio: float, action: str, window: int):
    sites = adapter.structure.temporal_sites(model)
    scores = Scores({s.attention: ModuleScores(s.heads_of(model).heads, s.heads_of(model).head_dim,
                                               {"contribution": [1.0] * s.heads_of(model).heads}) for s in sites},
                    [], 0)
    plan = make_plan(scores, PruningSection(ratio=ratio, action=action, window=max(window, 1)))
    copied = copy.deepcopy(model)
    apply_plan(copied, adapter.structure.temporal_sites(copied), plan.kept_heads, plan.local_heads, plan.window)
    return copied


def flops(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    run()
    return 1000 * (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--latent", type=int, nargs=2, default=[60, 90], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    adapter = get_adapter("cogvideox")
    config = {**adapter.checkpoint.presets["cogvideox-2b"], "num_layers": 1,
              "sample_height": args.latent[0], "sample_width": args.latent[1]}
    shape = VideoShape(args.frames, *args.latent)
    torch.manual_seed(0)
    original = adapter.checkpoint.build(config).eval()
    models = {"original": original, **{f"{name} {ratio}": pruned(adapter, original, ratio, *VARIANTS[name])
                                       for name in VARIANTS for ratio in RATIOS}}
    with torch.device("meta"):
        meta_inputs = adapter.example_inputs(original, shape, batch=2, seed=0)
    counted = {name: flops(copy.deepcopy(m).to("meta"), meta_inputs) for name, m in models.items()}
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype)
              for k, v in adapter.example_inputs(original, shape, batch=2, seed=0).items()}
    tokens = adapter.text_tokens + args.frames * (args.latent[0] // 2) * (args.latent[1] // 2)
    print(f"one CogVideoX-2B block (1920 wide, 30 heads of 64), {tokens} tokens, batch 2, {args.dtype} on {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {args.repeats} interleaved "
          "runs after a warm-up")
    on_device = {name: m.to(device, dtype) for name, m in models.items()}
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in on_device.values():
            model(**inputs)
        for _ in range(args.repeats):
            for name, model in on_device.items():
                times[name].append(timed(lambda model=model: model(**inputs), device))
    base = statistics.median(times["original"])
    print("| heads | ratio | ms (median, quartiles) | measured speedup | ideal (FLOPs) | measured / ideal |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (median, median, median)
        variant, _, ratio = name.partition(" ")
        ideal = counted["original"] / counted[name]
        print(f"| {variant} | {ratio or '-'} | {median:.1f} ({q1:.1f}-{q3:.1f}) | {base / median:.3f}x | "
              f"{ideal:.3f}x | {100 * base / median / ideal:.0f} % |")
    reduced = torch.float16
    with torch.no_grad():
        for name in ("original", "frame-local 0.9"):
            exact = models[name].to(device, torch.float32)(**{k: v.float() if v.is_floating_point() else v
                                                              for k, v in inputs.items()})
            low = models[name].to(device, reduced)(**{k: v.to(reduced) if v.is_floating_point() else v
                                                      for k, v in inputs.items()})
            error = ((low.float() - exact).norm() / exact.norm()).item()
            print(f"fp16 vs fp32, {name}: rel. L2 {error:.2e}, finite {bool(torch.isfinite(low).all())}")


if __name__ == "__main__":
    main()
