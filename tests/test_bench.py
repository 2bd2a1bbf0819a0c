"""`f3export bench` runs on a finished build and writes the fields the README promises (no timing asserts)."""

from __future__ import annotations

import json
import shutil

import torch
from click.testing import CliRunner

from f3export.flops import count_flops
from f3export.cli import main
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.prune import apply_plan

TAV_ADAPTER = get_adapter("tune-a-video")



def test_bench_writes_latency_flops_sizes_and_a_ratio_sweep(built, tmp_path):
    _, root, _ = built
    work = tmp_path / "fast"
    shutil.copytree(root, work)
    result = CliRunner().invoke(main, ["bench", str(work), "--runs", "2", "--warmup", "1", "--ratios", "0,1"])
    assert result.exit_code == 0, result.output
    bench = json.loads((work / "bench.json").read_text())
    models = bench["models"]
    assert models["original"]["flops"] > models["pruned"]["flops"] > 0
    assert 0 < bench["temporal_flops_share"] < 1
    assert bench["ideal_speedup"] == models["original"]["flops"] / models["pruned"]["flops"]
    removed = models["original"]["parameters"] - models["pruned"]["parameters"]
    assert models["original"]["weight_bytes"] - models["pruned"]["weight_bytes"] == removed * 4
    ort = bench["backends"]["onnxruntime"]
    for variant in ("original", "pruned"):
        assert ort["latency_per_step"][variant]["runs"] == 2 and ort["latency_per_step"][variant]["median_ms"] > 0
        assert ort["peak_memory_mb"][variant]["peak_mb"] >= ort["peak_memory_mb"][variant]["baseline_mb"] > 0
        assert ort["trajectory_ms"][variant] == ort["latency_per_step"][variant]["median_ms"] * bench["steps"]
    assert {"measured_speedup", "measured_over_ideal", "gain_fraction", "engine_bytes"} <= set(ort)
    assert [r["ratio"] for r in bench["ratios"]] == [0.0, 1.0]
    assert bench["ratios"][0]["ideal_speedup"] == 1.0 and bench["ratios"][1]["removed_heads"] == 28 * 2
    assert (work / "bench.png").stat().st_size > 10_000


def test_bench_refuses_ratios_outside_zero_one(built):
    _, root, _ = built
    result = CliRunner().invoke(main, ["bench", str(root), "--ratios", "0.5,2"])
    assert result.exit_code == 2 and "ratios lie in [0, 1]" in result.output


def test_flops_are_counted_where_a_diffusers_temporal_attention_lost_every_head():
    """A Latte whose temporal attention is pruned away (RemovedAttention) is counted like any model: torch's
    module tracker refused the parameter view it returned (bench and sweep failed at ratio 1)."""
    adapter = get_adapter("latte")
    bundle = adapter.checkpoint.load_preset("tiny", 0)
    sites = adapter.structure.temporal_sites(bundle.model)
    spec = adapter.export_spec(bundle.model, VideoShape(8, 16, 16), 2, [], seed=1)
    total, temporal = count_flops(bundle.model, spec.inputs, [s.attention for s in sites])
    apply_plan(bundle.model, sites, {s.attention: [] for s in sites})
    pruned_total, pruned_temporal = count_flops(bundle.model, spec.inputs, [s.attention for s in sites])
    assert temporal > 0 and pruned_temporal == 0 and pruned_total == total - temporal


def test_the_fused_cpu_attention_kernel_is_counted_as_its_score_and_value_products():
    """FlopCounterMode has no formula for PyTorch's CPU flash-attention kernel and would count it as zero."""
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 96, 8), torch.randn(1, 2, 96, 8)
    total, _ = count_flops(Attend(), {"q": q, "k": k, "v": v}, [])
    assert total == 2 * (2 * 2 * 64 * 96 * 8)  # q k^T and p v: 2 FLOPs per multiply-add, 2 heads


def test_flops_counted_on_the_onnx_graphs_equal_pytorchs_count_of_the_models(built):
    """Bench counts on the exported graphs (it needs no source checkpoint): the same numbers as FlopCounterMode."""
    from f3export.flops import onnx_flops
    from f3export.prune import load_pruned
    from f3export.validate import load_goldens

    _, root, _ = built
    temporal = list(json.loads((root / "plan.json").read_text())["heads"])
    inputs, _ = load_goldens(root / "goldens" / "original.npz")[0]
    original = TAV_ADAPTER.checkpoint.load_preset("tiny", 0).model
    models = {"original": original, "pruned": load_pruned(root / "pruned")[2]}
    for variant, model in models.items():
        expected = count_flops(model, {k: torch.from_numpy(v) for k, v in inputs.items()}, temporal)
        assert onnx_flops(root / "onnx" / f"{variant}.onnx", inputs, temporal) == expected, variant
        assert 0 < expected[1] < expected[0]
