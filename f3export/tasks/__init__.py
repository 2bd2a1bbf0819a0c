"""Task metrics: what a generated video should show, scored from its frames against its prompt.

A recipe names one with ``[validation] task``; validation then scores the original and the pruned model's
videos of the held-out prompts, so a pruning's cost is also read in what the videos do, not only in how far
their pixels moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import shapes


@dataclass(frozen=True)
class Task:
    score: Callable[[list[torch.Tensor], list[str]], dict[str, float]]  # (clips [3, F, H, W], prompts) -> scores
    prompt_problem: Callable[[str], str | None]  # why a prompt is not one this task can score, or None
    chance: dict[str, float]  # what a metric reads for videos that ignore the prompt (a model not doing the task)


def _prompt_problem(parse: Callable[[str], object]) -> Callable[[str], str | None]:
    def problem(prompt: str) -> str | None:
        try:
            parse(prompt)
        except ValueError as exc:
            return str(exc)
        return None

    return problem


TASKS: dict[str, Task] = {
    "moving-shapes": Task(lambda clips, prompts: shapes.score(clips, [shapes.Caption.parse(p) for p in prompts])
                          .as_dict(), _prompt_problem(shapes.Caption.parse), shapes.CHANCE),
}
