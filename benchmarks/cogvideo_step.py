"""Tokens per second of CogVideo's KV-cache step engine, original vs temporal heads pruned, at the real width.

CogVideo's 48-layer model (3072 wide, 48 heads of 64, 64 text slots + 5 frames of 400 tokens) does not fit
this machine twice over, so the `full` preset is cut to ``--layers`` layers (every layer costs the same; the
vocabulary's text rows are trimmed to 10, which are only gathered, never multiplied: the 20,000 image rows
of the logits stay). Weights are seeded random (speed does not depend on their values). The pruned model keeps
``--keep`` of each layer's 48 temporal heads (F3's removal; which heads does not change the cost).

Each engine (ONNX Runtime, CPU, the build's `extended` level) runs single-token steps at several cache
lengths: a step at position p attends p + 1 keys in the temporal channel, the text and its own frame in the
spatial one. For comparison, the full-sequence engine (training's forward) costs one forward of the whole
sequence per sampled token without a cache. Two ideals: the ratio of counted FLOPs
(``token_sampling.step_flops``), and the ratio of bytes a step must read (weights and the caches), which
bounds a single-token step on a machine whose memory, not its arithmetic, is the limit.

    python benchmarks/cogvideo_step.py --layers 2 --keep 24 --steps 30
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
import torch

from f3export.engines.onnxruntime import OnnxRuntimeBackend
from f3export.export import export_onnx
from f3export.models import get_adapter
from f3export.models.base import ExportSpec, VideoShape
from f3export.models.cogvideo_stage1.incremental import CogVideoStep, cache_heads, cache_names, step_axes, step_inputs
from f3export.models.cogvideo_stage1.network import SamplingTerms, TemporalChannelHeads
from f3export.token_sampling import Layout, step_flops

TERMS = SamplingTerms(1.4, 1.4, True)


def build(layers: int, keep: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    adapter = get_adapter("cogvideo")
    preset = {**adapter.checkpoint.presets["full"], "num_layers": layers, "vocab_size": 20010, "boi_token_id": 20005}
    torch.manual_seed(0)
    original = adapter.checkpoint.build(preset).eval()
    pruned = copy.deepcopy(original)
    for layer in pruned.transformer.layers:
        TemporalChannelHeads(layer.temporal).keep(list(range(keep)))
    return original, pruned


def interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` times, the runs taking turns (after one warm-up each)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def spread(times: list[float]) -> str:
    low, median, high = np.percentile(times, [10, 50, 90])
    return f"{median * 1e3:.1f} ms (p10-p90 {low * 1e3:.1f}-{high * 1e3:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep", type=int, default=24, help="temporal heads kept per layer (of 48)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per cache length")
    parser.add_argument("--full-repeats", type=int, default=3, help="timed full-sequence forwards")
    parser.add_argument("--positions", type=int, nargs="+", default=[464, 1264, 2063],
                        help="positions of the timed token (frame 1's BOI, frame 3's, the last)")
    args = parser.parse_args()
    original, pruned = build(args.layers, args.keep)
    c = original.config
    layout = Layout(c.text_len, c.frame_len, c.boi_token_id, c.image_vocab_size, c.max_frames, c.vocab_size)
    backend = OnnxRuntimeBackend("cpu", "extended")
    shape = VideoShape(c.max_frames, c.frame_resolution, c.frame_resolution)
    rows = get_adapter("cogvideo").example_inputs(original, shape, 1, seed=0)
    tokens, text_len = rows["tokens"], rows["text_len"]
    print(f"CogVideo step engine: {args.layers} of 48 layers at width {c.hidden_size} ({c.num_attention_heads} heads "
          f"of {c.hidden_size // c.num_attention_heads}), temporal heads kept {args.keep} of 48 per layer; "
          f"ONNX Runtime {backend.versions()['onnxruntime']} CPU, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        models = {"original": original, "pruned": pruned}

        def engine(name: str, model: torch.nn.Module, spec: ExportSpec):
            onnx_path = Path(folder) / f"{name}.onnx"
            export_onnx(model, spec, onnx_path, 17, "auto")
            engine_path = Path(folder) / backend.engine_name(onnx_path)
            backend.build(onnx_path, engine_path)
            return backend.load(engine_path)

        # Both engines loaded, their runs interleaved: the machine's drift falls on both alike.
        steps = {name: engine(f"step.{name}", CogVideoStep(model), ExportSpec(
                     step_inputs(model, tokens, text_len, c.text_len + 3, 2, TERMS),
                     ["logits", *cache_names(model, "present")], step_axes(model)))
                 for name, model in models.items()}
        head_dim = c.hidden_size // c.num_attention_heads
        results = {name: {} for name in models}
        for position in args.positions:
            feeds = {}
            for name, model in models.items():
                past = {n: np.random.default_rng(0).standard_normal((1, 2, heads, position, head_dim),
                                                                    dtype=np.float32)
                        for n, heads in zip(cache_names(model, "past"),
                                            [h for pair in cache_heads(model) for h in pair if h])}
                feeds[name] = {"tokens": tokens[:, position:position + 1].numpy(), "text_len": text_len.numpy(),
                               "text_weights": np.array([1.4, 1.4], np.float32),
                               "frame0_temporal": np.array([True]), **past}
            for name, times in interleaved({n: (lambda n=n: steps[n].run(feeds[n])) for n in models},
                                           args.steps).items():
                results[name][position] = times
        steps.clear()  # free both sessions before the full-sequence engines
        heads = {name: (cache_heads(model), c.hidden_size // c.num_attention_heads) for name, model in models.items()}
        weights = {name: 4 * sum(p.numel() for n, p in model.named_parameters() if "word_embeddings.text" not in n)
                   for name, model in models.items()}

        def read(name: str, position: int) -> float:
            """Bytes a step at ``position`` reads: every weight it multiplies by, and the caches it attends."""
            rows = sum(spatial + temporal for spatial, temporal in heads[name][0])
            return weights[name] + 4 * 2 * rows * heads[name][1] * position

        print(f"\n{'position':>9} | {'original step':>34} | {'pruned step':>34} | speedup (median) | ideal: FLOPs, "
              "bytes read")
        for position in args.positions:
            times = {name: results[name][position] for name in ("original", "pruned")}
            flops = {name: step_flops(*heads[name], layout, range(position, position + 1)) for name in times}
            pairs = [o / q for o, q in zip(times["original"], times["pruned"])]  # the runs took turns
            ratio = statistics.median(pairs)
            print(f"{position:>9} | {spread(times['original']):>34} | {spread(times['pruned']):>34} | "
                  f"{ratio:>15.3f}x | {flops['original'] / flops['pruned']:.3f}x "
                  f"({flops['original'] / 1e9:.3f} -> {flops['pruned'] / 1e9:.3f} GFLOP), "
                  f"{read('original', position) / read('pruned', position):.3f}x "
                  f"({read('original', position) / 2**20:.0f} -> {read('pruned', position) / 2**20:.0f} MiB)")
            low, high = np.percentile(pairs, [10, 90])
            print(f"{'':>9} | tokens/s: original {1 / statistics.median(times['original']):.2f}, "
                  f"pruned {1 / statistics.median(times['pruned']):.2f}; speedup of paired runs p10-p90 "
                  f"{low:.3f}-{high:.3f}x")
        # The full-sequence engine, training's forward over the whole sequence: one engine at a time (two
        # sessions' activations at 2,064 tokens do not fit 24 GB beside the models).
        print(f"\nfull-sequence engine, one forward of {tokens.shape[1]} tokens (the cost of each sampled token "
              "without a cache):", flush=True)
        feed = {"tokens": tokens.numpy(), "text_len": text_len.numpy()}
        for name, model in models.items():
            full = engine(f"full.{name}", model, ExportSpec({"tokens": tokens, "text_len": text_len}, ["logits"], {}))
            print(f"  {name}: {spread(interleaved({name: lambda: full.run(feed)}, args.full_repeats)[name])}",
                  flush=True)
            full = None
            gc.collect()
        whole = range(c.text_len, c.text_len + c.max_frames * c.frame_len)
        flops = {name: step_flops(*heads[name], layout, whole) for name in ("original", "pruned")}
        print(f"a whole video ({len(whole)} steps): {flops['original'] / 1e12:.3f} -> {flops['pruned'] / 1e12:.3f} "
              f"TFLOP in steps, ideal speedup {flops['original'] / flops['pruned']:.3f}x")


if __name__ == "__main__":
    main()
