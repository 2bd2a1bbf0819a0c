"""What a person looks at: frame strips of the original and the pruned model's videos, and a report page.

Written by the validate stage next to ``validation.json`` when the model's outputs are frames.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .artifacts import atomic_path

SCALE = 4  # pixels per video pixel: small videos stay visible, sharp-edged
GAP = 2


def _rgb(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H*SCALE, W*SCALE, 3] uint8."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return frames.repeat(SCALE, axis=1).repeat(SCALE, axis=2)


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


def write_report(path: Path, title: str, gates: list[dict[str, Any]], pruning: dict[str, Any],
                 pictures: list[str]) -> None:
    """A Markdown page: the verdict, the gates, the task metric of both models, and the frame strips."""
    passed = all(g["passed"] for g in gates)
    lines = [f"# {title}", "", f"**{'PASSED' if passed else 'FAILED'}**: {sum(g['passed'] for g in gates)} of "
             f"{len(gates)} gates pass.", "", "| gate | value | limit | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {g['metric']} | {_value(g['value'])} | {'<=' if g['kind'] == 'max' else '>='} {g['limit']:g} | "
              f"{'pass' if g['passed'] else '**FAIL**'} |" for g in gates]
    task = pruning.get("task")
    if task:
        names = list(task["original"])
        lines += ["", "## Task metric (held-out prompts)", "", "| model | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        lines += [f"| {model} | " + " | ".join(_value(scores[n]) for n in names) + " |"
                  for model, scores in task.items()]
    for picture in pictures:
        lines += ["", "## Original vs pruned, same noise", "", f"![original vs pruned]({picture})"]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
