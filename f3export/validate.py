"""Validation: two questions, answered in numbers and gated by the recipe.

1. Export fidelity: does the engine compute what the pruned PyTorch model
   computes? Fresh seeded inputs at the export shape and at the min and max of
   every dynamic range ([engine] profile_*); max abs error, relative L2, cosine, NaN/Inf.
2. Pruning fidelity: how far does pruning move the model? Original and pruned
   PyTorch models on held-out runs, compared with the family's metrics: for
   diffusion, whole denoising trajectories (per-step cosine of the guided noise
   predictions, PSNR of the final latents); for token models, logits (cosine,
   top-1 agreement).

Inputs and outputs of (1) are stored as goldens so ``f3export check`` can
re-run an engine later and compare.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .artifacts import atomic_path
from .engines import Engine
from .errors import RecipeError
from .models.base import ModelAdapter, VideoShape
from .models.loading import ModelBundle
from .recipe import ValidationSection
from .report import progress
from .tasks import TASKS
from .videos import read_video

@dataclass(frozen=True)
class Comparison:
    max_abs: float
    rel_l2: float
    cosine: float
    nonfinite: int

    @classmethod
    def of(cls, actual: np.ndarray, reference: np.ndarray) -> "Comparison":
        a, r = np.asarray(actual, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
        nonfinite = int((~np.isfinite(a)).sum())
        if nonfinite:
            return cls(math.inf, math.inf, -1.0, nonfinite)
        diff = a - r
        ref_norm = np.linalg.norm(r)
        denom = np.linalg.norm(a) * ref_norm
        return cls(float(np.abs(diff).max(initial=0.0)), float(np.linalg.norm(diff) / max(ref_norm, 1e-30)),
                   float(a @ r / denom) if denom > 0 else 1.0, 0)

    @classmethod
    def worst(cls, items: list["Comparison"]) -> "Comparison":
        return cls(max(c.max_abs for c in items), max(c.rel_l2 for c in items), min(c.cosine for c in items),
                   sum(c.nonfinite for c in items))


@dataclass(frozen=True)
class Gate:
    metric: str
    value: float
    limit: float
    kind: str  # "max" (value <= limit) or "min" (value >= limit)

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit


def export_gates(result: Comparison, section: ValidationSection, precision: str, prefix: str) -> list[Gate]:
    """Engine-vs-PyTorch gates; fp16/bf16 engines get their own, looser tolerances."""
    fp32 = precision == "fp32"
    max_rel_l2 = section.export_max_rel_l2 if fp32 else section.export_fp16_max_rel_l2
    min_cosine = section.export_min_cosine if fp32 else section.export_fp16_min_cosine
    return [
        Gate(f"{prefix}.rel_l2", result.rel_l2, max_rel_l2, "max"),
        Gate(f"{prefix}.cosine", result.cosine, min_cosine, "min"),
        Gate(f"{prefix}.nonfinite", float(result.nonfinite), 0.0, "max"),
    ]


Golden = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # (inputs, PyTorch outputs)


@torch.no_grad()
def golden_samples(adapter: ModelAdapter, model: nn.Module, shapes: list[dict[str, int]],
                   section: ValidationSection, seed_base: int = 10_000) -> list[Golden]:
    """``export_samples`` fresh seeded inputs (never the export's own example) at each of ``shapes``
    (sizes by axis name, as ``engines.validated_shapes`` gives them), and the PyTorch model's outputs."""
    samples = []
    for shape in shapes:
        for _ in range(section.export_samples):
            spec = adapter.export_spec(model, VideoShape.of_axes(shape), shape["batch"], [],
                                       seed=seed_base + len(samples))
            outputs = model(**spec.inputs)
            samples.append(({k: v.numpy() for k, v in spec.inputs.items()},
                            {spec.output_names[0]: outputs.numpy()}))
    return samples


def compare_engine(engine: Engine, samples: list[Golden]) -> Comparison:
    """The worst agreement of an engine with the expected outputs over all samples."""
    comparisons = []
    for inputs, expected in samples:
        actual = engine.run(inputs)
        comparisons.extend(Comparison.of(actual[name], value) for name, value in expected.items())
    return Comparison.worst(comparisons)


@dataclass
class PruningFidelity:
    summary: dict[str, float]  # <metric>_min and <metric>_mean over every value of every run
    per_run: list[dict[str, Any]]
    task: dict[str, dict[str, float]] | None = None  # the task metric of each model's videos, by model
    task_chance: dict[str, float] | None = None  # what the task's metrics read for a model not doing it
    videos: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)  # per run: label, videos

    def to_json(self) -> dict[str, Any]:
        return {**self.summary, "per_run": self.per_run,
                **({"task": self.task, "task_chance": self.task_chance} if self.task else {})}


@torch.no_grad()
def pruning_fidelity(adapter: ModelAdapter, bundle: ModelBundle, pruned: nn.Module, shape: VideoShape,
                     section: ValidationSection, references: list | None = None) -> PruningFidelity:
    """Original and pruned models on the same held-out runs, compared with the family's metrics.

    ``references``: the original model's trajectories of these runs, when a caller compares several pruned
    models against them (a sweep) and computes them once."""
    check_task_prompts(section)
    runs = adapter.protocol.runs(section)
    adapter.prepare_runs(bundle, runs)
    metrics, videos = [], {"original": [], "pruned": []}
    with progress() as bar:
        models = 1 if references is not None else 2
        task = bar.add_task("validate", total=models * len(runs) * adapter.protocol.calls(section))

        def advance(_: int) -> None:
            bar.advance(task)

        for i, run in enumerate(runs):
            reference = references[i] if references is not None else \
                adapter.trajectory(bundle, bundle.model, run, shape, advance)
            candidate = adapter.trajectory(bundle, pruned, run, shape, advance)
            metrics.append(adapter.fidelity(reference, candidate))
            videos["original"].append(getattr(reference, "video", None))
            videos["pruned"].append(getattr(candidate, "video", None))
    summary = {}
    for name in metrics[0]:
        values = [v for m in metrics for v in np.atleast_1d(m[name])]
        summary[f"{name}_min"], summary[f"{name}_mean"] = float(np.min(values)), float(np.mean(values))
    per_run = [{**run.label(), **m} for run, m in zip(runs, metrics)]
    shown = [(run.caption(), {**source_row(run), **{model: videos[model][i] for model in videos}})
             for i, run in enumerate(runs) if videos["original"][i] is not None]
    task = task_scores(section, runs, videos)
    return PruningFidelity(summary, per_run, task, TASKS[section.task].chance if task else None, shown)


def source_row(run) -> dict[str, torch.Tensor]:
    """The source clip of a run that edits one, shown above the models' videos (what the edit started from)."""
    source = getattr(run, "source", None)
    return {"source": read_video(Path(source))} if source else {}


@torch.no_grad()
def original_trajectories(adapter: ModelAdapter, bundle: ModelBundle, shape: VideoShape,
                          section: ValidationSection) -> list:
    """The original model's trajectories of the held-out runs, for callers comparing several pruned models
    against them (``pruning_fidelity(..., references=)``)."""
    runs = adapter.protocol.runs(section)
    adapter.prepare_runs(bundle, runs)
    return [adapter.trajectory(bundle, bundle.model, run, shape) for run in runs]


def check_task_prompts(section: ValidationSection) -> None:
    """Refuse, before any run, held-out prompts the recipe's task ([validation].task) cannot score."""
    name = getattr(section, "task", None)
    for i, prompt in enumerate(section.prompts if name is not None else []):
        problem = TASKS[name].prompt_problem(prompt)
        if problem:
            raise RecipeError(f"[validation].prompts[{i}]: {problem}, which task = {name!r} needs")


def task_scores(section: ValidationSection, runs: list, videos: dict[str, list]) -> dict[str, dict[str, float]] | None:
    """The recipe's task metric ([validation].task) of each model's videos of the held-out runs."""
    name = getattr(section, "task", None)
    if name is None:
        return None
    if any(video is None for video in videos["original"]):
        raise RecipeError(f"[validation].task = {name!r}: this model's outputs are latents that nothing decodes "
                          "into frames (not pixel space, and no vae/ in its folder)")
    prompts = [run.prompt for run in runs]
    return {model: TASKS[name].score(clips, prompts) for model, clips in videos.items()}


def pruning_gates(adapter: ModelAdapter, result: PruningFidelity, section: ValidationSection) -> list[Gate]:
    """Each family gate whose limit is set, on the minimum of its metric over every run."""
    gates = []
    for gate in adapter.fidelity_gates:
        limit = getattr(section, gate.recipe_key)
        if limit is None:
            continue
        if f"{gate.metric}_min" not in result.summary:
            raise RecipeError(f"[validation].{gate.recipe_key} = {limit}: this model produces no {gate.metric} "
                              "(its outputs are latents that nothing decodes into frames)")
        gates.append(Gate(f"pruning.{gate.metric}_min", result.summary[f"{gate.metric}_min"], limit, "min"))
    drop = getattr(section, "pruning_max_task_drop", None)
    if drop is not None:
        if not result.task:
            raise RecipeError(f"[validation].pruning_max_task_drop = {drop}: needs [validation].task to score")
        for metric in result.task_chance:
            lost = result.task["original"][metric] - result.task["pruned"][metric]
            gates.append(Gate(f"pruning.task_{metric}_drop", lost, drop, "max"))
    return gates


def save_goldens(path: Path, samples: list[Golden]) -> None:
    arrays = {}
    for i, (inputs, expected) in enumerate(samples):
        arrays.update({f"{i}/input/{k}": v for k, v in inputs.items()})
        arrays.update({f"{i}/expected/{k}": v for k, v in expected.items()})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def load_goldens(path: Path) -> list[Golden]:
    with np.load(path, allow_pickle=False) as data:
        samples: dict[str, Golden] = {}
        for key in data.files:
            index, kind, name = key.split("/", 2)
            inputs, expected = samples.setdefault(index, ({}, {}))
            (inputs if kind == "input" else expected)[name] = data[key]
    return [samples[k] for k in sorted(samples, key=int)]


def gates_json(gates: list[Gate]) -> list[dict[str, Any]]:
    return [{**asdict(g), "passed": g.passed} for g in gates]
