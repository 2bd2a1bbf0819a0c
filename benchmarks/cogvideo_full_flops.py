"""Parameters and FLOPs of the 48-layer CogVideo `full` preset, original and with every temporal channel removed.

The full model's 31 GB of fp32 weights do not fit this benchmark machine, so it is built on PyTorch's meta
device: shapes only, no memory, exact counts (FlopCounterMode counts matmuls and attention from shapes).

    python benchmarks/cogvideo_full_flops.py --frames 2 5
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from f3export.calibrate import ModuleScores, Scores
from f3export.models import get_adapter
from f3export.prune import apply_plan, make_plan, parameter_count
from f3export.recipe import PruningSection


def forward_flops(model: torch.nn.Module, length: int) -> int:
    tokens = torch.zeros(1, length, dtype=torch.long, device="meta")
    text_len = torch.full((1,), model.config.text_len, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, text_len)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[2, 5])
    args = parser.parse_args()
    adapter = get_adapter("cogvideo")
    with torch.device("meta"):
        original = adapter.checkpoint.build(adapter.checkpoint.presets["full"])
    sites = adapter.structure.temporal_sites(original)
    # Ratio 1 removes every head whatever the scores, so uniform scores stand in for a calibration.
    scores = Scores({s.attention: ModuleScores(48, 64, {"contribution": [1.0] * 48}) for s in sites}, [], 0)
    pruned = copy.deepcopy(original)
    plan = make_plan(scores, PruningSection(ratio=1.0))
    apply_plan(pruned, adapter.structure.temporal_sites(pruned), plan.kept_heads)
    before, after = parameter_count(original), parameter_count(pruned)
    print(f"parameters: {before:,} -> {after:,} (removed {before - after:,} = {100 * (before - after) / before:.2f} %)")
    config = original.config
    for frames in args.frames:
        length = config.text_len + frames * config.frame_len
        full, cut = forward_flops(original, length), forward_flops(pruned, length)
        print(f"{frames} frames ({length} tokens): {full / 1e12:.3f} -> {cut / 1e12:.3f} TFLOPs per forward, "
              f"ideal speedup {full / cut:.4f}x")


if __name__ == "__main__":
    main()
