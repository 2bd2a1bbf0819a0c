"""The ``sensitivity`` criterion: each head's effect on the model's prediction, measured at the output.

F3's criteria score a head by what it writes at its own module; a write that is small there can still move
the prediction a lot (a head next to a U-Net's output: zoo/README.md). Sensitivity measures it where it
counts: at every model call of the calibration runs, the relative change of the prediction (the noise or
velocity, or a token model's logits) with that head alone changed by the recipe's action (removed, made
frame-local or windowed), ``||y_h - y|| / ||y||``, averaged per step and overall.

Cost: the heads are changed ``per_pass`` at a time, each in its own copy of the call's batch (the batch
repeated ``per_pass`` times, copy v with head v changed), so one model call costs
``ceil(heads / per_pass)`` extra forward passes at ``per_pass`` times the batch: for 48 heads at 8 a pass,
6 passes of 8x the batch, about 48x the call's own compute. The trajectory itself follows the unchanged model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .models.structure import TemporalSite


@dataclass(frozen=True)
class OutputMeasure:
    """What sensitivity changes a head by: the recipe's action and window, and how many heads one pass varies."""

    action: str
    window: int = 0
    per_pass: int = 8

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "window": self.window}


def repeated(value: Any, batch: int, copies: int) -> Any:
    """Every tensor whose leading axis is the call's batch, repeated ``copies`` times along it (copy-major)."""
    def repeat(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t] * copies) if t.dim() and t.shape[0] == batch else t
    return tree_map_only(torch.Tensor, repeat, value)


def _batch_of(args: tuple, kwargs: dict) -> int:
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)
    if first is None:
        raise ValueError("sensitivity: the model call has no batched tensor input")
    return first.shape[0]


class SensitivityProbe(nn.Module):
    """``model`` as the trajectories call it, measuring every head's sensitivity at each call.

    ``record(step_sums)`` receives, per call, module -> [heads] relative changes; ``paused`` silences the
    calibration's own hooks during the extra passes."""

    def __init__(self, runner: nn.Module, model: nn.Module, sites: list[TemporalSite], measure: OutputMeasure,
                 record: Callable[[dict[str, torch.Tensor]], None], paused: Callable[[], Any]):
        """``runner``: what the trajectories call (``model`` itself, or it placed on a device)."""
        super().__init__()
        self.inner, self.sites, self.measure = runner, sites, measure
        self.record, self.paused = record, paused
        self.model = [model]  # not a submodule: ``inner`` holds it already

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"sensitivity: the model returned {type(out).__name__}, not a tensor")
        with torch.no_grad(), self.paused():
            self.record(self.changes(out, args, kwargs))
        return out

    def changes(self, out: torch.Tensor, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        model = self.model[0]
        heads = [(site, h) for site in self.sites for h in range(site.heads_of(model).heads)]
        result = {site.attention: torch.zeros(site.heads_of(model).heads, dtype=torch.float64) for site in self.sites}
        batch, norm = _batch_of(args, kwargs), out.double().norm().clamp_min(1e-30)
        for start in range(0, len(heads), self.measure.per_pass):
            chunk = heads[start:start + self.measure.per_pass]
            with varied(model, chunk, self.measure):
                y = self.inner(*repeated(args, batch, len(chunk)), **repeated(kwargs, batch, len(chunk)))
            change = (y.double().unflatten(0, (len(chunk), -1)) - out.double()).flatten(1).norm(dim=1) / norm
            for (site, head), value in zip(chunk, change.cpu()):
                result[site.attention][head] = value
        return result


@contextlib.contextmanager
def varied(model: nn.Module, chunk: list[tuple[TemporalSite, int]], measure: OutputMeasure) -> Iterator[None]:
    """Copy v of the batch runs with head ``chunk[v]`` changed by the action (the others unchanged)."""
    undo = []
    try:
        for site in dict.fromkeys(site for site, _ in chunk):
            heads = site.heads_of(model)
            changed = torch.zeros(len(chunk), heads.heads, dtype=torch.bool)
            for v, (other, head) in enumerate(chunk):
                if other == site:
                    changed[v, head] = True
            undo.append(heads.vary(changed, measure.action, measure.window))
        yield
    finally:
        for restore in reversed(undo):
            restore()
