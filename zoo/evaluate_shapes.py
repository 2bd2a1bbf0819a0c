"""Does a trained moving-shapes model do its task? The task metric of its samples, held-out and training
captions apart, written beside its weights (``evaluation.json``, ``samples.png``).

    python -m zoo.evaluate_shapes zoo/tav-shapes --edit

Sampling is f3export's own (the family's sampling loop: DDIM with classifier-free guidance over the
folder's scheduler and text encoder), so these are the videos a build's validation compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.models.protocols import DiffusionRun
from f3export.pictures import video_strips
from f3export.tasks.shapes import CHANCE, FRAMES, HELD_OUT_CAPTIONS, SIZE, Caption, score, training_sample
from f3export.videos import read_video
from zoo.sources import edit_source, source_path


def runs(captions: list[Caption], seeds: list[int], steps: int, guidance: float, edit: bool) -> list[DiffusionRun]:
    """Every caption with every seed; or, editing (Tune-A-Video's protocol), every caption once, sampled from
    the DDIM inversion of its source clip (zoo/sources.py)."""
    if edit:
        return [DiffusionRun(c.text, seeds[0], steps, guidance, str(source_path(edit_source(c)))) for c in captions]
    return [DiffusionRun(c.text, seed, steps, guidance) for c in captions for seed in seeds]


def sample(folder: Path, family: str, captions: list[Caption], seeds: list[int], steps: int, guidance: float,
           edit: bool = False) -> list[tuple[DiffusionRun, torch.Tensor]]:
    """Each run's video ([3, F, H, W] in [-1, 1])."""
    adapter = get_adapter(family)
    bundle = adapter.checkpoint.load_folder(folder)
    shape = VideoShape(FRAMES, SIZE, SIZE)
    return [(run, adapter.trajectory(bundle, bundle.model, run, shape).video)
            for run in runs(captions, seeds, steps, guidance, edit)]


def evaluate(folder: Path, family: str, seeds: list[int], steps: int, guidance: float, edit: bool = False) -> dict:
    """The task metric of samples from noise (top level) and, with ``edit``, of edits of source clips."""
    result = {"sampling": {"steps": steps, "guidance_scale": guidance, "seeds": seeds}, "chance": CHANCE}
    for editing in (False, True) if edit else (False,):
        scored = result.setdefault("edit", {"sources": "zoo/sources.py"}) if editing else result
        for split, captions in (("held_out", HELD_OUT_CAPTIONS), ("train", training_sample())):
            samples = sample(folder, family, list(captions), seeds, steps, guidance, editing)
            scored[split] = {"captions": len(captions),
                             **score([v for _, v in samples], [Caption.parse(r.prompt) for r, _ in samples]).as_dict()}
            if split == "held_out":
                video_strips(folder / ("samples-edit.png" if editing else "samples.png"),
                             [(run.caption(), {**({"source": read_video(Path(run.source))} if editing else {}),
                                               "sample": video}) for run, video in samples])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--family", default="tune-a-video")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--edit", action="store_true",
                        help="also score edits: captions sampled from the DDIM inversion of source clips")
    args = parser.parse_args()
    result = evaluate(args.folder, args.family, args.seeds, args.steps, args.guidance_scale, args.edit)
    (args.folder / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
