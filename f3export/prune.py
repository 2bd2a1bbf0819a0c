"""Planning which temporal heads go, and removing them physically.

For a head h of an attention with head width d, pruning drops rows
[h*d:(h+1)*d] of the q, k and v projections and the same columns of the output
projection, then sets the module's head count (each family's
``AttentionHeads`` knows where those rows live). A module that loses every
head is replaced by its constant remainder (the output bias) and its own norm
by the identity.

The plan's ``action`` says what happens to the heads ranked below the ratio:
``remove`` (F3) as above, ``frame-local`` (joint 3D attention,
``models/joint_attention.py``): they keep their weights and attend within their
own frame, or ``temporal-window``: within their own frame and ``window`` frames
on each side. A plan is structure plus provenance: which heads each module keeps
(``KeptHeads``) and which of them are frame-local (``LocalHeads``), all that
pruning, masking and reloading read, and the recipe choices that produced it
(recorded in plan.json). The saved pruned model records both in its config, so
a reload rebuilds exactly those.

Exactness: the pruned model equals the original with the removed heads'
output-projection columns zeroed and the frame-local heads' scores of keys
beyond their window at -inf (``mask_heads``), to float tolerance.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import write_json
from .calibrate import Scores
from .errors import CheckpointError
from .models import FAMILIES, get_adapter
from .models.base import ModelAdapter
from .models.structure import TemporalSite
from .recipe import LOCAL_ACTIONS, PruningSection
from .schedule import FULL
from .weights import load_into, load_state_dict, read_json, save_state_dict

PRUNED_CONFIG = "config.json"
PRUNED_WEIGHTS = "model.safetensors"

KeptHeads = dict[str, list[int]]  # temporal module -> ascending indices of its original heads that stay
LocalHeads = dict[str, list[int]]  # temporal module -> ascending indices of its heads made frame-local


@dataclass
class PruningPlan:
    """Which heads are pruned (``heads``, ``removed``: the heads ranked below the ratio, removed or made
    frame-local by ``action``; applied as ``kept_heads`` and ``local_heads``) and why (the rest: provenance)."""

    criterion: str
    scope: str
    ratio: float
    min_heads_per_module: int
    keep: list[str]
    heads: dict[str, int]  # module -> heads before pruning
    removed: dict[str, list[int]]  # module -> indices of removed heads (sorted)
    search: dict[str, Any] | None = None  # how ratio = "auto" chose ``ratio`` (search.py), None when given
    action: str = "remove"
    window: int = 0  # frames on each side the local heads read (0: frame-local)
    compensate: bool = False  # what the pruned heads no longer write is folded into the output bias
    steps: tuple[float, float] = FULL  # the stretch of each trajectory that runs the pruned model

    @property
    def total_heads(self) -> int:
        return sum(self.heads.values())

    @property
    def removed_heads(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def kept_heads(self) -> KeptHeads:
        """Every module's kept heads (all of them, when the pruned heads go frame-local)."""
        gone = self.removed if self.action == "remove" else {}
        return {m: [h for h in range(n) if h not in gone.get(m, [])] for m, n in self.heads.items()}

    @property
    def local_heads(self) -> LocalHeads:
        """Every module's frame-local heads (none, when the pruned heads are removed)."""
        return dict(self.removed) if self.action in LOCAL_ACTIONS else {}

    def head_counts(self) -> dict[str, int]:
        return {m: len(kept) for m, kept in self.kept_heads.items()}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = {
            "ratio": self.ratio,
            "total_heads": self.total_heads,
            "removed_heads": self.removed_heads,
            "modules_removed": sorted(m for m, n in self.head_counts().items() if n == 0),
            "action": self.action,
            "window": self.window,
            "compensate": self.compensate,
            "steps": list(self.steps),
        }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PruningPlan":
        plan = cls(**{k: v for k, v in data.items() if k != "summary"})
        plan.steps = tuple(plan.steps)
        return plan


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_plan(scores: Scores, section: PruningSection) -> PruningPlan:
    """Rank heads by the criterion and remove the lowest ``ratio`` of them.

    Modules matching a ``keep`` pattern are never pruned and no module drops
    below ``min_heads_per_module``; when those limits bind, fewer heads go.
    Ties are broken by module order, then head index, so plans are deterministic.
    """
    heads = {name: m.heads for name, m in scores.modules.items()}
    protected = {m for m in heads if any(fnmatch.fnmatchcase(m, pattern) for pattern in section.keep)}
    order = {name: i for i, name in enumerate(heads)}
    left = dict(heads)
    removed: dict[str, list[int]] = {m: [] for m in heads}

    def candidates(modules):
        ranked = [(scores.modules[m].scores[section.criterion][h], order[m], h, m)
                  for m in modules if m not in protected for h in range(heads[m])]
        return sorted(ranked)

    def take(ranked, budget):
        for _, _, head, module in ranked:
            if budget == 0:
                break
            if left[module] - 1 >= section.min_heads_per_module:
                removed[module].append(head)
                left[module] -= 1
                budget -= 1

    if section.scope == "global":
        take(candidates(heads), _round_half_up(section.ratio * sum(heads.values())))
    else:
        for module in heads:
            take(candidates([module]), _round_half_up(section.ratio * heads[module]))
    return PruningPlan(section.criterion, section.scope, section.ratio, section.min_heads_per_module,
                       list(section.keep), heads, {m: sorted(v) for m, v in removed.items() if v},
                       action=section.action or "remove", window=section.frames_window, compensate=section.compensate,
                       steps=tuple(section.pruned_steps))


def remove_site(model: nn.Module, site: TemporalSite) -> None:
    """Replace a fully pruned attention by its constant remainder, and its own norm by the identity."""
    model.set_submodule(site.attention, site.heads_of(model).removed())
    if site.own_norm is not None:
        model.set_submodule(site.own_norm, nn.Identity())


def apply_plan(model: nn.Module, sites: list[TemporalSite], kept: KeptHeads, local: LocalHeads | None = None,
               window: int = 0) -> None:
    """Physically keep only the listed heads of each module (a module not listed keeps all) and make the
    ``local`` heads frame-local (``window`` frames on each side), in place."""
    for site in sites:
        heads = site.heads_of(model)
        if local and local.get(site.attention):
            heads.localize(local[site.attention], window)
        keep = kept.get(site.attention)
        if keep is None or len(keep) == heads.heads:
            continue
        if keep:
            heads.keep(keep)
        else:
            remove_site(model, site)


def compensation_shifts(plan: PruningPlan, compensation: dict[str, dict[str, torch.Tensor]] | None
                        ) -> dict[str, torch.Tensor]:
    """Per module with pruned heads, what ``compensate`` adds to its output bias: the calibration-mean of what
    those heads no longer write (removed: their whole write; frame-local / windowed: what the window loses,
    renormalised as the pruned head is). None without ``plan.compensate``."""
    if not plan.compensate:
        return {}
    shifts = {}
    for module, heads in plan.removed.items():
        parts = (compensation or {}).get(module)
        if parts is None:
            raise CheckpointError(f"[pruning].compensate: the calibration measured no compensation means for "
                                  f"{module!r} (its family's attention does not record them)")
        lost = parts["written"][heads] if plan.action == "remove" else \
            parts["window_loss"][heads, min(plan.window, parts["window_loss"].shape[1] - 1)]
        shifts[module] = lost.sum(dim=0)
    return shifts


def compensate(model: nn.Module, sites: list[TemporalSite], shifts: dict[str, torch.Tensor]) -> None:
    """Add each module's shift to its output bias, in place (before pruning: the bias is carried over)."""
    for site in sites:
        if site.attention in shifts:
            try:
                site.heads_of(model).add_output_bias(shifts[site.attention])
            except ValueError as exc:
                raise CheckpointError(f"[pruning].compensate: {site.attention}: {exc}") from None


def pruned_copy(adapter: ModelAdapter, model: nn.Module, plan: PruningPlan,
                compensation: dict[str, dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """A copy of ``model`` pruned by ``plan`` (compensated from ``compensation``, the calibration's means, where
    the plan says); the model itself is left whole."""
    pruned = copy.deepcopy(model)
    sites = adapter.structure.temporal_sites(pruned)
    compensate(pruned, sites, compensation_shifts(plan, compensation))
    apply_plan(pruned, sites, plan.kept_heads, plan.local_heads, plan.window)
    return pruned


@torch.no_grad()
def mask_heads(model: nn.Module, sites: list[TemporalSite], kept: KeptHeads, local: LocalHeads | None = None,
               window: int = 0) -> None:
    """Zero the output-projection columns of every head not kept and mask the ``local`` heads' scores of keys
    beyond ``window`` frames (the reference for exactness)."""
    for site in sites:
        heads = site.heads_of(model)
        gone = [h for h in range(heads.heads) if h not in kept.get(site.attention, range(heads.heads))]
        if gone:
            heads.mask(gone)
        if local and local.get(site.attention):
            heads.mask_cross_frame(local[site.attention], window)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_pruned(adapter: ModelAdapter, config: dict[str, Any], model: nn.Module, kept: KeptHeads,
                folder: Path, local: LocalHeads | None = None, window: int = 0,
                steps: tuple[float, float] = FULL) -> list[Path]:
    """A self-contained pruned model: weights + the family config + the heads each temporal module kept and
    those it made frame-local, with their window; and the stretch of the trajectory it runs (``steps``: what
    the export records for the runtime, so it is part of the pruned model's files)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, config_path = folder / PRUNED_WEIGHTS, folder / PRUNED_CONFIG
    save_state_dict(model, weights)
    write_json(config_path, {"family": adapter.family, "adapter_options": adapter.options(), "config": config,
                             "kept_heads": kept, "local_heads": local or {}, "window": window,
                             "steps": list(steps)})
    return [weights, config_path]


def load_pruned(folder: Path) -> tuple[ModelAdapter, dict[str, Any], nn.Module]:
    """Rebuild a model saved by ``save_pruned``: base network, its recorded kept heads, strict weight load."""
    path = folder / PRUNED_CONFIG
    meta = read_json(path)
    try:
        if meta["family"] not in FAMILIES:
            raise KeyError(f"family {meta['family']!r}")
        adapter = get_adapter(meta["family"], meta.get("adapter_options"))
        config, kept, local = meta["config"], meta["kept_heads"], meta.get("local_heads", {})
        window = meta.get("window", 0)
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing or unknown {exc}") from None
    model = adapter.checkpoint.build(config).eval()
    sites = adapter.structure.temporal_sites(model)
    heads = {s.attention: s.heads_of(model).heads for s in sites}
    for key, listed in (("kept_heads", kept), ("local_heads", local)):
        unknown = sorted(set(listed) - set(heads))
        if unknown:
            raise CheckpointError(f"{path}: unknown temporal module {unknown[0]!r}")
        for module, indices in listed.items():
            if not (isinstance(indices, list) and all(type(h) is int for h in indices)
                    and indices == sorted(set(indices)) and set(indices) <= set(range(heads[module]))):
                raise CheckpointError(f"{path}: {key}[{module!r}] = {indices!r} is not an ascending list of "
                                      f"distinct head indices in [0, {heads[module] - 1}]")
    if local and "frame-local" not in adapter.structure.actions:
        raise CheckpointError(f"{path}: local_heads given, but {adapter.family} heads cannot go frame-local")
    if type(window) is not int or window < 0:
        raise CheckpointError(f"{path}: window = {window!r} is not a frame count >= 0")
    apply_plan(model, sites, kept, local, window)
    weights = folder / PRUNED_WEIGHTS
    load_into(model, load_state_dict(weights), weights, assign=True)  # no second copy of the weights
    return adapter, config, model
