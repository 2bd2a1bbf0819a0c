"""Calibration: per-head temporal attention statistics over the model's real runs.

A run is a whole denoising trajectory for diffusion families, one full-sequence
forward for token models (CogVideo); the family's ``AttentionHeads`` computes
the statistics below for its own attention layout.

Every criterion registered in ``criteria.CRITERIA`` is scored. For temporal
attention module m with heads h, x the residual stream entering the module and
A_h the frame-by-frame attention probabilities of head h:

* ``contribution``: mean over samples, steps, positions and frames of
  ||W_o[:, h] (A_h V_h)|| / ||x||, how much the head writes into the residual;
* ``mixing``: mean off-diagonal attention mass 1 - A_h[f, f], how much the head
  moves information across frames;
* ``magnitude``: the norm of the head's weights (q, k, v rows and W_o columns), data-free.

Token criteria are averaged per step (``per_step``) and overall; weight criteria have no steps.

Statistics are gathered by hooks that recompute the attention explicitly; the
model's own forward pass is left untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .criteria import CRITERIA, token_scorers
from .models.base import ModelAdapter, VideoShape
from .models.loading import ModelBundle
from .models.structure import TemporalSite
from .recipe import CalibrationSection
from .report import progress


@dataclass
class ModuleScores:
    heads: int
    head_dim: int
    scores: dict[str, list[float]]  # criterion -> per head
    per_step: dict[str, list[list[float]]] = field(default_factory=dict)  # criterion -> step -> per head


@dataclass
class Scores:
    modules: dict[str, ModuleScores]
    timesteps: list[int]
    samples: int
    note: str | None = None  # the family's ``calibration_note``

    def to_json(self) -> dict[str, Any]:
        return {
            "criteria": list(CRITERIA),
            "samples": self.samples,
            "timesteps": self.timesteps,
            **({"note": self.note} if self.note else {}),
            "modules": {name: vars(m) for name, m in self.modules.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Scores":
        return cls({n: ModuleScores(**m) for n, m in data["modules"].items()}, data["timesteps"], data["samples"],
                   data.get("note"))


class TemporalStatsRecorder:
    """Forward hooks on every temporal attention that accumulate per-step, per-head statistics."""

    def __init__(self, model: nn.Module, sites: list[TemporalSite], steps: int):
        self.model = model
        self.sites = sites
        self.step = 0
        self.steps = steps
        self._residual_norm: dict[str, torch.Tensor] = {}
        self.criteria = list(token_scorers())
        self.sums = {s.attention: {c: torch.zeros(steps, s.heads_of(model).heads, dtype=torch.float64)
                                   for c in self.criteria} for s in sites}
        self.tokens = {s.attention: torch.zeros(steps, dtype=torch.float64) for s in sites}

    @contextlib.contextmanager
    def attached(self) -> Iterator["TemporalStatsRecorder"]:
        handles = []
        for site in self.sites:
            attn = self.model.get_submodule(site.attention)
            if site.norm is not None:
                handles.append(self.model.get_submodule(site.norm).register_forward_pre_hook(
                    self._residual_hook(site.attention)))
            handles.append(attn.register_forward_pre_hook(self._attention_hook(site), with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _residual_hook(self, name: str):
        def hook(module, args):
            self._residual_norm[name] = args[0].detach().norm(dim=-1)
        return hook

    def _attention_hook(self, site: TemporalSite):
        def hook(attn, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            residual_norm = self._residual_norm.pop(site.attention, None)
            if residual_norm is None:
                residual_norm = hidden_states.detach().norm(dim=-1)
            named = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            per_criterion, tokens = site.access(attn).statistics(hidden_states.detach(), residual_norm, *args[1:],
                                                                 **named)
            sums = self.sums[site.attention]
            for criterion in self.criteria:
                sums[criterion][self.step] += per_criterion[criterion]
            self.tokens[site.attention][self.step] += tokens
        return hook

    def scores(self, timesteps: list[int], samples: int, note: str | None = None) -> Scores:
        modules = {}
        for site in self.sites:
            heads = site.heads_of(self.model)
            sums = self.sums[site.attention]
            tokens = self.tokens[site.attention]
            per_step = {c: (sums[c] / tokens.clamp_min(1.0)[:, None]).tolist() for c in self.criteria}
            overall = {c: (sums[c].sum(0) / tokens.sum().clamp_min(1.0)).tolist() if c in self.criteria
                       else scorer.score(heads.projections()).tolist() for c, scorer in CRITERIA.items()}
            modules[site.attention] = ModuleScores(heads.heads, heads.head_dim, overall, per_step)
        return Scores(modules, timesteps, samples, note)


def calibrate(adapter: ModelAdapter, bundle: ModelBundle, shape: VideoShape, section: CalibrationSection) -> Scores:
    """Run the model over the section's inputs (prompts x seeds, or token sequences) and score every temporal head."""
    model = bundle.model
    sites = adapter.structure.temporal_sites(model)
    steps = adapter.protocol.calls(section)
    recorder = TemporalStatsRecorder(model, sites, steps)
    runs = adapter.protocol.runs(section)
    timesteps: list[int] = []
    with recorder.attached(), progress() as bar:
        task = bar.add_task("calibrate", total=len(runs) * steps)

        def on_step(i: int) -> None:
            recorder.step = i
            bar.advance(task)

        for run in runs:
            timesteps = adapter.trajectory(bundle, model, run, shape, on_step).timesteps
    return recorder.scores(timesteps, len(runs), adapter.calibration_note)
