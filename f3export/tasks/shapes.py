"""Moving shapes: a synthetic text-to-video task with known ground truth, and its task metric.

A clip shows one coloured shape on black, moving in a straight line; its caption says what moves where
("a red circle moves left", "a blue square moves up slowly"). Everything is procedural and seeded, so the
same caption and seed always give the same clip. Doing the task needs what temporal attention is for: the
shape must keep its colour and size from frame to frame (identity) and move steadily the way the caption
says (motion).

The task metric reads only generated frames: a colour mask locates the shape in every frame, and its
centroids score the motion direction against the caption, the trajectory's smoothness, and the shape's
identity across frames (a mini VBench for this task).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down
SPEEDS = {"slowly": 1.0, "": 1.5}  # pixels per frame; the caption says "slowly" or nothing
CHANCE = {"direction_accuracy": 1 / len(DIRECTIONS)}  # a direction picked at random

FRAMES, SIZE, RADIUS = 8, 16, 2.5  # clip length, frame side, shape half-size (pixels)


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    direction: str
    speed: str = ""

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}" + (f" {self.speed}" if self.speed else "")

    @classmethod
    def parse(cls, text: str) -> "Caption":
        """The caption of a text of the grammar; ValueError naming the text otherwise."""
        words = text.split()
        if len(words) not in (5, 6) or words[0] != "a" or words[3] != "moves" or words[1] not in COLOURS \
                or words[2] not in SHAPES or words[4] not in DIRECTIONS or words[5:] not in ([], ["slowly"]):
            raise ValueError(f"{text!r} is not a caption of the moving-shapes grammar "
                             "('a <colour> <shape> moves <direction>[ slowly]')")
        return cls(words[1], words[2], words[4], "".join(words[5:]))


ALL_CAPTIONS = tuple(Caption(c, s, d, v) for c, s, d, v in itertools.product(COLOURS, SHAPES, DIRECTIONS, SPEEDS))


def held_out(caption: Caption) -> bool:
    """The fixed held-out split, one caption in eight (every colour, shape, direction and speed among them):
    every word of a held-out caption is in training captions, only their combination is new."""
    colour, shape = list(COLOURS).index(caption.colour), SHAPES.index(caption.shape)
    direction, speed = list(DIRECTIONS).index(caption.direction), list(SPEEDS).index(caption.speed)
    return (colour + shape + 2 * direction + 2 * speed) % 8 == 0


TRAIN_CAPTIONS = tuple(c for c in ALL_CAPTIONS if not held_out(c))
HELD_OUT_CAPTIONS = tuple(c for c in ALL_CAPTIONS if held_out(c))


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


def render(caption: Caption, seed: int, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """The clip of ``caption``: RGB in [-1, 1], [3, frames, size, size]. The seed places the path: where
    across the frame it runs and where along its direction it starts, always inside the frame."""
    generator = torch.Generator().manual_seed(seed)
    dx, dy = DIRECTIONS[caption.direction]
    travel = SPEEDS[caption.speed] * (frames - 1)
    low, high = RADIUS + 0.5, size - 1 - RADIUS - 0.5  # centres that keep the whole shape visible
    slack = high - low - travel
    start_along = low + slack * torch.rand((), generator=generator).item()
    across = low + (high - low) * torch.rand((), generator=generator).item()
    steps = torch.arange(frames, dtype=torch.float64) * SPEEDS[caption.speed]
    along = start_along + steps if dx + dy > 0 else high - (start_along - low) - steps
    x, y = (along, torch.full_like(along, across)) if dx else (torch.full_like(along, across), along)
    grid = torch.arange(size, dtype=torch.float64)
    ox, oy = grid[None, None, :] - x[:, None, None], grid[None, :, None] - y[:, None, None]
    if caption.shape == "circle":
        coverage = (RADIUS + 0.5 - torch.sqrt(ox**2 + oy**2)).clamp(0, 1)
    else:
        coverage = (RADIUS + 0.5 - ox.abs()).clamp(0, 1) * (RADIUS + 0.5 - oy.abs()).clamp(0, 1)
    colour = torch.tensor(COLOURS[caption.colour], dtype=torch.float64)
    clip = coverage[None] * colour[:, None, None, None]
    return (clip * 2 - 1).float()


@dataclass(frozen=True)
class TaskScores:
    """The task metric of generated clips, each against its caption."""

    direction_accuracy: float  # fraction of clips whose shape moved the caption's way (chance: 1/4)
    smoothness: float  # mean |second difference| of the shape's centroid, pixels/frame^2 (0: steady motion)
    identity: float  # mean over clips of the fraction of frames where the shape is found at its clip's size
    found: float  # fraction of frames where a blob of the caption's colour is found at all

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def locate(clip: torch.Tensor, colour: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame of ``clip`` ([3, F, H, W] in [-1, 1]): the centroid (x, y) of the blob of ``colour``
    ([F, 2], NaN where there is none) and the colour's area (pixels, coverage-weighted)."""
    rgb = (clip.double() + 1) / 2
    target = torch.tensor(COLOURS[colour], dtype=torch.float64)[:, None, None, None]
    # How much of each pixel is this colour: its brightness along the colour, if its hue is the colour's.
    strength = (rgb * target).sum(0) / (target**2).sum()
    residual = (rgb - strength[None] * target).norm(dim=0)
    weight = torch.where(residual < 0.25, strength.clamp(0, 1), torch.zeros_like(strength))
    weight = torch.where(weight > 0.2, weight, torch.zeros_like(weight))
    area = weight.sum((1, 2))
    height, width = clip.shape[2:]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    centroid = torch.stack([(weight * xs).sum((1, 2)), (weight * ys).sum((1, 2))], dim=1) / area[:, None]
    # A shape is a blob: most of the colour's mass lies near its centroid (scattered pixels are not a shape).
    near = ((xs - centroid[:, 0, None, None])**2 + (ys - centroid[:, 1, None, None])**2) <= (2 * RADIUS)**2
    compact = (weight * near).sum((1, 2)) >= 0.8 * area
    return torch.where((area[:, None] >= 1.0) & compact[:, None], centroid, torch.full_like(centroid, math.nan)), area


def score(clips: list[torch.Tensor], captions: list[Caption]) -> TaskScores:
    """The task metric of ``clips`` ([3, F, H, W] in [-1, 1]), each generated for its caption."""
    correct, jerks, identity, found = [], [], [], []
    for clip, caption in zip(clips, captions, strict=True):
        centroid, area = locate(clip, caption.colour)
        seen = ~centroid[:, 0].isnan()
        found.append(seen.double().mean().item())
        track = centroid[seen]
        moved = track[-1] - track[0] if len(track) >= 2 else torch.zeros(2, dtype=torch.float64)
        ways = {name: moved @ torch.tensor(unit, dtype=torch.float64) for name, unit in DIRECTIONS.items()}
        correct.append(float(len(track) >= 2 and moved.norm() >= 1.0 and max(ways, key=ways.get) == caption.direction))
        jerks.append((track[2:] - 2 * track[1:-1] + track[:-2]).norm(dim=1).mean().item() if len(track) >= 3
                     else math.nan)
        typical = area[seen].median() if seen.any() else torch.tensor(0.0, dtype=torch.float64)
        same_size = seen & ((area - typical).abs() <= 0.5 * typical)
        identity.append(same_size.double().mean().item())
    finite_jerks = [j for j in jerks if not math.isnan(j)]
    return TaskScores(direction_accuracy=sum(correct) / len(correct),
                      smoothness=sum(finite_jerks) / len(finite_jerks) if finite_jerks else math.nan,
                      identity=sum(identity) / len(identity), found=sum(found) / len(found))
