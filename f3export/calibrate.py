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
``sensitivity`` (an output criterion) is measured only when the recipe ranks by it (``sensitivity.py``),
for the recipe's action: the mean per call of the model's relative change with the head alone changed.

Beside the scores, what a plan's choices read: every head's mean attention mass by frame distance
(``distance_mass``: which window it needs) and, in ``compensation.safetensors``, the mean of what it writes
and of what its write loses to each window (what ``[pruning] compensate`` folds into the output bias).

Each run's sums are kept apart (``RunStatistics``), saved as the run finishes (``RunStore``) and summed in
run order at the end, so a calibration resumed after a crash, or shared among torchrun's processes
(``distributed.Team``), writes the same bytes as one uninterrupted process.

Statistics are gathered by hooks that recompute the attention explicitly; the
model's own forward pass is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils._pytree import tree_map_only

from .artifacts import write_json
from .criteria import CRITERIA, OutputScorer, WeightScorer, token_scorers
from .models.base import ModelAdapter, VideoShape
from .models.loading import ModelBundle
from .models.structure import TemporalSite
from .recipe import CalibrationSection
from .report import console, plural, progress
from .sensitivity import OutputMeasure, SensitivityProbe
from .weights import save_tensors

if TYPE_CHECKING:
    from .distributed import Team


COMPENSATION = "compensation.safetensors"  # beside scores.json: module/written [H, C], module/window_loss [H, F, C]


@dataclass
class ModuleScores:
    heads: int
    head_dim: int
    scores: dict[str, list[float]]  # criterion -> per head
    per_step: dict[str, list[list[float]]] = field(default_factory=dict)  # criterion -> step -> per head
    # per head, the mean attention mass of a query on keys 0, 1, 2, .. frames away (of the video keys)
    distance_mass: list[list[float]] | None = None


@dataclass
class Scores:
    modules: dict[str, ModuleScores]
    timesteps: list[int]
    samples: int
    note: str | None = None  # the family's ``calibration_note``
    text: str | None = None  # what made the runs' text embeddings (a text encoder, or the seeded stand-in)
    random_weights: bool = False  # the model's weights were never trained: its scores rank noise
    sensitivity_of: dict[str, Any] | None = None  # the action (and window) ``sensitivity`` was measured for
    # module -> {"written": [H, C], "window_loss": [H, F, C]}: means per query (COMPENSATION); not in the JSON
    compensation: dict[str, dict[str, torch.Tensor]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "criteria": [c for c in CRITERIA if self.sensitivity_of or not isinstance(CRITERIA[c], OutputScorer)],
            "samples": self.samples,
            "timesteps": self.timesteps,
            **({"note": self.note} if self.note else {}),
            **({"text": self.text} if self.text else {}),
            "random_weights": self.random_weights,
            **({"sensitivity_of": self.sensitivity_of} if self.sensitivity_of else {}),
            "modules": {name: vars(m) for name, m in self.modules.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Scores":
        return cls({n: ModuleScores(**m) for n, m in data["modules"].items()}, data["timesteps"], data["samples"],
                   data.get("note"), data.get("text"), data.get("random_weights", False), data.get("sensitivity_of"))

    def save(self, folder: Path) -> list[Path]:
        """scores.json and, where measured, the compensation means beside it."""
        paths = [folder / "scores.json"]
        write_json(paths[0], self.to_json())
        if self.compensation:
            paths.append(folder / COMPENSATION)
            save_tensors({f"{m}/{name}": t.contiguous() for m, parts in self.compensation.items()
                          for name, t in parts.items()}, paths[1])
        else:  # not an earlier calibration's means, read as this one's
            (folder / COMPENSATION).unlink(missing_ok=True)
        return paths

    @classmethod
    def load(cls, folder: Path) -> "Scores":
        """What ``save`` wrote (the build's stage records vouch for the files' hashes)."""
        scores = cls.from_json(json.loads((folder / "scores.json").read_text()))
        path = folder / COMPENSATION
        if path.is_file():
            scores.compensation = {}
            with safe_open(str(path), "pt") as file:
                for key in file.keys():
                    module, _, name = key.rpartition("/")
                    scores.compensation.setdefault(module, {})[name] = file.get_tensor(key)
        return scores


@dataclass
class RunStatistics:
    """The statistics of one run: per module and criterion, sums per step and head, and the tokens summed.

    Runs are summed in run order however they were computed (here, on another rank, or read back from an
    earlier, interrupted calibration), so ``scores.json`` is the same bytes either way.
    """

    sums: dict[str, dict[str, torch.Tensor]]  # module -> criterion -> [steps, heads], float64
    tokens: dict[str, torch.Tensor]  # module -> [steps], float64
    timesteps: list[int]
    # module -> distance_mass [heads, frames], written [heads, C], window_loss [heads, frames, C] and
    # write_queries [1] (``WriteSums``), float64
    writes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    calls: torch.Tensor | None = None  # [steps]: the model calls an output criterion was measured on

    @classmethod
    def zeros(cls, sizes: dict[str, tuple[int, int]], criteria: list[str], steps: int, frames: int,
              measured: bool = False) -> "RunStatistics":
        """Empty statistics for modules of ``sizes`` (name -> heads, output channels); ``measured``: with an
        output criterion (among ``criteria``) and its call counts."""
        return cls({name: {c: torch.zeros(steps, heads, dtype=torch.float64) for c in criteria}
                    for name, (heads, _) in sizes.items()},
                   {name: torch.zeros(steps, dtype=torch.float64) for name in sizes}, [],
                   {name: {"distance_mass": torch.zeros(heads, frames, dtype=torch.float64),
                           "written": torch.zeros(heads, channels, dtype=torch.float64),
                           "window_loss": torch.zeros(heads, frames, channels, dtype=torch.float64),
                           "write_queries": torch.zeros(1, dtype=torch.float64)}
                    for name, (heads, channels) in sizes.items()},
                   torch.zeros(steps, dtype=torch.float64) if measured else None)

    def add(self, other: "RunStatistics") -> None:
        for name, sums in self.sums.items():
            for criterion, total in sums.items():
                total += other.sums[name][criterion]
            self.tokens[name] += other.tokens[name]
            for part, total in self.writes[name].items():
                total += other.writes[name][part]
        if self.calls is not None:
            self.calls += other.calls
        self.timesteps = other.timesteps

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat, for a safetensors file (``RunStore``)."""
        return {**{f"{name}/{c}": t for name, sums in self.sums.items() for c, t in sums.items()},
                **{f"{name}/tokens": t for name, t in self.tokens.items()},
                **{f"{name}/{part}": t for name, parts in self.writes.items() for part, t in parts.items()},
                **({"calls": self.calls} if self.calls is not None else {})}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], like: "RunStatistics", timesteps: list[int]
                     ) -> "RunStatistics":
        """The inverse of ``tensors``, laid out as ``like``."""
        return cls({name: {c: tensors[f"{name}/{c}"] for c in sums} for name, sums in like.sums.items()},
                   {name: tensors[f"{name}/tokens"] for name in like.tokens}, timesteps,
                   {name: {part: tensors[f"{name}/{part}"] for part in parts} for name, parts in like.writes.items()},
                   tensors.get("calls"))


class TemporalStatsRecorder:
    """Forward hooks on every temporal attention that accumulate one run's per-step, per-head statistics."""

    def __init__(self, model: nn.Module, sites: list[TemporalSite], steps: int, frames: int,
                 measured: list[str] = ()):
        """``frames``: the most frames a head can see; ``measured``: output criteria measured beside."""
        self.model = model
        self.sites = sites
        self.step = 0
        self.steps, self.frames, self.measured = steps, frames, bool(measured)
        self.recording = True  # off while an output criterion's extra passes run
        self._residual_norm: dict[str, torch.Tensor] = {}
        self.criteria = [*token_scorers(), *measured]
        self.sizes = {s.attention: (s.heads_of(model).heads, s.heads_of(model).projections().output.out_features)
                      for s in sites}
        self.run = self.empty()

    def empty(self) -> RunStatistics:
        return RunStatistics.zeros(self.sizes, self.criteria, self.steps, self.frames, self.measured)

    @property
    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.run.sums

    def take(self, timesteps: list[int]) -> RunStatistics:
        """The run recorded so far (with its ``timesteps``); the next starts from zero."""
        run, self.run = self.run, self.empty()
        run.timesteps = timesteps
        self.step = 0
        return run

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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def _residual_hook(self, name: str):
        def hook(module, args):
            if self.recording:
                self._residual_norm[name] = args[0].detach().norm(dim=-1)
        return hook

    def _attention_hook(self, site: TemporalSite):
        def hook(attn, args, kwargs):
            if not self.recording:
                return
            hidden_states = args[0] if args else kwargs["hidden_states"]
            residual_norm = self._residual_norm.pop(site.attention, None)
            if residual_norm is None:
                residual_norm = hidden_states.detach().norm(dim=-1)
            named = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            per_criterion, tokens, writes = site.access(attn).statistics(hidden_states.detach(), residual_norm,
                                                                         *args[1:], **named)
            sums = self.run.sums[site.attention]
            for criterion in per_criterion:
                sums[criterion][self.step] += per_criterion[criterion].cpu()
            self.run.tokens[site.attention][self.step] += tokens
            totals = self.run.writes[site.attention]
            for part in ("distance_mass", "written", "window_loss"):
                value = getattr(writes, part)
                if value is not None:
                    totals[part][:, :value.shape[1]] += value
            totals["write_queries"] += writes.write_queries
        return hook


class RunStore:
    """The finished runs of one calibration, a safetensors file each, in a folder named by the calibration's
    stage key: a calibration killed after k runs resumes at run k + 1. Files are written atomically and read
    as untrusted input: one that is not exactly the run it claims to be (key, index, tensor names, shapes,
    dtypes) is run again."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key

    def path(self, index: int) -> Path:
        return self.folder / f"run-{index:05d}.safetensors"

    def save(self, index: int, run: RunStatistics) -> None:
        save_tensors(run.tensors(), self.path(index), {"key": self.key, "run": str(index),
                                                       "timesteps": json.dumps(run.timesteps)})

    def finished(self, runs: int, like: RunStatistics) -> dict[int, RunStatistics]:
        """The saved runs among ``runs``, each checked against ``like`` (an empty run of this calibration)."""
        found = {}
        for index in range(runs):
            if self.path(index).is_file():
                run = self._read(index, like)
                if run is None:
                    console.print(f"[bold yellow]note:[/] {self.path(index)}: not a finished run of this "
                                  "calibration; running it again", highlight=False)
                else:
                    found[index] = run
        return found

    def _read(self, index: int, like: RunStatistics) -> RunStatistics | None:
        expected = like.tensors()
        limit = sum(t.numel() * t.element_size() for t in expected.values()) + (1 << 20)  # + the header
        path = self.path(index)
        try:
            if path.stat().st_size > limit:
                return None
            with safe_open(str(path), "pt") as file:
                meta = file.metadata() or {}
                if meta.get("key") != self.key or meta.get("run") != str(index) or set(file.keys()) != set(expected):
                    return None
                tensors = {name: file.get_tensor(name) for name in expected}
            timesteps = json.loads(meta["timesteps"])
        except (OSError, SafetensorError, ValueError, KeyError):
            return None
        if not (isinstance(timesteps, list) and all(type(t) is int for t in timesteps)) or any(
                t.dtype != expected[n].dtype or t.shape != expected[n].shape or not t.isfinite().all()
                for n, t in tensors.items()):
            return None
        return RunStatistics.from_tensors(tensors, like, timesteps)

    def clear(self) -> None:
        """Once the scores are written, the runs are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


class RunProgress:
    """A bar counting runs done of all (those reused included), moving with this process's steps."""

    def __init__(self, runs: int, steps: int, done: int, processes: int):
        self.runs, self.steps, self.done = runs, steps, done
        self.label = "calibrate" if processes == 1 else f"calibrate ({processes} processes)"

    def __enter__(self) -> "RunProgress":
        self.bar = progress().__enter__()
        self.task = self.bar.add_task(self.label, total=self.runs, completed=self.done)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def step(self, i: int) -> None:
        self.bar.update(self.task, completed=self.done + (i + 1) / (self.steps + 1))

    def runs_done(self, count: int = 1) -> None:
        self.done += count
        self.bar.update(self.task, completed=self.done)


class OnDevice(nn.Module):
    """``model`` on another device, called as the CPU trajectories call it: tensors going in are moved there and
    tensors coming out come back, so a run draws its noise on the CPU and is the same run on every device."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.inner, self.device = model, device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(self.device), (args, kwargs))
        return tree_map_only(torch.Tensor, lambda t: t.cpu(), self.inner(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)  # the network's config and the like


def calibration_device(section: CalibrationSection, team: Team | None) -> torch.device:
    """This process's device: the CPU, or its own GPU (torchrun's LOCAL_RANK) for ``device = "cuda"``."""
    if section.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", team.local_rank if team is not None else 0)


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model as trajectories call it on ``device``; back on the CPU afterwards (the later stages' device)."""
    if device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield OnDevice(model, device)
    finally:
        model.to("cpu")


def scores_of(model: nn.Module, sites: list[TemporalSite], total: RunStatistics, samples: int,
              note: str | None = None, text: str | None = None, random_weights: bool = False) -> Scores:
    """Every criterion per module: token criteria from the summed runs, weight criteria from the model, output
    criteria per model call; with the distance profile and the compensation means."""
    modules, compensation = {}, {}
    for site in sites:
        heads = site.heads_of(model)
        sums = total.sums[site.attention]
        counts = {c: total.calls if isinstance(CRITERIA[c], OutputScorer) else total.tokens[site.attention]
                  for c in sums}
        per_step = {c: (t / counts[c].clamp_min(1.0)[:, None]).tolist() for c, t in sums.items()}
        overall = {c: (sums[c].sum(0) / counts[c].sum().clamp_min(1.0)).tolist() if c in sums
                   else scorer.score(heads.projections()).tolist() for c, scorer in CRITERIA.items()
                   if c in sums or isinstance(scorer, WeightScorer)}
        writes = total.writes[site.attention]
        mass = writes["distance_mass"] / total.tokens[site.attention].sum().clamp_min(1.0)
        modules[site.attention] = ModuleScores(heads.heads, heads.head_dim, overall, per_step, mass.tolist())
        if writes["write_queries"].item():
            compensation[site.attention] = {part: (writes[part] / writes["write_queries"]).float()
                                            for part in ("written", "window_loss")}
    return Scores(modules, total.timesteps, samples, note, text, random_weights, compensation=compensation or None)


def calibrate(adapter: ModelAdapter, bundle: ModelBundle, shape: VideoShape, section: CalibrationSection,
              store: RunStore | None = None, team: Team | None = None, measure: OutputMeasure | None = None
              ) -> Scores | None:
    """Run the model over the section's inputs (prompts x seeds, or token sequences) and score every temporal head.

    With ``store``, each finished run is saved there and a run found there is not run again (an interrupted
    calibration resumes); with ``team`` (torchrun), the runs left are shared among its processes and only its
    leader, which holds the store, returns the scores (the others None). Either way the runs are summed in
    run order, so the scores are the same bytes. With ``measure``, ``sensitivity`` is measured too, for its
    action.
    """
    model = bundle.model
    sites = adapter.structure.temporal_sites(model)
    steps = adapter.protocol.calls(section)
    recorder = TemporalStatsRecorder(model, sites, steps, shape.frames, ["sensitivity"] if measure else [])

    def record_sensitivity(changes: dict[str, torch.Tensor]) -> None:
        for name, per_head in changes.items():
            recorder.run.sums[name]["sensitivity"][recorder.step] += per_head
        recorder.run.calls[recorder.step] += 1
    runs = adapter.protocol.runs(section)
    adapter.prepare_runs(bundle, runs)
    done = store.finished(len(runs), recorder.run) if store is not None else {}
    todo = [i for i in range(len(runs)) if i not in done]
    if team is not None:
        todo = team.agree(todo)  # the leader's list: it alone holds the store
    if done:
        console.print(f"calibrate: resuming; {len(done)} of {plural(len(runs), 'run')} were saved by an interrupted "
                      f"calibration, {len(todo)} to run", highlight=False)

    def run_one(index: int, on_step: Callable[[int], None]) -> RunStatistics:
        def step(i: int) -> None:
            recorder.step = i
            on_step(i)

        timesteps = adapter.trajectory(bundle, runner, runs[index], shape, step).timesteps
        return recorder.take(timesteps)

    def finished(index: int, run: RunStatistics) -> None:
        done[index] = run
        if store is not None:
            store.save(index, run)

    with recorder.attached(), placed(model, calibration_device(section, team)) as runner:
        if measure is not None:
            runner = SensitivityProbe(runner, model, sites, measure, record_sensitivity, recorder.paused)
        if team is None:
            with RunProgress(len(runs), steps, len(done), 1) as bar:
                for index in todo:
                    finished(index, run_one(index, bar.step))
                    bar.runs_done()
        else:
            team.share(todo, lambda: RunProgress(len(runs), steps, len(done), team.size), run_one, finished)
    if team is not None and not team.leader:
        return None
    total = recorder.empty()
    for index in range(len(runs)):
        total.add(done[index])
    scores = scores_of(model, sites, total, len(runs), adapter.calibration_note, adapter.text_source(bundle),
                       bundle.random_weights)
    scores.sensitivity_of = measure.to_json() if measure else None
    return scores
