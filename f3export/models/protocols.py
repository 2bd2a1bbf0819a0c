"""Evaluation protocols: the inputs calibration and validation run a family's network on, and the recipe keys
that choose them. A diffusion protocol runs prompts x seeds, each a DDIM trajectory of ``steps`` network
calls with classifier-free guidance; a token protocol runs token sequences, one full-sequence forward each.
A family composes one; the core only asks it for runs, their count of network calls, and their batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from diffusers import DDIMInverseScheduler
from torch import nn

from ..errors import RecipeError
from ..recipe import RecipeKey, family_key
from ..tasks import TASKS
from ..videos import read_video
from ..scheduling.guidance import guidance_at
from .pipeline_parts import DiffusersSampler


class Run(ABC):
    """One calibration or validation input."""

    @abstractmethod
    def label(self) -> dict[str, Any]:
        """What names this run in the validation report."""

    def caption(self) -> str:
        """The run in a few words, under its pictures."""
        return ", ".join(f"{k}: {v}" for k, v in self.label().items())  # "prompt: a dog, seed: 1000"


@dataclass(frozen=True)
class PromptRun(Run):
    """A prompt and a seed (the seed draws the initial noise, or whatever the family makes random)."""

    prompt: str
    seed: int

    def label(self):
        return {"prompt": self.prompt, "seed": self.seed}


@dataclass(frozen=True)
class DiffusionRun(PromptRun):
    steps: int
    guidance_scale: float
    source: str | None = None  # a video file whose DDIM inversion is the initial latents (else the seed's noise)
    negative_prompt: str = ""  # the unconditional row's prompt
    dynamic_cfg: bool = False  # CogVideoX's use_dynamic_cfg: the guidance scale rises over the steps

    def guidance(self, t: float) -> float:
        return guidance_at(self.guidance_scale, self.dynamic_cfg, self.steps, t)



    def label(self):
        return {"prompt": self.prompt, **({"source": self.source} if self.source else {"seed": self.seed})}

    def caption(self):
        return f"{self.prompt}, from {Path(self.source).name}" if self.source else super().caption()


@dataclass(frozen=True, eq=False)  # an array field: compared by identity
class TokenRow(Run):
    """One row of a token file: a sequence in the family's layout."""

    source: str  # the file and row, e.g. "validation.npy[0]"
    tokens: np.ndarray

    def label(self):
        return {"tokens": self.source}


@dataclass
class Trajectory:
    """What one run produced; ``timesteps`` labels its network calls (the scheduler's, or [0] for one forward)."""

    timesteps: list[int]


@dataclass
class Denoising(Trajectory):
    noise_preds: list[torch.Tensor]  # the guided prediction of every step
    latents: torch.Tensor  # the final latents
    video: torch.Tensor | None = None  # the final latents as RGB frames [3, F, H, W] in [-1, 1], where decodable


@dataclass
class FramesForward(Trajectory):
    frame_logits: list[torch.Tensor]  # the logits of one full-sequence forward, frame by frame


def _both_sections(name: str, type: Any, default: Any, **checks: Any) -> tuple[RecipeKey, RecipeKey]:
    return tuple(family_key(section, name, type, default, **checks) for section in ("calibration", "validation"))


class EvaluationProtocol(ABC):
    recipe_keys: ClassVar[tuple[RecipeKey, ...]] = ()  # the [calibration]/[validation] keys its runs read
    batch: ClassVar[int] = 1  # batch of every network call in a run

    def check_section(self, section: Any, where: str, frames: int) -> None:
        """Refuse (RecipeError naming the key; ``where`` is "<file>: [section]") a [calibration] or [validation]
        section whose runs cannot be made, before anything is loaded; ``frames``: the recipe's clip length."""

    @abstractmethod
    def runs(self, section: Any) -> list[Run]:
        """The runs a [calibration] or [validation] section asks for."""

    @abstractmethod
    def calls(self, section: Any) -> int:
        """Network calls (on_step callbacks) in one run of ``section``."""


class DiffusionProtocol(EvaluationProtocol):
    """Every prompt with every seed, each a trajectory of the family's sampler with classifier-free guidance; or,
    with ``source_videos``, Tune-A-Video's editing protocol: every prompt sampled from the DDIM inversion of its
    source clip (under the empty prompt, as Tune-A-Video's ``ddim_inversion``), which carries the source's
    layout and motion into the video the prompt describes.

    Options of the family's pipeline: ``inversion`` (its sampler is DDIM, so source videos can be inverted),
    ``negative_prompt`` (the unconditional row's default prompt), ``dynamic_cfg`` (CogVideoX's
    ``use_dynamic_cfg`` is a recipe key) and ``skip_unconditional`` (guidance <= 1 runs the conditional row
    alone, as CogVideoXPipeline / WanPipeline do; the families f3export has long built keep both rows)."""

    recipe_keys = (*_both_sections("steps", int, 10, low=1, high=1000),
                   *_both_sections("guidance_scale", float, 7.5, low=0.0),
                   # the unconditional row's prompt; unset: the family pipeline's default
                   *_both_sections("negative_prompt", str | None, None),
                   # one animated image per prompt, or one for every prompt: runs start from its DDIM inversion
                   *_both_sections("source_videos", list[str], [], input_file=True),
                   # a task metric scoring the held-out videos of both models (f3export/tasks)
                   family_key("validation", "task", str | None, None, choices=tuple(TASKS)),
                   # a pruning gate on the task: how much each of its chance-scored metrics (moving shapes:
                   # direction accuracy) may drop from the original's
                   family_key("validation", "pruning_max_task_drop", float | None, None, low=0.0))
    batch = 2  # the unconditional and the conditional row together (inversion too: one batch for every call)

    def __init__(self, inversion: bool = True, negative_prompt: str = "", dynamic_cfg: bool = False,
                 skip_unconditional: bool = False):
        self.inversion = inversion
        self.negative_prompt = negative_prompt
        self.dynamic_cfg = dynamic_cfg
        self.skip_unconditional = skip_unconditional
        if dynamic_cfg:
            self.recipe_keys = (*type(self).recipe_keys, *_both_sections("use_dynamic_cfg", bool, False))

    def check_section(self, section, where, frames):
        sources, prompts = section.source_videos, section.prompts
        if not sources:
            return
        if not self.inversion:
            raise RecipeError(f"{where}.source_videos: this family samples with another scheduler than DDIM, and "
                              "runs from a source video need DDIM inversion")
        if len(sources) not in (1, len(prompts)):
            raise RecipeError(f"{where}.source_videos: {len(sources)} videos for {len(prompts)} prompts (give one "
                              "per prompt, or one for every prompt)")
        if len(section.seeds) > 1:
            raise RecipeError(f"{where}.seeds = {section.seeds}: runs from source_videos draw no noise (DDIM "
                              "inversion is deterministic), so more seeds would repeat them; give one")
        for i, path in enumerate(sources):
            found = read_video(Path(path)).shape[1]
            if found != frames:
                raise RecipeError(f"{where}.source_videos[{i}] = {path!r}: {found} frames, the recipe's clips have "
                                  f"{frames} ([model].frames)")

    def runs(self, section):
        settings = {"negative_prompt": self.negative_prompt if section.negative_prompt is None
                    else section.negative_prompt,
                    "dynamic_cfg": self.dynamic_cfg and section.use_dynamic_cfg}
        if section.source_videos:
            sources = section.source_videos * len(section.prompts) if len(section.source_videos) == 1 \
                else section.source_videos
            return [DiffusionRun(prompt, section.seeds[0], section.steps, section.guidance_scale, source, **settings)
                    for prompt, source in zip(section.prompts, sources, strict=True)]
        return [DiffusionRun(prompt, seed, section.steps, section.guidance_scale, **settings)
                for prompt in section.prompts for seed in section.seeds]

    def calls(self, section):
        return section.steps * (2 if section.source_videos else 1)  # the inversion's steps, then the sampling's

    def guided(self, run: DiffusionRun) -> bool:
        """Whether a run computes the unconditional row (classifier-free guidance)."""
        return not self.skip_unconditional or run.guidance_scale > 1.0

    @torch.no_grad()
    def trajectory(self, model: nn.Module, run: DiffusionRun, sampler: DiffusersSampler, context: torch.Tensor,
                   latent_shape: tuple[int, ...], noise_channels: int,
                   on_step: Callable[[int], None] | None = None, source: torch.Tensor | None = None) -> Denoising:
        """``context``: the negative prompt's and the run's text conditioning, stacked (the run's alone where
        ``guided`` is false); ``noise_channels``: the output channels that are the noise (more are a learned
        variance, as in Latte); ``source``: the clean latents of the run's source video, inverted into the
        initial latents (else the seed's noise)."""
        inverted: list[int] = []
        if source is not None:
            latents, inverted = self.invert(model, run.steps, sampler.config, context[:1], source, noise_channels,
                                            on_step)
        else:
            latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(run.seed))
        sampler.start(run.steps, run.seed)
        latents = latents * sampler.init_noise_sigma
        rows = len(context)
        noise_preds = []
        for i, t in enumerate(sampler.timesteps):
            if on_step is not None:
                on_step(len(inverted) + i)
            model_input = sampler.scale_model_input(torch.cat([latents] * rows), t)
            noise = model(model_input, t.float().expand(rows), context)[:, :noise_channels].float()
            if rows == 2:
                uncond, cond = noise.chunk(2)
                guided = uncond + run.guidance(t.item()) * (cond - uncond)
            else:
                guided = noise
            noise_preds.append(guided)
            latents = sampler.step(guided, i, t, latents)
        return Denoising(inverted + [int(t) for t in sampler.timesteps], noise_preds, latents)

    @staticmethod
    def invert(model: nn.Module, steps: int, schedule: Any, empty: torch.Tensor, latents: torch.Tensor,
               noise_channels: int, on_step: Callable[[int], None] | None) -> tuple[torch.Tensor, list[int]]:
        """DDIM inversion of clean ``latents`` under the empty prompt's conditioning ``empty`` (no guidance), with
        diffusers' ``DDIMInverseScheduler`` on the sampler's schedule: Tune-A-Video's ``ddim_inversion``, which
        steps t -> t + T/steps over the sampler's own timesteps in reverse. Returns the final (noisiest) latents
        and the timesteps of its network calls."""
        inverse = DDIMInverseScheduler.from_config(schedule)
        inverse.set_timesteps(steps)
        for i, t in enumerate(inverse.timesteps):
            if on_step is not None:
                on_step(i)
            # both rows the same input, so that every call of a run has the sampler's batch of 2
            noise = model(torch.cat([latents, latents]), t.float().expand(2), torch.cat([empty, empty]))
            latents = inverse.step(noise[:1, :noise_channels], t, latents).prev_sample
        return latents, [int(t) for t in inverse.timesteps]


class TokenProtocol(EvaluationProtocol):
    """The rows of the section's token file, or without one every prompt with every seed (the family makes a
    stand-in sequence of them); one full-sequence forward each."""

    recipe_keys = _both_sections("tokens", str | None, None, input_file=True)  # .npy int [runs, sequence]

    def runs(self, section):
        if section.tokens is None:
            return [PromptRun(prompt, seed) for prompt in section.prompts for seed in section.seeds]
        path = Path(section.tokens)
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{path}: not a readable .npy file ({str(exc).splitlines()[0]})") from None
        if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
            raise RecipeError(f"{path}: expected a non-empty 2-D integer array [runs, sequence], "
                              f"got {rows.dtype} {list(rows.shape)}")
        return [TokenRow(f"{path.name}[{i}]", row.astype(np.int64)) for i, row in enumerate(rows)]

    def calls(self, section):
        return 1  # causal masks give every position its prefix's result in one forward
