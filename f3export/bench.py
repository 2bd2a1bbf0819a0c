"""``f3export bench``: speed, size and memory of the original vs the pruned model, against the limit.

The limit is the FLOP count: matmuls, convolutions and attention of one
forward pass at the benchmarked shape (PyTorch's FlopCounterMode), so the
ideal speedup of pruning is FLOPs(original) / FLOPs(pruned). Latency is
measured on the built engines with the same inputs, warm-up, and interleaved
runs (original and pruned alternate, in alternating order), reported as
median and quartiles. One forward at the CFG batch is one denoising step; a
trajectory is ``steps`` of them. Peak memory is the resident set of a fresh
process that loads the engine and runs it once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .artifacts import MODEL_VARIANTS, StageRecord, open_build, write_json
from .build import Build
from .engines import make_backend
from .engines.onnxruntime import OnnxRuntimeBackend
from .models import get_adapter
from .models.base import ModelAdapter, VideoShape
from .prune import load_pruned, parameter_count
from .recipe import PruningSection
from .report import console, progress, table
from .stages import STAGES, SourceModel, StageContext

# What a ratio sweep runs per ratio: the build's own stages from the plan to the engine.
RATIO_STAGES = [stage for stage in STAGES if stage.name in ("plan", "prune", "export", "engine")]


@dataclass(frozen=True)
class Latency:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Latency":
        ms = np.asarray(seconds) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 25)), float(np.percentile(ms, 75)),
                   float(ms.min()), len(ms))


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of PyTorch's fused CPU attention kernel, which FlopCounterMode has no formula for (it would count
    every scaled_dot_product_attention on the CPU as zero): the score and value products, as for the CUDA ones."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor], temporal: list[str]) -> tuple[int, int]:
    """(total FLOPs of one forward, FLOPs inside the listed temporal attention modules)."""
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        model(**inputs)
    per_module = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    inside = sum(sum(per_module.get(prefix + name, {}).values()) for name in temporal)
    return counter.get_total_flops(), inside


def interleaved_latency(engines: dict[str, Any], feeds: dict[str, np.ndarray], warmup: int, runs: int,
                        label: str) -> dict[str, Latency]:
    """Time engines on the same inputs, alternating which goes first, after warm-up runs."""
    names = list(engines)
    for _ in range(warmup):
        for name in names:
            engines[name].run(feeds)
    times: dict[str, list[float]] = {name: [] for name in names}
    with progress() as bar:
        task = bar.add_task(label, total=runs * len(names))
        for i in range(runs):
            for name in (names if i % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                engines[name].run(feeds)
                times[name].append(time.perf_counter() - start)
                bar.advance(task)
    return {name: Latency.of(t) for name, t in times.items()}


_PEAK_SCRIPT = """
import json, sys
import numpy as np
from pathlib import Path
from f3export.artifacts import open_build
from f3export.engines import make_backend
from f3export.models.memory import peak_rss_mib  # VmHWM: this process's own (ru_maxrss survives exec)

recipe = open_build(Path(sys.argv[1])).recipe
feeds = dict(np.load(sys.argv[4]))
base = peak_rss_mib()
engine = make_backend(sys.argv[2], recipe, Path(sys.argv[1])).load(Path(sys.argv[3]))
engine.run(feeds)
print(json.dumps({"baseline_mb": base, "peak_mb": peak_rss_mib()}))
"""


def peak_memory(root: Path, backend: str, engine_path: Path, feeds_path: Path) -> dict[str, float]:
    """Peak resident memory of a fresh process that loads one engine and runs it once (MiB)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(root), backend, str(engine_path),
                           str(feeds_path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bytes_with_data(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class Bench:
    def __init__(self, root: Path, runs: int, warmup: int):
        self.root = root
        # Timing a build that failed its gates, or whose files changed, would publish numbers for a wrong engine.
        self.build = open_build(root)
        self.build.verify_files()
        self.recipe = self.build.recipe
        self.manifest = self.build.doc
        model = self.recipe.model
        self.adapter: ModelAdapter = get_adapter(model.family, model.adapter_options)
        self.shape = VideoShape(model.frames, model.latent_height, model.latent_width)
        self.runs, self.warmup = runs, warmup
        self._ort = OnnxRuntimeBackend(self.recipe.engine.device, self.recipe.engine.optimization_level)

    def run(self, ratios: list[float] | None) -> dict[str, Any]:
        source = Build(self.recipe).model  # the same loading and checks as the build
        original = source.bundle.model
        _, _, pruned = load_pruned(self.root / "pruned")
        temporal = [s.attention for s in self.adapter.structure.temporal_sites(original)]
        # The recipe's dynamic axes, so engines built for the sweep match the built ones graph for graph.
        spec = self.adapter.export_spec(original, self.shape, self.recipe.export.batch,
                                        self.recipe.export.dynamic_axes, seed=123)
        feeds = {k: v.numpy() for k, v in spec.inputs.items()}
        feeds_path = self.root / "bench" / "inputs.npz"
        feeds_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(feeds_path, **feeds)

        flops = {}
        for variant, model in (("original", original), ("pruned", pruned)):
            total, inside = count_flops(model, spec.inputs, temporal)
            flops[variant] = {"flops": total, "temporal_flops": inside, "parameters": parameter_count(model)}
        exported = self.manifest["stages"]["export"]["data"]
        for variant in MODEL_VARIANTS:
            onnx_path = self.build.path(exported[variant]["path"], f"stages.export.data.{variant}.path")
            data_path = onnx_path.with_name(onnx_path.name + ".data")
            flops[variant].update({"onnx_parameters": exported[variant]["parameters"],
                                   "onnx_bytes_on_disk": exported[variant]["bytes"],
                                   "onnx_external_data_bytes": data_path.stat().st_size if data_path.exists() else 0,
                                   "weight_bytes": exported[variant]["parameters"] * 4})
        ideal = flops["original"]["flops"] / flops["pruned"]["flops"]
        result: dict[str, Any] = {
            "shape": {"batch": self.recipe.export.batch, **vars(self.shape)},
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.is_available()},
            "steps": self.adapter.protocol.calls(self.recipe.validation),
            "ratio": self.manifest["stages"]["plan"]["data"].get("ratio", self.recipe.pruning.ratio),
            "models": flops,
            "temporal_flops_share": flops["original"]["temporal_flops"] / flops["original"]["flops"],
            "ideal_speedup": ideal,
            "backends": {},
        }
        engines_by_backend: dict[str, dict[str, Path]] = {}
        for entry in self.build.engines.values():
            engines_by_backend.setdefault(entry.backend, {})[entry.variant] = entry.path
        for backend_name, paths in engines_by_backend.items():
            backend = make_backend(backend_name, self.recipe, self.root)
            engines = {v: backend.load(paths[v]) for v in MODEL_VARIANTS}
            latency = interleaved_latency(engines, feeds, self.warmup, self.runs, backend_name)
            del engines  # full-size engines are GBs each: hold only what is being timed
            measured = latency["original"].median_ms / latency["pruned"].median_ms
            result["backends"][backend_name] = {
                "latency_per_step": {v: vars(latency[v]) for v in MODEL_VARIANTS},
                "trajectory_ms": {v: latency[v].median_ms * result["steps"] for v in MODEL_VARIANTS},
                "engine_bytes": {v: _bytes_with_data(paths[v]) for v in MODEL_VARIANTS},
                "peak_memory_mb": {v: peak_memory(self.root, backend_name, paths[v],
                                                  feeds_path) for v in MODEL_VARIANTS},
                "measured_speedup": measured,
                "measured_over_ideal": measured / ideal,
                "gain_fraction": (measured - 1) / (ideal - 1) if ideal > 1 else None,
            }
        if torch.cuda.is_available():
            result["backends"]["torch-cuda"] = self._torch_cuda(original, pruned, spec.inputs, ideal)
        if ratios:
            del pruned
            rows = self.export_ratios(source, spec, ratios)
            del original, source  # timing needs only the engines; a full-size model in memory would crowd them
            result["ratios"] = self.time_ratios(rows, feeds)
        write_json(self.root / "bench.json", result)
        return result

    def _torch_cuda(self, original, pruned, inputs, ideal) -> dict[str, Any]:
        class TorchEngine:
            def __init__(self, model):
                self.model = model.cuda()
                self.inputs = {k: v.cuda() for k, v in inputs.items()}

            @torch.no_grad()
            def run(self, _feeds):
                self.model(**self.inputs)
                torch.cuda.synchronize()

        engines = {"original": TorchEngine(copy.deepcopy(original)), "pruned": TorchEngine(copy.deepcopy(pruned))}
        latency = interleaved_latency(engines, {}, self.warmup, self.runs, "torch-cuda")
        measured = latency["original"].median_ms / latency["pruned"].median_ms
        return {"latency_per_step": {v: vars(latency[v]) for v in MODEL_VARIANTS},
                "measured_speedup": measured, "measured_over_ideal": measured / ideal}

    def pruned_engine(self, source: SourceModel, pruning: PruningSection, folder: Path) -> StageContext:
        """The build's stages from plan to engine with other [pruning] values (the same scores), for the pruned
        model alone, in ``folder`` (not cached: a sweep's folders are scratch)."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / "scores.json", folder / "scores.json")
        recipe = dataclasses.replace(self.recipe, pruning=pruning)
        context = StageContext(recipe, self.adapter, folder, source, [self._ort], variants=("pruned",))
        for stage in RATIO_STAGES:
            _, data = stage.run(context)
            context.records[stage.name] = StageRecord(key="", files={}, data=data)
        return context

    def export_ratios(self, source: SourceModel, spec, ratios: list[float]) -> list[dict[str, Any]]:
        """Prune at each ratio (same scores), count FLOPs, export and build an ONNX Runtime engine."""
        base_total, _ = count_flops(source.bundle.model, spec.inputs, [])
        rows = []
        for ratio in ratios:
            folder = self.root / "bench" / "ratios" / f"{ratio:g}"
            context = self.pruned_engine(source, dataclasses.replace(self.recipe.pruning, ratio=ratio), folder)
            total, _ = count_flops(context.pruned, spec.inputs, [])
            engine = folder / context.records["engine"].data["pruned.onnxruntime"]["path"]
            rows.append({"ratio": ratio, "removed_heads": context.records["plan"].data["removed_heads"],
                         "flops": total, "ideal_speedup": base_total / total,
                         "engine": str(engine.relative_to(self.root))})
        return rows

    def time_engines(self, rows: list[dict[str, Any]], feeds) -> None:
        """Each row's engine against the original engine, two sessions loaded at a time: adds its latency and
        measured speedup to the row."""
        original_engine = self.build.engines["original.onnxruntime"].path
        for row in rows:
            engines = {"original": self._ort.load(original_engine), "pruned": self._ort.load(self.root / row["engine"])}
            label = f"{row.get('criterion', '')} ratio {row['ratio']:g}".strip()
            latency = interleaved_latency(engines, feeds, self.warmup, self.runs, label)
            del engines
            row["latency_ms"] = {v: latency[v].median_ms for v in MODEL_VARIANTS}
            row["measured_speedup"] = latency["original"].median_ms / latency["pruned"].median_ms

    def time_ratios(self, rows: list[dict[str, Any]], feeds) -> list[dict[str, Any]]:
        self.time_engines(rows, feeds)
        self._plot(rows)
        return rows

    def _plot(self, rows: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ratios = [r["ratio"] for r in rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(ratios, [r["latency_ms"]["pruned"] for r in rows], "o-", label="pruned")
        left.plot(ratios, [r["latency_ms"]["original"] for r in rows], "s--", label="original (same runs)")
        left.set(xlabel="pruning ratio (temporal heads pruned)", ylabel="ms per denoising step",
                 title="ONNX Runtime latency")
        left.legend()
        right.plot(ratios, [r["ideal_speedup"] for r in rows], "o-", label="ideal (FLOPs ratio)")
        right.plot(ratios, [r["measured_speedup"] for r in rows], "s-", label="measured")
        right.set(xlabel="pruning ratio", ylabel="speedup vs original", title="Speedup: ideal vs measured")
        right.legend()
        fig.suptitle(f"{self.recipe.model.family} {self.recipe.model.preset or 'checkpoint'}, "
                     f"shape {self.recipe.export.batch}x{self.shape.frames}x{self.shape.latent_height}x"
                     f"{self.shape.latent_width}")
        fig.tight_layout()
        fig.savefig(self.root / "bench.png", dpi=100)
        plt.close(fig)


def _memory(backend: dict[str, Any], variant: str) -> str:
    memory = backend.get("peak_memory_mb", {}).get(variant)
    if memory is None:
        return "-"
    return f"{memory['peak_mb']:.0f} (+{memory['peak_mb'] - memory['baseline_mb']:.0f})"


def print_bench(result: dict[str, Any]) -> None:
    models = result["models"]
    rows = [[k, f"{models['original'][k]:,}", f"{models['pruned'][k]:,}"]
            for k in ("parameters", "onnx_parameters", "weight_bytes", "onnx_bytes_on_disk", "onnx_external_data_bytes",
                      "flops")]
    summary = table("model", ["", "original", "pruned"], rows)
    summary.caption = (f"temporal attention holds {100 * result['temporal_flops_share']:.2f}% of FLOPs; "
                       f"ideal speedup {result['ideal_speedup']:.4f}x")
    console.print(summary)
    for name, b in result["backends"].items():
        lat = b["latency_per_step"]
        rows = [[v, f"{lat[v]['median_ms']:.2f}", f"{lat[v]['q1_ms']:.2f}-{lat[v]['q3_ms']:.2f}",
                 f"{b.get('trajectory_ms', {}).get(v, float('nan')):.0f}",
                 _memory(b, v)] for v in lat]
        t = table(f"{name}", ["model", "median ms/step", "IQR ms", "trajectory ms",
                              "peak RSS MiB (over imports)"], rows)
        t.caption = (f"measured speedup {b['measured_speedup']:.4f}x = "
                     f"{100 * b['measured_over_ideal']:.1f}% of ideal")
        console.print(t)
    if "ratios" in result:
        console.print(table("ratio sweep (ONNX Runtime)", ["ratio", "heads pruned", "ideal", "measured"], [
            [f"{r['ratio']:g}", str(r["removed_heads"]), f"{r['ideal_speedup']:.4f}x", f"{r['measured_speedup']:.4f}x"]
            for r in result["ratios"]]))
