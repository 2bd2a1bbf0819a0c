"""The build: recipe -> calibrate -> plan -> prune -> export -> engine -> validate, cached per stage.

Each stage's key hashes everything it depends on (weights, its recipe
sections, upstream keys, library versions), so a rebuild redoes exactly the
stages downstream of a change. The model is loaded only if a stage must run.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import diffusers
import onnx
import onnx_graphsurgeon
import torch
import transformers
from filelock import FileLock, Timeout

from . import __version__
from .artifacts import MODEL_VARIANTS, Manifest, StageRecord, content_key, sha256_file, write_json
from .calibrate import Scores, calibrate
from .engines import make_backend, profile_ranges, validated_shapes
from .errors import F3ExportError, RecipeError, activity
from .export import ContractTerms, export_onnx
from .models import get_adapter
from .models.base import ModelBundle, VideoShape, unmatched_pattern
from .prune import PruningPlan, apply_plan, load_pruned, make_plan, parameter_count, save_pruned
from .recipe import Recipe
from .roots import confine
from .report import console, gates_table, table
from .validate import (Gate, compare_engine, export_gates, gates_json, golden_samples, pruning_fidelity,
                       pruning_gates, save_goldens)


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


@dataclass
class BuildResult:
    root: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


class Build:
    def __init__(self, recipe: Recipe, force: bool = False):
        self.recipe = recipe
        self.force = force
        self.adapter = get_adapter(recipe.model.family, recipe.model.adapter_options)
        self.root = recipe.artifact_dir
        self.shape = VideoShape(recipe.model.frames, recipe.model.latent_height, recipe.model.latent_width)
        self.versions = library_versions()
        # Every backend asked for is set up now, so one that cannot run here fails before any work.
        self.backends = [make_backend(name, recipe, self.root) for name in recipe.engine.selected]
        self.result = BuildResult(self.root)
        if recipe.model.path is not None:  # before any file of the folder is read, hashed or loaded
            folder = Path(recipe.model.path)
            for file in self.adapter.weights_files(folder) + self.adapter.sampling_files(folder):
                confine(file, f"{recipe.source.name}: [model].path's {file.relative_to(folder)}")
        fixed = sorted(set(recipe.export.dynamic_axes) & set(self.adapter.fixed_axes))
        if fixed:
            raise RecipeError(f"{recipe.source.name}: [export].dynamic_axes: {recipe.model.family} models cannot "
                              f"export {', '.join(map(repr, fixed))} as dynamic")
        self.validated_shapes = validated_shapes(recipe)
        self._check_shapes()
        self._check_model_fits()

    @cached_property
    def skeleton(self) -> torch.nn.Module:
        """The network on the meta device (its config, no weights), refused if its weights alone cannot fit."""
        m = self.recipe.model
        try:
            return self.adapter.fitting_skeleton(m.preset, m.path)
        except RecipeError as exc:
            raise RecipeError(f"{self.recipe.source.name}: {exc}") from None

    def _check_shapes(self) -> None:
        """Refuse, before any stage, a shape the model cannot run: the export shape or either end of a
        validated range (checked on the network's skeleton: its config, no weights)."""
        recipe = self.recipe
        export = recipe.export_shape
        for shape in self.validated_shapes:
            problem = self.adapter.shape_error(self.skeleton, VideoShape.of_axes(shape))
            if problem:
                keys = [f"profile_{axis} = {getattr(recipe.engine, f'profile_{axis}')}"
                        for axis in shape if shape[axis] != export[axis]]
                where = f"[engine].{', '.join(keys)}: at the range's end, " if keys else "[model]."
                raise RecipeError(f"{recipe.source.name}: {where}{problem}")

    def _check_model_fits(self) -> None:
        """Refuse, before any stage, a pattern key that matches no module of the network, and a shape whose
        forward cannot fit in memory (sized on the skeleton at the largest shape the build runs)."""
        recipe, skeleton = self.recipe, self.skeleton
        modules = [site.attention for site in self.adapter.temporal_sites(skeleton)]
        problem = self.adapter.options_error(skeleton) or unmatched_pattern(
            "[pruning].keep", recipe.pruning.keep, modules, "temporal module")
        if problem:
            raise RecipeError(f"{recipe.source.name}: {problem}")
        export = recipe.export_shape
        runs = {**export, "batch": self.adapter.run_batch}  # how calibration and validation call it
        shape = max([*self.validated_shapes, runs], key=lambda s: math.prod(s.values()))
        problem = self.adapter.memory_error(skeleton, VideoShape.of_axes(shape), shape["batch"])
        if problem:
            size = f"{shape['frames']}x{shape['height']}x{shape['width']}"
            if shape == export:
                where = f"[model].frames x latent_height x latent_width = {size} at [export].batch = {shape['batch']}"
            elif shape == runs:
                where = f"[model].frames x latent_height x latent_width = {size} at batch {shape['batch']} " \
                        "(calibration and validation runs)"
            else:
                where = f"[engine].profile_* maximum frames x height x width = {size} at batch {shape['batch']}"
            raise RecipeError(f"{recipe.source.name}: {where} {problem}")

    # -- inputs, loaded lazily ------------------------------------------------------------------------
    @cached_property
    def bundle(self) -> ModelBundle:
        model = self.recipe.model
        if model.preset is not None:
            try:
                bundle = self.adapter.load_preset(model.preset, model.seed)
            except RecipeError as exc:
                raise RecipeError(f"{self.recipe.source.name}: {exc}") from None
        else:
            bundle = self.adapter.load_folder(Path(model.path))
        if bundle.random_weights:
            console.print(f"[bold yellow]note:[/] {self.recipe.model.family} {bundle.description}: "
                          "RANDOM weights, so scores and fidelity say nothing about a trained model. "
                          "Set \\[model].path to a checkpoint folder for real results.", soft_wrap=True)
        return bundle

    @cached_property
    def model_key(self) -> str:
        """The network (config and weights): every stage that loads it keys on this."""
        m = self.recipe.model
        return self.adapter.weights_digest(m.preset, m.path, m.seed)

    @cached_property
    def sampling_key(self) -> str:
        """The model folder's other files the sampling loop reads (scheduler, tokenizer, text encoder)."""
        return self.adapter.sampling_digest(self.recipe.model.path)

    def trajectory_inputs(self, section: str) -> list[Any]:
        """What a stage running trajectories reads besides the network: its recipe section, the sampling
        files and the content of its token file (the path alone would miss an overwritten file)."""
        tokens = getattr(self.recipe, section).tokens
        return [self.recipe.section(section), self.sampling_key, sha256_file(Path(tokens)) if tokens else None]

    @property
    def contract_ranges(self) -> dict[str, list[int]]:
        """The [min, max] every engine is validated over, per axis (the contract records those of its dynamic axes)."""
        return {axis: [r.min, r.max] for axis, r in profile_ranges(self.recipe).items()}

    @cached_property
    def pruned_model(self) -> torch.nn.Module:
        """The pruned model as saved by the prune stage, reloaded from disk (which also checks the saved form)."""
        return load_pruned(self.root / "pruned")[2]

    def _run_stage(self, name: str, key: str, run: Callable[[], tuple[list[Path], dict[str, Any]]],
                   needs_model: bool = True) -> StageRecord:
        record = None if self.force else self.manifest.reusable(name, key)
        if record is not None:
            self.result.outcomes.append(StageOutcome(name, True, 0.0, record))
            return record
        if needs_model:
            self.bundle  # load (and check) the model before the stage announces itself
        start = time.perf_counter()
        console.print(f"[bold]{name}[/] ...", highlight=False)
        with activity(f"stage {name}", self.root):
            files, data = run()
        seconds = time.perf_counter() - start
        record = self.manifest.complete(name, key, files, data, seconds)
        self.result.outcomes.append(StageOutcome(name, False, seconds, record))
        return record

    def _models(self) -> tuple[tuple[str, torch.nn.Module], ...]:
        return ("original", self.bundle.model), ("pruned", self.pruned_model)

    # -- stages ---------------------------------------------------------------------------------------
    def _calibrate(self) -> tuple[list[Path], dict[str, Any]]:
        scores = calibrate(self.adapter, self.bundle, self.shape, self.recipe.calibration)
        path = self.root / "scores.json"
        write_json(path, scores.to_json())
        heads = sum(m.heads for m in scores.modules.values())
        return [path], {"modules": len(scores.modules), "heads": heads, "samples": scores.samples}

    def _plan(self) -> tuple[list[Path], dict[str, Any]]:
        scores = Scores.from_json(json.loads((self.root / "scores.json").read_text()))
        plan = make_plan(scores, self.recipe.pruning)
        path = self.root / "plan.json"
        write_json(path, plan.to_json())
        return [path], plan.to_json()["summary"]

    def _prune(self) -> tuple[list[Path], dict[str, Any]]:
        plan = PruningPlan.from_json(json.loads((self.root / "plan.json").read_text()))
        original = self.bundle.model
        pruned = copy.deepcopy(original)
        apply_plan(pruned, self.adapter.temporal_sites(pruned), plan)
        files = save_pruned(self.adapter, self.bundle.config, pruned, plan, self.root / "pruned")
        before, after = parameter_count(original), parameter_count(pruned)
        return files, {"parameters_original": before, "parameters_pruned": after, "parameters_removed": before - after}

    def _export(self) -> tuple[list[Path], dict[str, Any]]:
        section = self.recipe.export
        terms = ContractTerms(self.recipe.model.family, self.contract_ranges, self.adapter.conventions(self.bundle))
        files, data = [], {}
        for variant, model in self._models():
            spec = self.adapter.export_spec(model, self.shape, section.batch, section.dynamic_axes)
            info = export_onnx(model, spec, self.root / "onnx" / f"{variant}.onnx", section.opset,
                               section.external_data, terms)
            files += info.files
            data[variant] = {"path": str(info.path.relative_to(self.root)), "parameters": info.parameters,
                             "bytes": info.bytes_on_disk, "external_data": info.external_data, "nodes": info.nodes}
        data["parameters_removed"] = data["original"]["parameters"] - data["pruned"]["parameters"]
        data["contract"] = info.contract  # the same for both: pruning keeps every input and output
        return files, data

    def _engine(self, export: StageRecord) -> tuple[list[Path], dict[str, Any]]:
        files, data = [], {}
        for backend in self.backends:
            for variant in MODEL_VARIANTS:
                onnx_path = self.root / export.data[variant]["path"]
                engine_path = self.root / "engines" / backend.engine_name(onnx_path)
                files += backend.build(onnx_path, engine_path)
                data[f"{variant}.{backend.name}"] = {"backend": backend.name, "variant": variant,
                                                     "path": str(engine_path.relative_to(self.root)),
                                                     "precision": backend.precision, "versions": backend.versions()}
        return files, data

    def _validate(self, engine: StageRecord) -> tuple[list[Path], dict[str, Any]]:
        section = self.recipe.validation
        backends = {b.name: b for b in self.backends}
        files, metrics, gates = [], {}, []
        for variant, model in self._models():
            samples = golden_samples(self.adapter, model, self.validated_shapes, section)
            golden_path = self.root / "goldens" / f"{variant}.npz"
            save_goldens(golden_path, samples)
            files.append(golden_path)
            for name, entry in engine.data.items():
                if entry["variant"] != variant:
                    continue
                backend = backends[entry["backend"]]
                worst = compare_engine(backend.load(self.root / entry["path"]), samples)
                metrics[f"export.{name}"] = vars(worst)
                gates += export_gates(worst, section, backend.precision, f"export.{name}")
        fidelity = pruning_fidelity(self.adapter, self.bundle, self.pruned_model, self.shape, section)
        metrics["pruning"] = fidelity.to_json()
        gates += pruning_gates(self.adapter, fidelity, section)
        report = self.root / "validation.json"
        summary = {"shapes": self.validated_shapes, "metrics": metrics, "gates": gates_json(gates),
                   "passed": all(g.passed for g in gates)}
        write_json(report, summary)
        files.append(report)
        return files, summary

    # -- orchestration --------------------------------------------------------------------------------
    def run(self) -> BuildResult:
        with activity(f"preparing the artifact folder {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)
            lock_path = self.root / ".lock"
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

    def _run_locked(self) -> BuildResult:
        r, v = self.recipe, self.versions
        shape = vars(self.shape)
        self.manifest.doc.update({"name": r.name, "recipe_file": str(r.source), "recipe": r.as_dict(), "versions": v,
                                  "status": "building"})
        # Each key hashes the stage's own settings and the content of the files it reads, so a stage
        # reruns exactly when something it consumes changed.
        calibrate = self._run_stage("calibrate", content_key(
            "calibrate", self.model_key, *self.trajectory_inputs("calibration"), shape, v["torch"], v["diffusers"],
            v["transformers"], v["f3export"]), self._calibrate)
        plan = self._run_stage("plan", content_key("plan", calibrate.files, r.section("pruning"), v["f3export"]),
                               self._plan, needs_model=False)
        prune = self._run_stage("prune", content_key("prune", plan.files, self.model_key, v["torch"],
                                                     v["f3export"]), self._prune)
        export = self._run_stage("export", content_key(
            "export", prune.files, self.model_key, r.section("export"), shape, self.contract_ranges,
            self.adapter.conventions_digest(r.model.path), v["torch"], v["onnx"], v["onnx_graphsurgeon"],
            v["diffusers"], v["f3export"]), self._export)
        backend_versions = [b.versions() for b in self.backends]
        engine = self._run_stage("engine", content_key("engine", export.files, r.section("engine"), backend_versions),
                                 lambda: self._engine(export), needs_model=False)
        validate = self._run_stage("validate", content_key(
            "validate", engine.files, prune.files, self.model_key, *self.trajectory_inputs("validation"), shape,
            self.validated_shapes, v["torch"], v["diffusers"], v["transformers"], backend_versions, v["f3export"]),
            lambda: self._validate(engine))

        self.result.gates = [Gate(**{k: g[k] for k in ("metric", "value", "limit", "kind")})
                             for g in validate.data["gates"]]
        self.manifest.doc.update({
            "status": "passed" if self.result.passed else "failed",
            # High-water mark of this build process (stages reused from the cache cost nothing here).
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
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
                        for name, entry in engine.data.items()},
        })
        self.manifest.save()
        return self.result


def summary_tables(result: BuildResult, manifest: Manifest) -> list:
    stages = table("stages", ["stage", "status", "seconds"],
                   [[o.name, "cached" if o.cached else "built", f"{o.seconds:.1f}"] for o in result.outcomes])
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
    numbers.caption = (f"{plan['removed_heads']} of {plan['total_heads']} temporal heads removed, "
                       f"{len(plan['modules_removed'])} modules removed entirely")
    return [stages, numbers, gates_table("validation gates", result.gates)]


def print_summary(result: BuildResult) -> None:
    manifest = Manifest(result.root)
    for item in summary_tables(result, manifest):
        console.print(item)
    verdict = "[green]passed[/]" if result.passed else "[bold red]FAILED: a validation gate did not pass[/]"
    console.print(f"build {verdict}; artifacts in {result.root}; peak memory {manifest.doc['peak_rss_mb']:,} MiB",
                  highlight=False)
    sys.stderr.flush()
