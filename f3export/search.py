"""``[pruning] ratio = "auto"``: the largest ratio whose held-out fidelity passes every pruning gate.

One calibration fixes the ranking, so the candidates are its prefixes: remove the k lowest-ranked heads,
k = 0..N (ratio k/N). Each candidate tried is pruned in PyTorch and samples the held-out runs of
[validation] against the original model's trajectories of them, computed once, and is judged by the same
pruning gates as the build's validation. A binary search over k finds the largest passing prefix in about
log2(N) + 1 candidates. It assumes that removing more heads never passes where removing fewer fails; the
plan records every candidate tried with its fidelity and gates, so a case where that does not hold shows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .calibrate import Scores
from .models.base import ModelAdapter, VideoShape
from .models.loading import ModelBundle
from .prune import PruningPlan, make_plan, pruned_copy
from .flops import count_flops
from .recipe import PruningSection, ValidationSection
from .schedule import StepSchedule, scheduled
from .report import console
from .validate import original_trajectories, pruning_fidelity, pruning_gates


def fidelity_budget(adapter: ModelAdapter, section: ValidationSection) -> list[str]:
    """The [validation] keys of the pruning gates the recipe sets: what an automatic ratio must pass."""
    keys = [gate.recipe_key for gate in adapter.fidelity_gates if getattr(section, gate.recipe_key) is not None]
    return keys + (["pruning_max_task_drop"] if getattr(section, "pruning_max_task_drop", None) is not None else [])


class RatioSearch:
    """Candidates by the number of heads removed, each tried once."""

    def __init__(self, adapter: ModelAdapter, bundle: ModelBundle, shape: VideoShape, scores: Scores,
                 pruning: PruningSection, validation: ValidationSection, references: list | None = None):
        self.adapter, self.bundle, self.shape, self.scores = adapter, bundle, shape, scores
        self.pruning, self.validation = pruning, validation
        self.heads = sum(module.heads for module in scores.modules.values())
        self.references = references if references is not None else \
            original_trajectories(adapter, bundle, shape, validation)
        self.trials: dict[int, dict[str, Any]] = {}

    def plan(self, removed: int) -> PruningPlan:
        return make_plan(self.scores, dataclasses.replace(self.pruning, ratio=removed / self.heads))

    def passes(self, removed: int) -> bool:
        plan = self.plan(removed)
        pruned = scheduled(self.adapter, self.bundle, pruned_copy(self.adapter, self.bundle.model, plan,
                                                                  self.scores.compensation), plan.steps)
        fidelity = pruning_fidelity(self.adapter, self.bundle, pruned, self.shape, self.validation, self.references)
        gates = pruning_gates(self.adapter, fidelity, self.validation)
        passed = all(g.passed for g in gates)
        self.trials[removed] = {"ratio": plan.ratio, "removed_heads": plan.removed_heads, "passed": passed,
                                "gates": {g.metric: g.value for g in gates}, "fidelity": fidelity.summary,
                                **({"task": fidelity.task["pruned"]} if fidelity.task else {})}
        shown = ", ".join(f"{g.metric} {g.value:.4g} ({'>=' if g.kind == 'min' else '<='} {g.limit:g})"
                          for g in gates)
        console.print(f"auto ratio: {plan.ratio:.4g} ({plan.removed_heads} of {self.heads} heads) "
                      f"{'passes' if passed else 'fails'}: {shown}", highlight=False)
        return passed

    def run(self) -> PruningPlan:
        """The plan of the largest passing prefix, its search recorded in ``plan.search``."""
        passing, failing = 0, self.heads + 1  # k = 0 removes nothing; N + 1 stands for "none fails"
        while failing - passing > 1:
            middle = (passing + failing) // 2
            if self.passes(middle):
                passing = middle
            else:
                failing = middle
        if passing == 0:
            self.passes(0)  # measured like any choice (the original itself, unless a gate cannot pass)
        plan = self.plan(passing)
        plan.search = {
            "budget": {key: getattr(self.validation, key) for key in fidelity_budget(self.adapter, self.validation)},
            "chosen": self.trials[passing],
            "next": self.trials.get(failing),  # None when removing every head passes
            "tried": [self.trials[k] for k in sorted(self.trials)],
        }
        return plan


def choose_ratio(adapter: ModelAdapter, bundle: ModelBundle, shape: VideoShape, scores: Scores,
                 pruning: PruningSection, validation: ValidationSection) -> PruningPlan:
    """The ratio search; with ``search_steps`` / ``search_windows``, once per candidate in order (the recipe's
    own ``pruned_steps`` and window first; then each schedule [s, stop] for each start s listed, each with every window
    listed), keeping the candidate whose plan removes the most FLOPs per trajectory: the FLOPs one forward saves
    at the recipe's shape x the share of the trajectory's steps it runs (ties: the earlier). Every candidate's
    search is recorded in ``plan.search``."""
    first = RatioSearch(adapter, bundle, shape, scores, pruning, validation)
    if not (pruning.search_steps or pruning.search_windows):
        return first.run()
    timesteps = first.references[0].timesteps[-validation.steps:]
    train = int(adapter.scheduler(bundle).config["num_train_timesteps"])
    inputs = adapter.export_spec(bundle.model, shape, batch=1, dynamic=[], seed=0).inputs
    full_flops, _ = count_flops(bundle.model, inputs, [])
    schedules = [list(pruning.pruned_steps),
                 *([start, pruning.pruned_steps[1]] for start in pruning.search_steps)]
    windows = list(dict.fromkeys([pruning.window, *pruning.search_windows]))
    candidates = []
    for steps in schedules:
        for window in windows:
            chosen = dataclasses.replace(pruning, pruned_steps=steps, window=window)
            console.print(f"auto ratio: step schedule [{steps[0]:g}, {steps[1]:g})"
                          + (f", window {window}" if pruning.search_windows else ""), highlight=False)
            search = first if chosen == pruning else RatioSearch(adapter, bundle, shape, scores, chosen, validation,
                                                                 first.references)
            plan = search.run()
            share = StepSchedule(steps[0], steps[1], train).share(timesteps)
            saved = full_flops - count_flops(pruned_copy(adapter, bundle.model, plan), inputs, [])[0]
            candidates.append((plan, {"steps": steps, "window": plan.window, "pruned_steps_share": share,
                                      "removed_heads": plan.removed_heads, "flops_saved_per_forward": saved,
                                      "flops_saved_x_share": saved * share, "search": plan.search}))
    best = max(range(len(candidates)), key=lambda i: (candidates[i][1]["flops_saved_x_share"], -i))
    plan = candidates[best][0]
    plan.search = {**plan.search, "candidates": [record for _, record in candidates], "chosen_candidate": best}
    return plan
