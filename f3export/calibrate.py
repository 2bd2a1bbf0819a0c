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
from safetensors.torch import save_file
from torch import nn
from torch.utils._pytree import tree_map_only

from .artifacts import atomic_path
from .criteria import CRITERIA, token_scorers
from .models.base import ModelAdapter, VideoShape
from .models.loading import ModelBundle
from .models.structure import TemporalSite
from .recipe import CalibrationSection
from .report import console, plural, progress

if TYPE_CHECKING:
    from .distributed import Team


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
    text: str | None = None  # what made the runs' text embeddings (a text encoder, or the seeded stand-in)
    random_weights: bool = False  # the model's weights were never trained: its scores rank noise

    def to_json(self) -> dict[str, Any]:
        return {
            "criteria": list(CRITERIA),
            "samples": self.samples,
            "timesteps": self.timesteps,
            **({"note": self.note} if self.note else {}),
            **({"text": self.text} if self.text else {}),
            "random_weights": self.random_weights,
            "modules": {name: vars(m) for name, m in self.modules.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Scores":
        return cls({n: ModuleScores(**m) for n, m in data["modules"].items()}, data["timesteps"], data["samples"],
                   data.get("note"), data.get("text"), data.get("random_weights", False))


@dataclass
class RunStatistics:
    """The statistics of one run: per module and criterion, sums per step and head, and the tokens summed.

    Runs are summed in run order however they were computed (here, on another rank, or read back from an
    earlier, interrupted calibration), so ``scores.json`` is the same bytes either way.
    """

    sums: dict[str, dict[str, torch.Tensor]]  # module -> criterion -> [steps, heads], float64
    tokens: dict[str, torch.Tensor]  # module -> [steps], float64
    timesteps: list[int]

    @classmethod
    def zeros(cls, sizes: dict[str, int], criteria: list[str], steps: int) -> "RunStatistics":
        """Empty statistics for modules of ``sizes`` (name -> heads)."""
        return cls({name: {c: torch.zeros(steps, heads, dtype=torch.float64) for c in criteria}
                    for name, heads in sizes.items()},
                   {name: torch.zeros(steps, dtype=torch.float64) for name in sizes}, [])

    def add(self, other: "RunStatistics") -> None:
        for name, sums in self.sums.items():
            for criterion, total in sums.items():
                total += other.sums[name][criterion]
            self.tokens[name] += other.tokens[name]
        self.timesteps = other.timesteps

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat, for a safetensors file (``RunStore``)."""
        return {**{f"{name}/{c}": t for name, sums in self.sums.items() for c, t in sums.items()},
                **{f"{name}/tokens": t for name, t in self.tokens.items()}}


class TemporalStatsRecorder:
    """Forward hooks on every temporal attention that accumulate one run's per-step, per-head statistics."""

    def __init__(self, model: nn.Module, sites: list[TemporalSite], steps: int):
        self.model = model
        self.sites = sites
        self.step = 0
        self.steps = steps
        self._residual_norm: dict[str, torch.Tensor] = {}
        self.criteria = list(token_scorers())
        self.sizes = {s.attention: s.heads_of(model).heads for s in sites}
        self.run = RunStatistics.zeros(self.sizes, self.criteria, steps)

    @property
    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.run.sums

    def take(self, timesteps: list[int]) -> RunStatistics:
        """The run recorded so far (with its ``timesteps``); the next starts from zero."""
        run, self.run = self.run, RunStatistics.zeros(self.sizes, self.criteria, self.steps)
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
            sums = self.run.sums[site.attention]
            for criterion in self.criteria:
                sums[criterion][self.step] += per_criterion[criterion].cpu()
            self.run.tokens[site.attention][self.step] += tokens
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
        with atomic_path(self.path(index)) as tmp:
            save_file(run.tensors(), str(tmp), metadata={"key": self.key, "run": str(index),
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
        return RunStatistics({name: {c: tensors[f"{name}/{c}"] for c in sums} for name, sums in like.sums.items()},
                             {name: tensors[f"{name}/tokens"] for name in like.tokens}, timesteps)

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
    """Every criterion per module: token criteria from the summed runs, weight criteria from the model."""
    modules = {}
    for site in sites:
        heads = site.heads_of(model)
        sums = total.sums[site.attention]
        tokens = total.tokens[site.attention]
        per_step = {c: (t / tokens.clamp_min(1.0)[:, None]).tolist() for c, t in sums.items()}
        overall = {c: (sums[c].sum(0) / tokens.sum().clamp_min(1.0)).tolist() if c in sums
                   else scorer.score(heads.projections()).tolist() for c, scorer in CRITERIA.items()}
        modules[site.attention] = ModuleScores(heads.heads, heads.head_dim, overall, per_step)
    return Scores(modules, total.timesteps, samples, note, text, random_weights)


def calibrate(adapter: ModelAdapter, bundle: ModelBundle, shape: VideoShape, section: CalibrationSection,
              store: RunStore | None = None, team: Team | None = None) -> Scores | None:
    """Run the model over the section's inputs (prompts x seeds, or token sequences) and score every temporal head.

    With ``store``, each finished run is saved there and a run found there is not run again (an interrupted
    calibration resumes); with ``team`` (torchrun), the runs left are shared among its processes and only its
    leader, which holds the store, returns the scores (the others None). Either way the runs are summed in
    run order, so the scores are the same bytes.
    """
    model = bundle.model
    sites = adapter.structure.temporal_sites(model)
    steps = adapter.protocol.calls(section)
    recorder = TemporalStatsRecorder(model, sites, steps)
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
        if team is None:
            with RunProgress(len(runs), steps, len(done), 1) as bar:
                for index in todo:
                    finished(index, run_one(index, bar.step))
                    bar.runs_done()
        else:
            team.share(todo, lambda: RunProgress(len(runs), steps, len(done), team.size), run_one, finished)
    if team is not None and not team.leader:
        return None
    total = RunStatistics.zeros(recorder.sizes, recorder.criteria, steps)
    for index in range(len(runs)):
        total.add(done[index])
    return scores_of(model, sites, total, len(runs), adapter.calibration_note, adapter.text_source(bundle),
                     bundle.random_weights)
