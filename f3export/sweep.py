"""``f3export sweep``: pruning criteria compared on one calibration, by what the pruned videos show.

From a finished build (its ``scores.json`` holds every criterion's scores of one calibration), for every
action (``frame-local`` or ``remove``, where the family's heads can do both), criterion and ratio: plan and
prune as the build does, build the pruned ONNX Runtime engine, time it
against the build's original engine (interleaved, median), and run validation's pruning fidelity on the
held-out runs (same prompts, seeds and noise): latent metrics, video PSNR / SSIM where there are frames,
the task metric where the recipe names one. ``sweep.json`` holds every number, ``sweep.png`` one line per
criterion against the ratio and against the measured speedup, and the table goes to the terminal.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import write_json
from .bench import Bench, clear_outputs
from .flops import count_flops
from .build import Build
from .calibrate import Scores
from .errors import CheckError, F3ExportError
from .weights import read_json
from .pictures import shown_metrics, write_report
from .report import results, table
from .validate import original_trajectories, pruning_fidelity


def series(row: dict[str, Any], actions: list[str]) -> str:
    """A row's line in the table and the plot: its criterion, and its action where several are compared."""
    return row["criterion"] if len(actions) == 1 else f"{row['criterion']} / {row['action']}"


def fidelity_row(fidelity) -> dict[str, float]:
    row = dict(fidelity.summary)
    if fidelity.task:
        row.update({f"task_{k}": v for k, v in fidelity.task["pruned"].items()})
    return row


class Sweep:
    def __init__(self, root: Path, runs: int, warmup: int):
        self.bench = Bench(root, runs, warmup)  # the same untrusted-folder checks and engine timing
        self.root = root

    def run(self, criteria: list[str], ratios: list[float], actions: list[str] | None = None) -> dict[str, Any]:
        bench, recipe = self.bench, self.bench.recipe
        actions = actions or [recipe.pruning.action]
        allowed = bench.adapter.structure.actions
        if any(a not in allowed for a in actions):
            raise F3ExportError(f"--actions {','.join(actions)}: the heads of a {bench.adapter.family} model can only "
                             f"be {' or '.join(map(repr, allowed))}")
        scores = Scores.from_json(read_json(self.root / "scores.json"))
        scored = scores.modules.values()
        missing = [c for c in criteria if any(c not in module.scores for module in scored)]
        if "sensitivity" in missing:
            raise CheckError(f"{self.root / 'scores.json'}: no 'sensitivity' scores: calibration measures them only "
                             "when the recipe ranks by them; rebuild with --set pruning.criterion='sensitivity'")
        if missing:
            raise CheckError(f"{self.root / 'scores.json'}: no {', '.join(map(repr, missing))} scores (calibrated "
                             "before that criterion existed); rebuild with --force")
        measured = scores.sensitivity_of or {}
        other = [a for a in actions if "sensitivity" in criteria and a != measured.get("action")]
        if other:
            raise F3ExportError(f"--actions {','.join(actions)}: 'sensitivity' was measured for action "
                                f"{measured.get('action')!r}, not {other[0]!r}; sweep that action alone")
        clear_outputs(self.root, ("sweep.json", "sweep.png", "sweep"))
        source = Build(recipe).model
        original = source.bundle.model
        spec = source.adapter.export_spec(original, bench.shape, recipe.export.batch, recipe.export.dynamic_axes,
                                         seed=123)
        feeds = {k: v.numpy() for k, v in spec.inputs.items()}
        base_flops, _ = count_flops(original, spec.inputs, [])
        # The original's held-out trajectories, once: every pruned model is compared against the same ones.
        references = original_trajectories(source.adapter, source.bundle, bench.shape, recipe.validation)
        rows = []
        for action, criterion, ratio in ((a, c, r) for a in actions for c in criteria for r in ratios):
            pruning = dataclasses.replace(recipe.pruning, criterion=criterion, ratio=ratio, action=action)
            folder = self.root / "sweep" / action / criterion / f"{ratio:g}"
            context = bench.pruned_engine(source, pruning, folder)
            flops, _ = count_flops(context.pruned, spec.inputs, [])
            fidelity = pruning_fidelity(source.adapter, source.bundle, context.pruned, bench.shape,
                                        recipe.validation, references)
            engine = folder / context.records["engine"].data["pruned.onnxruntime"]["path"]
            rows.append({"action": action, "criterion": criterion, "ratio": ratio,
                         "removed_heads": context.records["plan"].data["removed_heads"],
                         "ideal_speedup": base_flops / flops, "engine": str(engine.relative_to(self.root)),
                         "fidelity": fidelity_row(fidelity),
                         **({"task_original": fidelity.task["original"]} if fidelity.task else {})})
        bench.time_engines(rows, feeds)
        for row in rows:
            row["series"] = series(row, actions)
        result = {"criteria": criteria, "actions": actions, "ratios": ratios, "rows": rows}
        write_json(self.root / "sweep.json", result)
        plot(rows, self.root / "sweep.png", f"{recipe.name}: criteria compared on held-out runs")
        write_report(self.root, f"{recipe.name}: validation")
        return result


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = shown_metrics(rows)
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.5 * len(metrics), 7), squeeze=False)
    # An infinite PSNR (a pruned video identical to the original's: no head removed) is drawn on a dotted
    # line above every finite value, so the curve does not silently start at the first finite point.
    ceilings = {}
    for metric in metrics:
        finite = [r["fidelity"][metric] for r in rows if math.isfinite(r["fidelity"][metric])]
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
        ceilings[metric] = high + 0.15 * ((high - low) or 1.0)
    for criterion in dict.fromkeys(r["series"] for r in rows):
        mine = [r for r in rows if r["series"] == criterion]
        for column, metric in enumerate(metrics):
            values = [v if math.isfinite(v) else ceilings[metric] for v in (r["fidelity"][metric] for r in mine)]
            axes[0, column].plot([r["ratio"] for r in mine], values, "o-", label=criterion)
            axes[1, column].plot([r["measured_speedup"] for r in mine], values, "o-", label=criterion)
    for column, metric in enumerate(metrics):
        axes[0, column].set(xlabel="pruning ratio (temporal heads pruned)", ylabel=metric)
        axes[1, column].set(xlabel="measured speedup (ONNX Runtime, median)", ylabel=metric)
        if any(not math.isfinite(r["fidelity"][metric]) for r in rows):
            for ax in axes[:, column]:
                ax.axhline(ceilings[metric], linestyle=":", color="grey")
                ax.annotate("inf (identical)", (0.01, ceilings[metric]), xycoords=("axes fraction", "data"),
                            va="bottom", fontsize=8, color="grey")
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_sweep(result: dict[str, Any]) -> None:
    rows = result["rows"]
    metrics = shown_metrics(rows)
    results.print(table("criteria compared (pruned vs original, held-out runs)",
                        ["criterion", "ratio", "heads pruned", *metrics, "ideal", "measured"],
                        [[r["series"], f"{r['ratio']:g}", str(r["removed_heads"]),
                          *(f"{r['fidelity'][m]:.4g}" for m in metrics), f"{r['ideal_speedup']:.3f}x",
                          f"{r['measured_speedup']:.3f}x"] for r in rows]))
    for metric in metrics:
        # over the ratios where every criterion's value is finite (at ratio 0 every PSNR is infinite)
        ratios = [ratio for ratio in result["ratios"] if all(math.isfinite(r["fidelity"][metric]) for r in rows
                                                             if r["ratio"] == ratio)]
        if not ratios:
            continue
        means = {c: float(np.mean([r["fidelity"][metric] for r in rows if r["series"] == c and r["ratio"] in ratios]))
                 for c in dict.fromkeys(r["series"] for r in rows)}
        best = max(means, key=means.get)
        results.print(f"{metric}: mean over ratios {', '.join(f'{x:g}' for x in ratios)}: "
                      + ", ".join(f"{c} {v:.4g}" for c, v in means.items()) + f"; best {best}", highlight=False)
