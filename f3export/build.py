"""The build: recipe -> calibrate -> plan -> prune -> export -> engine -> validate, cached per stage.

The stages are declared in ``stages.py`` with what each reads, so a stage's key hashes everything it
depends on and a rebuild redoes exactly the stages downstream of a change. This module checks the recipe
can run, holds the folder's lock, runs the stages in order and writes the manifest's summary. The model is
loaded only if a stage must run.
"""

from __future__ import annotations

import math
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import onnx
import onnx_graphsurgeon
import torch
import transformers
from filelock import FileLock, Timeout

from . import __version__
from .artifacts import Manifest, StageRecord, contract_mismatch
from .cache import CACHE_FOLDER, LOCKS, TEXT_EMBEDDINGS, StageCache, plain_folder
from .engines import make_backend
from .distributed import Team
from .errors import CheckError, F3ExportError, RecipeError, activity
from .models import get_adapter
from .models.base import ModelAdapter, VideoShape
from .models.memory import peak_rss_mib, reset_peak_rss, return_free_memory, weight_bytes
from .models.structure import unmatched_pattern
from .pictures import write_report
from .recipe import AUTO_RATIO, Recipe
from .roots import confine
from .report import console, detail, gates_table, plural, results, table
from .stages import STAGES, SourceModel, Stage, StageContext, stage_key
from .validate import Gate


def library_versions() -> dict[str, str]:
    import onnxruntime

    return {"f3export": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnx_graphsurgeon": onnx_graphsurgeon.__version__, "onnxruntime": onnxruntime.__version__}


@dataclass
class StageOutcome:
    name: str
    cached: bool
    seconds: float
    record: StageRecord
    shared: bool = False  # reused from another build's output in the shared cache


@dataclass
class BuildResult:
    root: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    stopped_after: str | None = None  # the last stage run, when asked to stop before the end (``until``)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def confine_model_files(recipe: Recipe, adapter: ModelAdapter) -> None:
    """Refuse a model file outside the allowed roots, before any file of the folder is read, hashed or loaded."""
    if recipe.model.path is not None:
        folder = Path(recipe.model.path)
        for file in adapter.checkpoint.weights_files(folder) + adapter.checkpoint.sampling_files(folder):
            confine(file, f"{recipe.source.name}: [model].path's {file.relative_to(folder)}")


def check_runnable(recipe: Recipe, adapter: ModelAdapter, skeleton: torch.nn.Module,
                   shapes: list[dict[str, int]]) -> None:
    """Refuse, before any stage, what the model cannot run: an axis it cannot export as dynamic, a shape it
    cannot take (the export shape or either end of a validated range), a pattern key that matches no module,
    a forward that cannot fit in memory (all checked on the network's skeleton: its config, no weights)."""
    name = recipe.source.name
    if recipe.calibration.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{name}: [calibration].device = 'cuda', but this PyTorch ({torch.__version__}) sees no "
                          "CUDA device")
    fixed = sorted(set(recipe.export.dynamic_axes) & set(adapter.fixed_axes_of(skeleton)))
    if fixed:
        raise RecipeError(f"{name}: [export].dynamic_axes: {recipe.model.family} models cannot "
                          f"export {', '.join(map(repr, fixed))} as dynamic")
    export = recipe.export_shape
    for shape in shapes:
        problem = adapter.shape_error(skeleton, VideoShape.of_axes(shape))
        if problem:
            keys = [f"profile_{axis} = {getattr(recipe.engine, f'profile_{axis}')}"
                    for axis in shape if shape[axis] != export[axis]]
            where = f"[engine].{', '.join(keys)}: at the range's end, " if keys else "[model]."
            raise RecipeError(f"{name}: {where}{problem}")
    modules = [site.attention for site in adapter.structure.temporal_sites(skeleton)]
    problem = adapter.options_error(skeleton) or unmatched_pattern(
        "[pruning].keep", recipe.pruning.keep, modules, "temporal module")
    if problem:
        raise RecipeError(f"{name}: {problem}")
    runs = {**export, "batch": adapter.protocol.batch}  # how calibration and validation call it
    shape = max([*shapes, runs], key=lambda s: math.prod(s.values()))
    problem = adapter.memory_error(skeleton, VideoShape.of_axes(shape), shape["batch"])
    if problem:
        size = f"{shape['frames']}x{shape['height']}x{shape['width']}"
        if shape == export:
            where = f"[model].frames x latent_height x latent_width = {size} at [export].batch = {shape['batch']}"
        elif shape == runs:
            where = f"[model].frames x latent_height x latent_width = {size} at batch {shape['batch']} " \
                    "(calibration and validation runs)"
        else:
            where = f"[engine].profile_* maximum frames x height x width = {size} at batch {shape['batch']}"
        raise RecipeError(f"{name}: {where} {problem}")


# Weights from which a build frees a model between the steps that need it (StageContext.frugal); below, it is
# held throughout: loading it again would cost more time than its memory is worth.
FRUGAL_ABOVE = 1 << 30


def lock_file(recipe: Recipe) -> Path:
    """The lock a build of ``recipe``'s folder holds: one per folder, in the output dir's shared cache folder."""
    return Path(recipe.output.dir) / CACHE_FOLDER / LOCKS / f"{recipe.name}.lock"


class Build:
    """One build of a recipe: checked before any stage, then STAGES run in order under the folder's lock."""

    def __init__(self, recipe: Recipe, force: bool = False, team: Team | None = None, until: str | None = None):
        self.recipe = recipe
        self.force = force
        self.team = team
        self.until = until  # the last stage to run (e.g. calibrate on a cluster, the rest elsewhere)
        self.peak_rss = 0  # MiB
        self.adapter = get_adapter(recipe.model.family, recipe.model.adapter_options)
        self.root = recipe.artifact_dir
        self.versions = library_versions()
        # Every backend asked for is set up now, so one that cannot run here fails before any work.
        backends = [make_backend(name, recipe, self.root) for name in recipe.engine.selected]
        # The shared cache, its locks and text embeddings: plain folders inside the allowed roots, checked
        # before anything is read or written there
        self.cache = StageCache(Path(recipe.output.dir) / CACHE_FOLDER)
        plain_folder(self.cache.folder / LOCKS, "build lock folder")
        # Under torchrun only rank 0 writes, here as in the artifact folder
        embeddings = plain_folder(self.cache.folder / TEXT_EMBEDDINGS, "text embedding cache") \
            if team is None or team.leader else None
        self.model = SourceModel(recipe, self.adapter, embeddings)
        frugal = weight_bytes(self.model.skeleton) >= FRUGAL_ABOVE
        self.context = StageContext(recipe, self.adapter, self.root, self.model, backends, team=team, frugal=frugal,
                                    cache=None if force else self.cache, versions=self.versions)
        self.result = BuildResult(self.root)
        confine_model_files(recipe, self.adapter)
        check_runnable(recipe, self.adapter, self.model.skeleton, self.context.validated_shapes)

    def run(self) -> BuildResult:
        try:
            return self._run()
        finally:
            if self.team is not None:
                self.team.announce(None)  # the build stopped before calibrating, or reused it: nothing to share

    def follow(self) -> bool:
        """Under torchrun, on every rank but 0: lend this process to rank 0's calibration, if it runs one
        (writing nothing: rank 0 holds the artifact folder and runs every other stage). Whether it did."""
        shared = [stage for stage in STAGES if stage.shared]
        for stage in shared:
            key = stage_key(stage, self.context, self.versions)
            if self.team.await_calibration(key):
                self.context.keys[stage.name] = key
                stage.run(self.context)
                return True
        return False

    def _run(self) -> BuildResult:
        with activity(f"preparing the artifact folder {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)
            # beside the folder, not in it: the folder is what gets deployed, with nothing of the build's own
            lock_path = lock_file(self.recipe)
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            if lock_path.is_symlink() or lock_path.exists() and not lock_path.is_file():
                raise F3ExportError(f"{lock_path}: not a plain file (a symlink or folder); refusing to lock "
                                    "through it. Remove it and build again")
            lock = FileLock(str(lock_path))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise F3ExportError(f"{self.root}: another f3export build holds {lock_path}; "
                                    "wait for it to finish") from None
        try:
            with activity(f"building {self.root}"):
                legacy = self.root / ".lock"  # where f3export before 0.2 kept the lock
                if legacy.is_file() and not legacy.is_symlink():
                    legacy.unlink()
                self._remove_partial_files()
                self.manifest = Manifest(self.root)
                return self._run_locked()
        finally:
            lock.release()

    def _remove_partial_files(self) -> None:
        """Temp files of a build that was killed (never renamed into place); safe under the lock."""
        for partial in sorted(self.root.rglob(".*.tmp-*"), reverse=True):
            if partial.is_dir():
                shutil.rmtree(partial)
            elif partial.exists():
                partial.unlink()

    def _run_stage(self, stage: Stage) -> StageRecord:
        """The stage's record: reused when its key and files are unchanged, else run and recorded."""
        key = stage_key(stage, self.context, self.versions)
        self.context.keys[stage.name] = key
        record = None if self.force else self.manifest.reusable(stage.name, key)
        announce = self.team.announce if stage.shared and self.team is not None else lambda key: None
        if record is not None:
            detail(f"{stage.name}: reused (key {key[:12]})")
            announce(None)
            self.result.outcomes.append(StageOutcome(stage.name, True, 0.0, record))
            return record
        shared = None if self.force or stage.verdict else self.cache.fetch(stage.name, key, self.root)
        problem = shared and stage.reuse_problem and stage.reuse_problem(self.context, (shared.files, shared.data))
        if problem:
            console.print(f"[bold yellow]note:[/] {stage.name}: the shared cache's entry (key {key[:12]}) is not used: "
                          f"{problem}; running the stage", highlight=False, soft_wrap=True)
            shared = None
        if shared is not None:  # another build of the folder's output dir made it from the same inputs
            detail(f"{stage.name}: reused from {self.cache.folder} (key {key[:12]})")
            announce(None)
            record = self.manifest.complete(stage.name, key, shared.files, shared.data, 0.0, shared.hashes)
            self.result.outcomes.append(StageOutcome(stage.name, True, 0.0, record, shared=True))
            return record
        if stage.needs_model:
            self.model.bundle  # load (and check) the model before the stage announces itself
        announce(key)  # the other processes join it
        start = time.perf_counter()
        console.print(f"[bold]{stage.name}[/] ...", highlight=False)
        detail(f"{stage.name}: key {key[:12]}" + (" (--force)" if self.force else ""))
        self._note_peak()
        if self.context.frugal:  # (trimming costs a small model's build more page faults than it saves)
            return_free_memory()  # what earlier stages freed, so this stage's peak is its own
        reset_peak_rss()
        with activity(f"stage {stage.name}", self.root):
            files, data = stage.run(self.context)
        seconds = time.perf_counter() - start
        self.manifest.doc.setdefault("stage_peak_rss_mb", {})[stage.name] = self._note_peak()
        record = self.manifest.complete(stage.name, key, files, data, seconds)
        if files and not stage.verdict:  # (a torchrun follower's calibration writes nothing)
            self.cache.store(stage.name, key, self.root, files, data, record.files)
        self.result.outcomes.append(StageOutcome(stage.name, False, seconds, record))
        return record

    def _check_engine_contracts(self, exported: dict, engines: dict) -> None:
        """Every engine carries the contract the manifest is about to record (an ONNX Runtime engine in its
        metadata, a TensorRT plan in its ONNX file's), before the build may say it passed: parts reused from
        the shared cache were made by other builds, and a runtime drives an engine by this contract."""
        for name, entry in engines.items():
            if name == "components":
                continue
            source = self.root / (entry["path"] if entry["backend"] == "onnxruntime"
                                  else exported[entry["variant"]]["path"])
            problem = contract_mismatch(exported["contract"], source)
            if problem:
                raise CheckError(f"{self.root}: engine {name}: {problem}; it came from the shared cache "
                                 f"{self.cache.folder}, edited since: delete that folder and build again")

    def _note_peak(self) -> int | None:
        """The resident high-water mark since the last reset, folded into the build's own (``peak_rss``)."""
        peak = peak_rss_mib()
        if peak is not None:
            self.peak_rss = max(self.peak_rss, peak)
        return peak

    def build_peak_rss(self) -> int:
        """MiB: the highest of the stages' peaks and of what ran between them (loading the model)."""
        self._note_peak()
        return self.peak_rss or round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # not Linux

    def _note_replaced_build(self) -> None:
        """Say so when the folder held a build of another recipe (a --set, an edited recipe): it is about to be
        replaced, and a user who wanted both needs another output name."""
        previous, current = self.manifest.doc.get("recipe"), self.recipe.as_dict()
        if not isinstance(previous, dict) or previous == current:
            return
        changed = [f"{section}.{key}" for section in current if section != "output"  # where, not what
                   for key in sorted(set(current[section]) | set(previous.get(section) or {}))
                   if (previous.get(section) or {}).get(key) != current[section].get(key)]
        if not changed:
            return
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        console.print(f"[bold yellow]note:[/] {self.root} held a build of another recipe ({shown} changed); it is "
                      "replaced in place, reusing the stages those keys do not reach (--set output.name=NAME "
                      "keeps both)", highlight=False)

    def _run_locked(self) -> BuildResult:
        r = self.recipe
        self._note_replaced_build()
        self.manifest.doc.update({"name": r.name, "recipe_file": str(r.source), "recipe": r.as_dict(),
                                  "versions": self.versions, "status": "building"})
        records = self.context.records
        for stage in STAGES:
            records[stage.name] = self._run_stage(stage)
            if stage.name == self.until and stage is not STAGES[-1]:
                self.result.stopped_after = stage.name
                self.manifest.doc["status"] = f"stopped after {stage.name}"
                self.manifest.save()
                return self.result
        prune, export, engine = records["prune"], records["export"], records["engine"]
        self._check_engine_contracts(export.data, engine.data)
        self.result.gates = [Gate(**{k: g[k] for k in ("metric", "value", "limit", "kind")})
                             for g in records["validate"].data["gates"]]
        self.manifest.doc.update({
            "status": "passed" if self.result.passed else "failed",
            # High-water mark of this build process (stages reused from the cache cost nothing here); not
            # getrusage's, which the per-stage resets of the kernel's mark (``reset_peak_rss``) lower
            "peak_rss_mb": self.build_peak_rss(),
            "parameters": {
                "torch": {k.removeprefix("parameters_"): n for k, n in prune.data.items()},
                "onnx": {"original": export.data["original"]["parameters"],
                         "pruned": export.data["pruned"]["parameters"],
                         "removed": export.data["parameters_removed"]},
                "onnx_removed_equals_torch_removed":
                    export.data["parameters_removed"] == prune.data["parameters_removed"],
            },
            "contract": export.data["contract"],
            "engines": {name: {"backend": entry["backend"], "path": entry["path"],
                               "goldens": f"goldens/{entry['variant']}.npz", "good": self.result.passed}
                        for name, entry in engine.data.items() if name != "components"},
        })
        engines = engine.data.get("components", {})
        components = {name: {**{k: v for k, v in entry.items() if k != "path"}, "onnx": entry["path"],
                             "engine": engines[name]["path"], "backend": engines[name]["backend"],
                             "goldens": f"goldens/{name}.npz"}
                      for name, entry in export.data.get("components", {}).items() if name in engines}
        if components:  # the rest of the pipeline, for a runtime without PyTorch (f3export generate)
            self.manifest.doc["components"] = components
        else:
            self.manifest.doc.pop("components", None)
        self.manifest.save()
        write_report(self.root, f"{r.name}: validation")
        return self.result


def stages_table(result: BuildResult, manifest: Manifest):
    """Each stage's time and its own peak resident memory (the process's, from the stage's start)."""
    peaks = manifest.doc.get("stage_peak_rss_mb", {})
    return table("stages", ["stage", "status", "seconds", "peak MiB"],
                 [[o.name, ("shared cache" if o.shared else "cached") if o.cached else "built", f"{o.seconds:.1f}",
                   "" if o.cached or peaks.get(o.name) is None else f"{peaks[o.name]:,}"] for o in result.outcomes])


def summary_tables(result: BuildResult, manifest: Manifest) -> list:
    stages = stages_table(result, manifest)
    params = manifest.doc["parameters"]
    sizes = manifest.doc["stages"]["export"]["data"]
    numbers = table("model", ["", "original", "pruned", "removed"], [
        ["parameters (torch)", f"{params['torch']['original']:,}", f"{params['torch']['pruned']:,}",
         f"{params['torch']['removed']:,}"],
        ["parameters (onnx)", f"{params['onnx']['original']:,}", f"{params['onnx']['pruned']:,}",
         f"{params['onnx']['removed']:,}"],
        ["onnx bytes", f"{sizes['original']['bytes']:,}", f"{sizes['pruned']['bytes']:,}",
         f"{sizes['original']['bytes'] - sizes['pruned']['bytes']:,}"],
    ])
    plan = manifest.doc["stages"]["plan"]["data"]
    chosen = f" (ratio {plan['ratio']:.4g}, chosen by the held-out fidelity budget)" \
        if manifest.doc["recipe"]["pruning"]["ratio"] == AUTO_RATIO else ""
    if plan.get("action") == "frame-local":
        numbers.caption = f"{plan['removed_heads']} of {plan['total_heads']} heads made frame-local{chosen}"
    elif plan.get("action") == "temporal-window":
        numbers.caption = (f"{plan['removed_heads']} of {plan['total_heads']} heads reading {plan['window']} "
                           f"frame(s) on each side{chosen}")
    else:
        numbers.caption = (f"{plan['removed_heads']} of {plan['total_heads']} temporal heads removed{chosen}, "
                           f"{plural(len(plan['modules_removed']), 'module')} removed entirely")
    return [stages, numbers, gates_table("validation gates", result.gates)]


def deploy_files(manifest: Manifest) -> list[str]:
    """What a runtime needs, relative to the build folder: the manifest (contract, hashes) and the engine stage's
    files (each engine with its external data)."""
    return ["manifest.json", *sorted(manifest.doc["stages"]["engine"]["files"])]


def summary_document(result: BuildResult) -> dict:
    """``build --json``: the verdict, each stage's outcome, parameters, gates and the files to deploy."""
    manifest = Manifest(result.root)
    peaks = manifest.doc.get("stage_peak_rss_mb", {})
    document = {
        "name": manifest.doc.get("name"), "artifacts": str(result.root), "status": manifest.doc.get("status"),
        "passed": result.passed if result.stopped_after is None else None, "stopped_after": result.stopped_after,
        "stages": [{"name": o.name, "cached": o.cached, "seconds": round(o.seconds, 3),
                    "peak_rss_mb": None if o.cached else peaks.get(o.name)} for o in result.outcomes],
    }
    if result.stopped_after is None:
        document.update({"parameters": manifest.doc["parameters"], "peak_rss_mb": manifest.doc["peak_rss_mb"],
                         "gates": [{"metric": g.metric, "value": g.value, "limit": g.limit, "kind": g.kind,
                                    "passed": g.passed} for g in result.gates],
                         "deploy": deploy_files(manifest)})
    return document


def print_summary(result: BuildResult) -> None:
    manifest = Manifest(result.root)
    if result.stopped_after is not None:
        results.print(stages_table(result, manifest))
        results.print(f"build stopped after {result.stopped_after}, as asked; artifacts so far in {result.root}; "
                      "the same command without --until finishes it from there", highlight=False)
        return
    for item in summary_tables(result, manifest):
        results.print(item)
    results.print(f"deploy: {', '.join(deploy_files(manifest))} (in {result.root})", highlight=False)
    verdict = "[green]passed[/]" if result.passed else "[bold red]FAILED: a validation gate did not pass[/]"
    results.print(f"build {verdict}; artifacts in {result.root}; peak memory {manifest.doc['peak_rss_mb']:,} MiB",
                  highlight=False)
