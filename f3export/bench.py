"""``f3export bench``: speed, size and memory of the original vs the pruned model, against the limit.

The limit is the FLOP count: matmuls, convolutions and attention of one forward pass at the benchmarked
shape, counted on the exported ONNX graphs (``flops.onnx_flops``, equal to PyTorch's FlopCounterMode on the
same model), so the ideal speedup of pruning is FLOPs(original) / FLOPs(pruned). Latency is measured on the
built engines with the build's own golden inputs: warm-up, then interleaved runs (original and pruned
alternate, in alternating order), ONNX Runtime's threads not spinning between runs (a spinning session
takes the cores its partner runs on: ``engines.onnxruntime``). Each latency is a median with quartiles; the speedup is the median of
the per-pair ratios with their quartiles, and a speedup whose quartiles hold 1.0 is flagged as no result.
One forward at the CFG batch is one denoising step; a trajectory is ``steps`` of them. Peak memory is the
resident set of a fresh process that loads the engine and runs it once.

Bench needs only the build folder; ``--ratios`` (which prunes again) and GPU PyTorch timing load the
source model.
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

from .artifacts import MODEL_VARIANTS, StageRecord, open_build, write_json
from .build import Build
from .calibrate import COMPENSATION
from .engines import make_backend
from .engines.onnxruntime import OnnxRuntimeBackend
from .flops import onnx_flops
from .models import get_adapter
from .models.base import ModelAdapter, VideoShape
from .prune import load_pruned
from .recipe import PruningSection
from .report import console, progress, results, table
from .schedule import StepSchedule
from .stages import STAGES, SourceModel, StageContext
from .validate import load_goldens

# What a ratio sweep runs per ratio: the build's own stages from the plan to the engine.
RATIO_STAGES = [stage for stage in STAGES if stage.name in ("plan", "prune", "export", "engine")]
OUTPUTS = ("bench.json", "bench.png", "bench")  # what a bench writes; a new bench removes the last one's first


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


@dataclass(frozen=True)
class Speedup:
    """original / pruned time of each interleaved pair: its median and quartiles (the spread of the effect)."""

    median: float
    q1: float
    q3: float
    pairs: int

    @classmethod
    def of(cls, original_s: list[float], pruned_s: list[float]) -> "Speedup":
        ratios = np.asarray(original_s) / np.asarray(pruned_s)
        return cls(float(np.median(ratios)), float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75)),
                   len(ratios))

    @property
    def resolved(self) -> bool:
        """Whether the effect exceeds the spread: 1.0 (no change) lies outside the quartiles."""
        return not self.q1 <= 1.0 <= self.q3

    def describe(self) -> str:
        return f"{self.median:.3f}x (IQR {self.q1:.3f}-{self.q3:.3f}, {self.pairs} pairs)"


@dataclass(frozen=True)
class Timing:
    latency: dict[str, Latency]
    speedup: Speedup


def interleaved_timing(engines: dict[str, Any], feeds: dict[str, np.ndarray], warmup: int, runs: int,
                       label: str) -> Timing:
    """Time the original and the pruned engine on the same inputs, alternating which goes first, after warm-up
    runs; the speedup is taken pair by pair, so that a slow stretch of the machine slows both sides of a pair."""
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
    return Timing({name: Latency.of(t) for name, t in times.items()}, Speedup.of(times["original"], times["pruned"]))


def warn_unresolved(what: str, speedup: Speedup) -> None:
    if not speedup.resolved:
        console.print(f"[bold yellow]warning:[/] {what}: measured speedup {speedup.describe()} is within its spread "
                      "(the quartiles hold 1.0): no difference shown at this many runs", highlight=False)


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


def clear_outputs(root: Path, names: tuple[str, ...]) -> None:
    """A command's last results (files or folders), so that none of them (a plot, a ratio's engine) outlives
    the run that replaces them."""
    for name in names:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _bytes_with_data(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class Bench:
    def __init__(self, root: Path, runs: int, warmup: int):
        self.root = root
        # Timing a build that failed its gates, or whose files changed, would publish numbers for a wrong engine.
        self.build = open_build(root)
        self.build.verify()
        self.recipe = self.build.recipe
        self.manifest = self.build.doc
        model = self.recipe.model
        self.adapter: ModelAdapter = get_adapter(model.family, model.adapter_options)
        self.shape = VideoShape(model.frames, model.latent_height, model.latent_width)
        self.runs, self.warmup = runs, warmup
        self._ort = OnnxRuntimeBackend(self.recipe.engine.device, self.recipe.engine.optimization_level)

    def golden_inputs(self) -> dict[str, np.ndarray]:
        """The export-shape inputs validation stored with the pruned engine (verified with the build's files)."""
        entry = next(e for e in self.build.engines.values() if e.variant == "pruned")
        return load_goldens(entry.goldens)[0][0]

    def temporal_modules(self) -> list[str]:
        plan = json.loads((self.root / "plan.json").read_text())  # verified with the build's files
        return list(plan["heads"])

    def run(self, ratios: list[float] | None) -> dict[str, Any]:
        clear_outputs(self.root, OUTPUTS)
        feeds = self.golden_inputs()
        feeds_path = self.root / "bench" / "inputs.npz"
        feeds_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(feeds_path, **feeds)

        temporal = self.temporal_modules()
        exported = self.manifest["stages"]["export"]["data"]
        parameters = self.manifest["parameters"]["torch"]
        flops = {}
        for variant in MODEL_VARIANTS:
            onnx_path = self.build.path(exported[variant]["path"], f"stages.export.data.{variant}.path")
            data_path = onnx_path.with_name(onnx_path.name + ".data")
            total, inside = onnx_flops(onnx_path, feeds, temporal)
            flops[variant] = {"flops": total, "temporal_flops": inside, "parameters": parameters[variant],
                              "onnx_parameters": exported[variant]["parameters"],
                              "onnx_bytes_on_disk": exported[variant]["bytes"],
                              "onnx_external_data_bytes": data_path.stat().st_size if data_path.exists() else 0,
                              "weight_bytes": exported[variant]["parameters"] * 4}
        ideal = flops["original"]["flops"] / flops["pruned"]["flops"]
        result: dict[str, Any] = {
            "shape": {k: list(v.shape) for k, v in feeds.items()},
            "machine": {"cpu_count": os.cpu_count()},
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
            timing = interleaved_timing(engines, feeds, self.warmup, self.runs, backend_name)
            del engines  # full-size engines are GBs each: hold only what is being timed
            warn_unresolved(backend_name, timing.speedup)
            measured = timing.speedup.median
            result["backends"][backend_name] = {
                "latency_per_step": {v: vars(timing.latency[v]) for v in MODEL_VARIANTS},
                "trajectory_ms": {v: timing.latency[v].median_ms * result["steps"] for v in MODEL_VARIANTS},
                "engine_bytes": {v: _bytes_with_data(paths[v]) for v in MODEL_VARIANTS},
                "peak_memory_mb": {v: peak_memory(self.root, backend_name, paths[v],
                                                  feeds_path) for v in MODEL_VARIANTS},
                "measured_speedup": measured,
                "speedup_spread": vars(timing.speedup),
                "speedup_resolved": timing.speedup.resolved,
                "measured_over_ideal": measured / ideal,
                "gain_fraction": (measured - 1) / (ideal - 1) if ideal > 1 else None,
            }
        if ratios or _cuda_available():
            source = Build(self.recipe).model  # the source checkpoint: only these two need it
            if _cuda_available():
                _, _, pruned = load_pruned(self.root / "pruned")
                inputs = source.adapter.export_spec(source.bundle.model, self.shape, self.recipe.export.batch,
                                                  self.recipe.export.dynamic_axes, seed=123).inputs
                result["backends"]["torch-cuda"] = self._torch_cuda(source.bundle.model, pruned, inputs, ideal)
                del pruned
            if ratios:
                rows = self.export_ratios(source, ratios, feeds, flops["original"]["flops"])
                del source  # timing needs only the engines; a full-size model in memory would crowd them
                result["ratios"] = self.time_ratios(rows, feeds)
        schedule = self.manifest["contract"].get("conventions", {}).get("step_schedule")
        if schedule is not None:
            result["step_schedule"] = self.scheduled_speedups(schedule, result)
        write_json(self.root / "bench.json", result)
        return result

    def scheduled_speedups(self, schedule: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """Per trajectory of the recipe's [validation] steps under the build's step schedule: the pruned engine
        runs a share of the steps and the original the rest, so a per-step speedup s gives
        1 / (share / s + 1 - share)."""
        from .scheduling import numpy_sampler

        scheduler = self.manifest["contract"]["conventions"]["scheduler"]
        sampler = numpy_sampler(scheduler["class"], scheduler["config"])
        sampler.set_timesteps(self.recipe.validation.steps)
        share = StepSchedule.from_json(schedule).share(sampler.timesteps)

        def per_trajectory(speedup: float) -> float:
            return 1.0 / (share / speedup + 1.0 - share)
        return {"start": schedule["start"], "stop": schedule["stop"], "pruned_steps_share": share,
                "ideal_speedup": per_trajectory(result["ideal_speedup"]),
                "measured_speedup": {name: per_trajectory(b["measured_speedup"])
                                     for name, b in result["backends"].items()}}

    def _torch_cuda(self, original, pruned, inputs, ideal) -> dict[str, Any]:
        import torch

        class TorchEngine:
            def __init__(self, model):
                self.model = model.cuda()
                self.inputs = {k: v.cuda() for k, v in inputs.items()}

            @torch.no_grad()
            def run(self, _feeds):
                self.model(**self.inputs)
                torch.cuda.synchronize()

        engines = {"original": TorchEngine(copy.deepcopy(original)), "pruned": TorchEngine(copy.deepcopy(pruned))}
        timing = interleaved_timing(engines, {}, self.warmup, self.runs, "torch-cuda")
        warn_unresolved("torch-cuda", timing.speedup)
        return {"latency_per_step": {v: vars(timing.latency[v]) for v in MODEL_VARIANTS},
                "measured_speedup": timing.speedup.median, "speedup_spread": vars(timing.speedup),
                "speedup_resolved": timing.speedup.resolved, "measured_over_ideal": timing.speedup.median / ideal}

    def pruned_engine(self, source: SourceModel, pruning: PruningSection, folder: Path) -> StageContext:
        """The build's stages from plan to engine with other [pruning] values (the same scores), for the pruned
        model alone, in ``folder`` (not cached: a sweep's folders are scratch)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("scores.json", COMPENSATION):
            if (self.root / name).is_file():
                shutil.copyfile(self.root / name, folder / name)
        recipe = dataclasses.replace(self.recipe, pruning=pruning)
        context = StageContext(recipe, source.adapter, folder, source, [self._ort], variants=("pruned",))
        for stage in RATIO_STAGES:
            _, data = stage.run(context)
            context.records[stage.name] = StageRecord(key="", files={}, data=data)
        return context

    def export_ratios(self, source: SourceModel, ratios: list[float], feeds: dict[str, np.ndarray],
                      original_flops: int) -> list[dict[str, Any]]:
        """Prune at each ratio (same scores), export, count the graph's FLOPs and build an ONNX Runtime engine."""
        rows = []
        for ratio in ratios:
            folder = self.root / "bench" / "ratios" / f"{ratio:g}"
            context = self.pruned_engine(source, dataclasses.replace(self.recipe.pruning, ratio=ratio), folder)
            total, _ = onnx_flops(folder / context.records["export"].data["pruned"]["path"], feeds, [])
            engine = folder / context.records["engine"].data["pruned.onnxruntime"]["path"]
            rows.append({"ratio": ratio, "removed_heads": context.records["plan"].data["removed_heads"],
                         "flops": total, "ideal_speedup": original_flops / total,
                         "engine": str(engine.relative_to(self.root))})
        return rows

    def time_engines(self, rows: list[dict[str, Any]], feeds) -> None:
        """Each row's engine against the original engine, two sessions loaded at a time: adds its latencies and
        measured speedup (with their spread) to the row."""
        original_engine = self.build.engines["original.onnxruntime"].path
        for row in rows:
            engines = {"original": self._ort.load(original_engine), "pruned": self._ort.load(self.root / row["engine"])}
            label = f"{row.get('criterion', '')} ratio {row['ratio']:g}".strip()
            timing = interleaved_timing(engines, feeds, self.warmup, self.runs, label)
            del engines
            if row["ratio"] > 0:
                warn_unresolved(label, timing.speedup)
            row["latency_ms"] = {v: timing.latency[v].median_ms for v in MODEL_VARIANTS}
            row["latency_iqr_ms"] = {v: [timing.latency[v].q1_ms, timing.latency[v].q3_ms] for v in MODEL_VARIANTS}
            row["measured_speedup"] = timing.speedup.median
            row["speedup_iqr"] = [timing.speedup.q1, timing.speedup.q3]

    def time_ratios(self, rows: list[dict[str, Any]], feeds) -> list[dict[str, Any]]:
        self.time_engines(rows, feeds)
        self._plot(rows)
        return rows

    def _plot(self, rows: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ratios = [r["ratio"] for r in rows]

        def bars(values: list[float], quartiles: list[list[float]]) -> np.ndarray:
            return np.abs(np.asarray(quartiles).T - np.asarray(values))  # IQR as error bars

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for variant, style, label in (("pruned", "o-", "pruned"), ("original", "s--", "original (same runs)")):
            values = [r["latency_ms"][variant] for r in rows]
            left.errorbar(ratios, values, yerr=bars(values, [r["latency_iqr_ms"][variant] for r in rows]),
                          fmt=style, capsize=3, label=label)
        left.set(xlabel="pruning ratio (temporal heads pruned)", ylabel="ms per denoising step (median, IQR)",
                 title="ONNX Runtime latency")
        left.legend()
        right.plot(ratios, [r["ideal_speedup"] for r in rows], "o-", label="ideal (FLOPs ratio)")
        measured = [r["measured_speedup"] for r in rows]
        right.errorbar(ratios, measured, yerr=bars(measured, [r["speedup_iqr"] for r in rows]), fmt="s-",
                       capsize=3, label="measured (median of pairs, IQR)")
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set(xlabel="pruning ratio", ylabel="speedup vs original", title="Speedup: ideal vs measured")
        right.legend()
        fig.suptitle(f"{self.recipe.model.family} {self.recipe.model.preset or 'checkpoint'}, "
                     f"shape {self.recipe.export.batch}x{self.shape.frames}x{self.shape.latent_height}x"
                     f"{self.shape.latent_width}")
        fig.tight_layout()
        fig.savefig(self.root / "bench.png", dpi=100)
        plt.close(fig)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
    results.print(summary)
    for name, b in result["backends"].items():
        lat = b["latency_per_step"]
        rows = [[v, f"{lat[v]['median_ms']:.2f}", f"{lat[v]['q1_ms']:.2f}-{lat[v]['q3_ms']:.2f}",
                 f"{b.get('trajectory_ms', {}).get(v, float('nan')):.0f}",
                 _memory(b, v)] for v in lat]
        t = table(f"{name}", ["model", "median ms/step", "IQR ms", "trajectory ms",
                              "peak RSS MiB (over imports)"], rows)
        speedup = Speedup(**b["speedup_spread"])
        t.caption = (f"measured speedup {speedup.describe()} = {100 * b['measured_over_ideal']:.1f}% of ideal"
                     + ("" if speedup.resolved else "; within its spread: no difference shown"))
        results.print(t)
    if "step_schedule" in result:
        sched = result["step_schedule"]
        results.print(f"step schedule [{sched['start']:g}, {sched['stop']:g}): the pruned engine runs "
                      f"{100 * sched['pruned_steps_share']:.0f}% of the steps; per trajectory ideal "
                      f"{sched['ideal_speedup']:.4f}x, measured " + ", ".join(
                          f"{name} {v:.3f}x" for name, v in sched["measured_speedup"].items()), highlight=False)
    if "ratios" in result:
        results.print(table("ratio sweep (ONNX Runtime)", ["ratio", "heads pruned", "ideal", "measured (IQR)"], [
            [f"{r['ratio']:g}", str(r["removed_heads"]), f"{r['ideal_speedup']:.4f}x",
             f"{r['measured_speedup']:.3f}x ({r['speedup_iqr'][0]:.3f}-{r['speedup_iqr'][1]:.3f})"]
            for r in result["ratios"]]))
