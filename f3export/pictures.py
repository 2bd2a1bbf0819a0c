"""What a person looks at: frame strips of the original and the pruned model's videos, and a report page.

The validate stage writes the strips next to ``validation.json`` when the model's outputs are frames; the
build (and ``f3export sweep``) writes the page from the files they wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .artifacts import atomic_path
from .text_standin import STANDIN_TEXT
from .report import plural, unvouched
from .videos import uint8_frames

SCALE = 4  # pixels per video pixel: small videos stay visible, sharp-edged
GAP = 2


def _rgb(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H*SCALE, W*SCALE, 3] uint8."""
    return uint8_frames(video).repeat(SCALE, axis=1).repeat(SCALE, axis=2)


def video_strips(path: Path, rows: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
    """One block per run: its label, then a strip of frames per model (``{"original": video, "pruned": ...}``),
    frames left to right."""
    first = next(iter(rows[0][1].values()))
    frames, height, width = first.shape[1], first.shape[2] * SCALE, first.shape[3] * SCALE
    label_width, line = 90, 12
    strip_height = height + GAP
    block = line + strip_height * len(rows[0][1]) + 2 * GAP
    canvas = Image.new("RGB", (label_width + frames * (width + GAP), block * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, videos) in enumerate(rows):
        top = r * block
        draw.text((2, top), label, fill="black")
        for m, (model, video) in enumerate(videos.items()):
            y = top + line + m * strip_height
            draw.text((2, y + height // 2 - 5), model, fill="black")
            for f, frame in enumerate(_rgb(video)):
                canvas.paste(Image.fromarray(frame), (label_width + f * (width + GAP), y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _value(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


# What tables and plots show of a pruned model's fidelity, in order of preference: video, task, latents.
SHOWN = ("video_psnr_mean", "video_ssim_mean", "task_direction_accuracy", "latent_psnr_min", "step_cosine_min",
         "logit_cosine_mean", "top1_agreement_min")


def shown_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The (at most three) SHOWN metrics every row's ``fidelity`` has."""
    present = set.intersection(*(set(r["fidelity"]) for r in rows))
    return [m for m in SHOWN if m in present][:3]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _search_lines(search: dict[str, Any]) -> list[str]:
    gates = list(search["chosen"]["gates"])
    budget = ", ".join(f"{key} = {limit:g}" for key, limit in search["budget"].items())
    rows = [[_value(t["ratio"]), str(t["removed_heads"]), *(_value(t["gates"][g]) for g in gates),
             "pass" if t["passed"] else "fail"] for t in search["tried"]]
    following = search["next"]
    verdict = (f"the next candidate, ratio {_value(following['ratio'])}, fails" if following
               else "removing every head passes")
    return ["", "## Ratio chosen for you", "",
            f"`ratio = \"auto\"` chose **{_value(search['chosen']['ratio'])}** "
            f"({search['chosen']['removed_heads']} heads pruned): the largest prefix of the ranking whose "
            f"held-out fidelity passes the budget ({budget}); {verdict}. Candidates tried:", "",
            *_markdown_table(["ratio", "heads pruned", *gates, "result"], rows)]


def _sweep_lines(sweep: dict[str, Any], picture: bool) -> list[str]:
    rows = sweep["rows"]
    metrics = shown_metrics(rows)
    lines = ["", "## Criteria compared (`f3export sweep`)", "",
             *_markdown_table(["criterion", "ratio", "heads pruned", *metrics, "measured speedup"],
                              [[r.get("series", r["criterion"]), f"{r['ratio']:g}", str(r["removed_heads"]),
                                *(_value(r["fidelity"][m]) for m in metrics), f"{r['measured_speedup']:.3f}x"]
                               for r in rows])]
    return lines + (["", "![criteria compared](sweep.png)"] if picture else [])


def _unvouched_lines(scores: dict) -> list[str]:
    """What the build cannot vouch for, at length: weights never trained, prompts the model never read."""
    lines = ["", "**Random weights**: the model was never trained, so its head ranking and fidelity say nothing "
                 "about a trained model."] if scores.get("random_weights") else []
    text = scores.get("text")
    if text is not None and text.startswith(STANDIN_TEXT):
        lines += ["", f"**Text conditioning: {text}.** Heads were ranked and fidelity measured on embeddings the "
                      "model never sees in use: a folder with its text encoder gives real ones."]
    elif text is not None:
        lines += ["", f"Text conditioning: {text}."]
    return lines


def write_report(root: Path, title: str) -> None:
    """``report.md``, a page for a person, from what the build and a sweep wrote (validation.json, plan.json,
    samples.png, sweep.json / sweep.png): the verdict and gates, how an automatic ratio was chosen, the task
    metric of both models, the frame strips and the criteria sweep. A view of those files, rewritten whenever
    they change, so never itself an artifact a stage or check relies on."""
    validation = json.loads((root / "validation.json").read_text())
    gates, pruning = validation["gates"], validation["metrics"]["pruning"]
    passed = all(g["passed"] for g in gates)
    scores = json.loads((root / "scores.json").read_text()) if (root / "scores.json").is_file() else {}
    caveats = unvouched(scores)
    on = f" on {' and '.join(caveats)}, which it cannot vouch for (below)" if caveats else ""
    lines = [f"# {title}", "", f"**{'PASSED' if passed else 'FAILED'}**{on}: {sum(g['passed'] for g in gates)} of "
             f"{plural(len(gates), 'gate')} pass" + ("es." if len(gates) == 1 else "."), "",
             *_markdown_table(["gate", "value", "limit", "result"],
                              [[g["metric"], _value(g["value"]), f"{'<=' if g['kind'] == 'max' else '>='} "
                                f"{g['limit']:g}", "pass" if g["passed"] else "**FAIL**"] for g in gates])]
    lines += _unvouched_lines(scores)
    search = json.loads((root / "plan.json").read_text()).get("search")
    if search:
        lines += _search_lines(search)
    task = pruning.get("task")
    if task:
        names = list(task["original"])
        lines += ["", "## Task metric (held-out prompts)", "",
                  *_markdown_table(["model", *names], [[model, *(_value(scores[n]) for n in names)]
                                                       for model, scores in task.items()])]
        chance = pruning.get("task_chance") or {}
        lines += [f"\n**The original scores {name} {_value(task['original'][name])}, no better than chance "
                  f"({_value(level)}): it does not do this part of the task, so this metric cannot show what pruning "
                  "costs.**" for name, level in chance.items() if task["original"][name] <= level]
    if (root / "samples.png").is_file():
        lines += ["", "## Original vs pruned, from the same inputs", "",
                  "Each held-out run's videos: from the same noise, or each model's DDIM inversion of the same "
                  "source clip (shown above them).", "", "![original vs pruned](samples.png)"]
    if (root / "sweep.json").is_file():
        lines += _sweep_lines(json.loads((root / "sweep.json").read_text()), (root / "sweep.png").is_file())
    with atomic_path(root / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
