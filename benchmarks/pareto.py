"""Where the pruning levers put the Pareto front: action x window x criterion x compensation x step schedule.

On a trained model (a recipe over a zoo folder), every point is a pruned PyTorch model sampled on the recipe's
held-out runs against the original's trajectories (``pruning_fidelity``: video PSNR / SSIM per frame, the task
metric), and priced by the attention FLOPs it removes at CogVideoX-2B's real shape (13 latent frames of 30x45
tokens, 226 text tokens: ``flops.attention_flops_removed``), with the ideal speedup of the whole forward from
the attention share counted on the meta device. Calibration runs once for the data criteria, the distance
profile and the compensation means, and once per action for ``sensitivity`` (on a subset of the calibration
runs: ``--sensitivity-prompts`` x ``--sensitivity-steps``, its extra passes being the cost).

    python benchmarks/pareto.py recipes/cogvideox-shapes.toml --out benchmarks/pareto/cogvideox-shapes.json

Results are appended to the JSON as each point finishes (a rerun skips the points it holds); the table goes to
stdout and the plot beside the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from f3export.calibrate import calibrate
from f3export.flops import attention_flops_removed
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.prune import make_plan, pruned_copy
from f3export.recipe import PruningSection, load_recipe
from f3export.schedule import StepSchedule, scheduled
from f3export.sensitivity import OutputMeasure
from f3export.validate import original_trajectories, pruning_fidelity

REAL = {"frames": 13, "tokens_per_frame": 30 * 45, "context": 226}  # CogVideoX-2B at 49 x 480 x 720
ATTENTION_SHARE = 0.607  # of CogVideoX-2B's forward FLOPs at that shape (benchmarks/joint_attention.py --meta)
ACTIONS = {"frame-local": ("frame-local", 0), "window-1": ("temporal-window", 1), "window-2": ("temporal-window", 2),
           "remove": ("remove", 0)}
DATA_CRITERIA = ("temporal_contribution", "contribution", "magnitude", "random")
SCHEDULES = {"all": (0.0, 1.0), "middle": (0.2, 0.8), "after-first-quarter": (0.25, 1.0)}  # [pruning].pruned_steps


def point_key(p: dict) -> str:
    return f"{p['lever']}|{p['criterion']}|{p['compensate']}|{p['schedule']}|{p['ratio']:g}"


def flops_removed(plan, schedule_share: float) -> float:
    local = {}
    for heads in plan.local_heads.values():
        local[plan.window] = local.get(plan.window, 0) + len(heads)
    removed = plan.removed_heads if plan.action == "remove" else 0
    return attention_flops_removed(local, removed, plan.total_heads, pruned_steps=schedule_share, **REAL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--levers", default=",".join(ACTIONS))
    parser.add_argument("--ratios", default="0.25,0.5,0.75,0.9")
    parser.add_argument("--sensitivity-prompts", type=int, default=4)
    parser.add_argument("--sensitivity-steps", type=int, default=10)
    parser.add_argument("--stage", choices=("criteria", "levers", "both"), default="both")
    parser.add_argument("--criteria", default=",".join((*DATA_CRITERIA, "sensitivity")), help="of the criteria stage")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="of the levers stage")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--report", action="store_true", help="only print the table and plot of --out's points")
    args = parser.parse_args()
    if args.report:
        report(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    adapter = get_adapter(recipe.model.family, recipe.model.adapter_options)
    bundle = adapter.checkpoint.load_folder(Path(recipe.model.path))
    m = recipe.model
    shape = VideoShape(m.frames, m.latent_height, m.latent_width)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {"recipe": str(args.recipe), "points": []}
    done = {point_key(p) for p in record["points"]}
    levers = args.levers.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]

    started = time.perf_counter()
    scores = calibrate(adapter, bundle, shape, recipe.calibration)
    record["calibration_seconds"] = round(time.perf_counter() - started, 1)
    record["distance_mass"] = {name: m.distance_mass for name, m in scores.modules.items()}
    subset = {"prompts": recipe.calibration.prompts[:args.sensitivity_prompts], "steps": args.sensitivity_steps}
    if len(getattr(recipe.calibration, "source_videos", [])) > 1:  # one source clip per prompt: the same subset
        subset["source_videos"] = recipe.calibration.source_videos[:args.sensitivity_prompts]
    sensitivity_calibration = dataclasses.replace(recipe.calibration, **subset)
    sensitivities = {}
    for lever in levers if "sensitivity" in args.criteria.split(",") else []:
        action, window = ACTIONS[lever]
        started = time.perf_counter()
        measured = calibrate(adapter, bundle, shape, sensitivity_calibration, measure=OutputMeasure(action, window))
        record.setdefault("sensitivity_seconds", {})[lever] = round(time.perf_counter() - started, 1)
        sensitivities[lever] = {name: m.scores["sensitivity"] for name, m in measured.modules.items()}
        for name, module in scores.modules.items():
            module.scores[f"sensitivity:{lever}"] = sensitivities[lever][name]

    joint = "frame-local" in adapter.structure.actions
    references = original_trajectories(adapter, bundle, shape, recipe.validation)
    timesteps = references[0].timesteps[-recipe.validation.steps:]
    train_timesteps = int(adapter.scheduler(bundle).config["num_train_timesteps"])
    original_task = None

    def evaluate(lever: str, criterion: str, compensate: bool, schedule: str, ratio: float) -> None:
        nonlocal original_task
        point = {"lever": lever, "criterion": criterion, "compensate": compensate, "schedule": schedule,
                 "ratio": ratio}
        if point_key(point) in done:
            return
        action, window = ACTIONS[lever]
        ranking = f"sensitivity:{lever}" if criterion == "sensitivity" else criterion
        section = PruningSection(criterion="contribution", ratio=ratio, action=action, window=max(window, 1),
                                 compensate=compensate)
        ranked = dataclasses.replace(scores, modules={
            name: dataclasses.replace(module, scores={"contribution": module.scores[ranking]})
            for name, module in scores.modules.items()})
        plan = make_plan(ranked, section)
        pruned = pruned_copy(adapter, bundle.model, plan, scores.compensation)
        stretch = StepSchedule(*SCHEDULES[schedule], train_timesteps)
        model = scheduled(adapter, bundle, pruned, SCHEDULES[schedule])
        fidelity = pruning_fidelity(adapter, bundle, model, shape, recipe.validation, references)
        point.update({
            "heads": plan.removed_heads, "total_heads": plan.total_heads,
            "pruned_steps": [i for i, t in enumerate(timesteps) if stretch.prunes(t)],
            "video_psnr_min": fidelity.summary.get("video_psnr_min"),
            "video_psnr_mean": fidelity.summary.get("video_psnr_mean"),
            "video_ssim_min": fidelity.summary.get("video_ssim_min"),
            **({f"task_{k}": v for k, v in fidelity.task["pruned"].items()} if fidelity.task else {})})
        if joint:  # priced at CogVideoX-2B's shape: a joint-attention model's heads
            removed = flops_removed(plan, stretch.share(timesteps))
            point.update({"attention_flops_removed": removed, "ideal_speedup": 1 / (1 - ATTENTION_SHARE * removed)})
        if fidelity.task:
            original_task = fidelity.task["original"]
            record["task_original"] = original_task
        record["points"].append(point)
        done.add(point_key(point))
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{lever:12s} {criterion:22s} comp={compensate!s:5s} {schedule:20s} r={ratio:<5g} heads "
              f"{plan.removed_heads:3d}  flops -{100 * point.get('attention_flops_removed', math.nan):5.1f} %  "
              f"PSNR min {point['video_psnr_min']:.2f}  "
              f"SSIM min {point['video_ssim_min']:.3f}  dir {point.get('task_direction_accuracy', math.nan):.3f}",
              flush=True)

    if args.stage in ("criteria", "both"):
        for lever in levers:
            for criterion in args.criteria.split(","):
                for ratio in ratios:
                    evaluate(lever, criterion, False, "all", ratio)
    if args.stage in ("levers", "both"):
        for lever in levers:
            mine = [p for p in record["points"] if p["lever"] == lever and not p["compensate"]
                    and p["schedule"] == "all"]
            best = max(args.criteria.split(","), key=lambda c: sum(
                p["video_psnr_min"] for p in mine if p["criterion"] == c) if mine else 0)
            for ratio in ratios:
                evaluate(lever, best, True, "all", ratio)
                for schedule in args.schedules.split(","):
                    if schedule != "all":
                        evaluate(lever, best, False, schedule, ratio)
                        evaluate(lever, best, True, schedule, ratio)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    report(record, args.out.with_suffix(".png"))


def within_budget(p: dict, task_original: dict | None) -> bool:
    """The issue's budget: video PSNR >= 25 dB and SSIM >= 0.85 on every frame of every held-out video, the
    task's direction accuracy within 0.1 of the original's."""
    task_ok = task_original is None or \
        p.get("task_direction_accuracy", 0.0) >= task_original["direction_accuracy"] - 0.1
    return p["video_psnr_min"] >= 25.0 and p["video_ssim_min"] >= 0.85 and task_ok


def pareto_front(points: list[dict], x: str) -> list[dict]:
    """The points no other point beats on both ``x`` (more is better) and the worst frame's PSNR."""
    ranked = sorted(points, key=lambda p: (-p[x], -p["video_psnr_min"]))
    front, best = [], -math.inf
    for p in ranked:
        if p["video_psnr_min"] > best:
            front.append(p)
            best = p["video_psnr_min"]
    return front


def report(record: dict, png: Path) -> None:
    """The table of every point, the Pareto front, the best point within the budget, and the plot."""
    points, task = record["points"], record.get("task_original")
    x = "attention_flops_removed" if points and "attention_flops_removed" in points[0] else "heads"
    print("| lever | criterion | compensate | schedule | ratio (heads) | attention FLOPs removed (CogVideoX-2B) "
          "| video PSNR min / mean (dB) | SSIM min | direction | in budget |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in sorted(points, key=lambda p: (p["lever"], p["criterion"], p["compensate"], p["schedule"], p["ratio"])):
        flops = f"{100 * p['attention_flops_removed']:.1f} %" if "attention_flops_removed" in p else "-"
        print(f"| {p['lever']} | {p['criterion']} | {'yes' if p['compensate'] else 'no'} | {p['schedule']} "
              f"| {p['ratio']:g} ({p['heads']}) | {flops} | {p['video_psnr_min']:.1f} / {p['video_psnr_mean']:.1f} "
              f"| {p['video_ssim_min']:.3f} | {p.get('task_direction_accuracy', math.nan):.3f} "
              f"| {'yes' if within_budget(p, task) else 'no'} |")
    inside = [p for p in points if within_budget(p, task)]
    if inside and x == "attention_flops_removed":
        best = max(inside, key=lambda p: (p[x], p["video_psnr_min"]))
        print(f"\nbest within the budget (PSNR >= 25 dB, SSIM >= 0.85, direction within 0.1 of the original's "
              f"{task['direction_accuracy'] if task else math.nan:.3f}): {best['lever']} / {best['criterion']} / "
              f"compensate {best['compensate']} / {best['schedule']} / ratio {best['ratio']:g}: "
              f"{100 * best[x]:.1f} % of the attention FLOPs removed, ideal {best['ideal_speedup']:.3f}x "
              f"(PSNR min {best['video_psnr_min']:.1f} dB, SSIM min {best['video_ssim_min']:.3f})")
    elif x == "attention_flops_removed":
        print("\nno point within the budget")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {("all", False): "o", ("all", True): "s"}
    for lever in dict.fromkeys(p["lever"] for p in points):
        for (schedule, compensate) in dict.fromkeys((p["schedule"], p["compensate"]) for p in points):
            mine = [p for p in points if p["lever"] == lever and p["schedule"] == schedule
                    and p["compensate"] == compensate]
            if mine:
                ax.scatter([100 * p.get(x, 0) if x != "heads" else p[x] for p in mine],
                           [min(p["video_psnr_min"], 60) for p in mine],
                           marker=markers.get((schedule, compensate), "^" if not compensate else "D"),
                           label=f"{lever}, {schedule}{', comp.' if compensate else ''}", alpha=0.75)
    front = pareto_front(points, x)
    ax.plot([100 * p[x] if x != "heads" else p[x] for p in front], [min(p["video_psnr_min"], 60) for p in front],
            "k--", linewidth=1, label="Pareto front")
    ax.axhline(25, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="attention FLOPs removed at CogVideoX-2B's shape (%)" if x != "heads" else "heads pruned",
           ylabel="video PSNR, worst frame of the held-out videos (dB)", title=record["recipe"])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    with torch.no_grad():
        main()
