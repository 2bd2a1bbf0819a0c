"""Does a trained moving-shapes model do its task? The task metric of its samples, held-out and training
captions apart, written beside its weights (``evaluation.json``, ``samples.png``).

    python -m zoo.evaluate_shapes zoo/tav-shapes

Sampling is f3export's own (the family's sampling loop: DDIM with classifier-free guidance over the
folder's scheduler and text encoder), so these are the videos a build's validation compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.models.protocols import DiffusionRun
from f3export.pictures import video_strips
from f3export.tasks.shapes import (COLOURS, DIRECTIONS, FRAMES, HELD_OUT_CAPTIONS, SHAPES, SIZE, SPEEDS,
                                   TRAIN_CAPTIONS, Caption, score)

CHANCE = {"direction_accuracy": 1 / len(DIRECTIONS)}  # a direction picked at random


def training_sample() -> list[Caption]:
    """Eight training captions, one per direction and speed, colours and shapes in turn (a held-out
    combination takes the first shape that is not held out): the training side of the evaluation, balanced
    like the held-out one."""
    chosen = []
    for i, (direction, speed) in enumerate((d, v) for d in DIRECTIONS for v in SPEEDS):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i // len(COLOURS) % len(SHAPES)]
        chosen.append(next(c for s in (shape, *SHAPES)
                           if (c := Caption(colour, s, direction, speed)) in TRAIN_CAPTIONS))
    return chosen


def sample(folder: Path, family: str, captions: list[Caption], seeds: list[int], steps: int, guidance: float):
    adapter = get_adapter(family)
    bundle = adapter.checkpoint.load_folder(folder)
    shape = VideoShape(FRAMES, SIZE, SIZE)
    return [(caption, seed, adapter.trajectory(bundle, bundle.model, DiffusionRun(caption.text, seed, steps, guidance),
                                               shape).video)
            for caption in captions for seed in seeds]


def evaluate(folder: Path, family: str, seeds: list[int], steps: int, guidance: float) -> dict:
    result = {"sampling": {"steps": steps, "guidance_scale": guidance, "seeds": seeds}, "chance": CHANCE}
    for split, captions in (("held_out", HELD_OUT_CAPTIONS), ("train", training_sample())):
        samples = sample(folder, family, list(captions), seeds, steps, guidance)
        result[split] = {"captions": len(captions), **score([v for *_, v in samples], [c for c, *_ in samples])
                         .as_dict()}
        if split == "held_out":
            video_strips(folder / "samples.png", [(f"{c.text}, seed {s}", {"sample": v}) for c, s, v in samples])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--family", default="tune-a-video")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    args = parser.parse_args()
    result = evaluate(args.folder, args.family, args.seeds, args.steps, args.guidance_scale)
    (args.folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
