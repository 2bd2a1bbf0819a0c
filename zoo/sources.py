"""Source clips of the editing protocol: Tune-A-Video samples from the DDIM inversion of a source video.

    python -m zoo.sources            # writes zoo/sources/*.gif, the clips the shapes recipes invert

Tune-A-Video's own use: a video (here a training clip) is inverted under the empty prompt, and a prompt
describing another object doing the same thing is sampled from that noise. Each caption is paired with its
source: a training caption with the same motion (direction and speed), another colour and the other shape, so
the edit must change what moves and keep how it moves. Rendered by the task itself (deterministic), saved as
GIF (lossless for these colours, and what a person can look at); recipes name the files.
"""

from __future__ import annotations

from pathlib import Path

from f3export.tasks.shapes import (ALL_CAPTIONS, COLOURS, HELD_OUT_CAPTIONS, SHAPES, TRAIN_CAPTIONS, Caption, render,
                                   training_sample)
from f3export.videos import write_gif

SOURCES = Path(__file__).parent / "sources"


def edit_source(target: Caption) -> Caption:
    """The training caption ``target`` is edited from: same direction and speed, the other shape, the next
    colour (in COLOURS' order) that makes it a training caption."""
    colours = list(COLOURS)
    shape = SHAPES[1 - SHAPES.index(target.shape)]
    start = colours.index(target.colour)
    return next(c for k in range(1, len(colours) + 1)
                if (c := Caption(colours[(start + k) % len(colours)], shape, target.direction, target.speed))
                in TRAIN_CAPTIONS)


def source_path(caption: Caption, folder: Path = SOURCES) -> Path:
    return folder / (caption.text.removeprefix("a ").replace(" moves ", " ").replace(" ", "-") + ".gif")


def source_seed(caption: Caption) -> int:
    """The clip of a source caption: its place in the grammar, so that sources differ in path too."""
    return ALL_CAPTIONS.index(caption)


def write_sources(folder: Path = SOURCES) -> list[Path]:
    """The sources of the evaluation's captions (held-out, and the training sample), each once."""
    sources = dict.fromkeys(edit_source(c) for c in (*HELD_OUT_CAPTIONS, *training_sample()))
    for caption in sources:
        write_gif(source_path(caption, folder), render(caption, source_seed(caption)))
    return [source_path(c, folder) for c in sources]


if __name__ == "__main__":
    for path in write_sources():
        print(path)
