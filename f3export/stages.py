"""The build's stages as data: what each one reads, and the function that runs it.

A stage's cache key hashes exactly the inputs its declaration names (the files of the upstream stages it
reads, its recipe sections, the model files and token files it reads, the shapes it runs at, the libraries
it uses), derived in one place (``stage_key``). So a rebuild reruns exactly the stages a change reaches,
and the tests that prove it read the same declarations.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__
from .artifacts import (MODEL_VARIANTS, StageRecord, content_key, contract_mismatch, first_difference, sha256_file,
                        write_json)
from .cache import StageCache
from .components import TOKENIZER_FILE, Component, exportable, write_tokenizer
from .contract import graph_io
from .calibrate import RunStore, Scores, calibrate
from .distributed import Team
from .engines import COMPONENT_BACKEND, Backend, profile_ranges, validated_shapes
from .errors import CheckError, RecipeError
from .export import ContractTerms, export_onnx
from .models.base import ModelAdapter, VideoShape, family_sources
from .models.loading import ModelBundle
from .models.memory import return_free_memory
from .pictures import video_strips
from .prune import PRUNED_CONFIG, PruningPlan, load_pruned, make_plan, parameter_count, pruned_copy, save_pruned
from .recipe import AUTO_RATIO, Recipe
from .search import choose_ratio
from .schedule import FULL, StepSchedule, scheduled
from .sensitivity import OutputMeasure
from .text_standin import STANDIN_TEXT
from .report import console, detail
from .weights import read_json
from .validate import (Comparison, compare_engine, export_gates, gates_json, golden_samples, load_goldens,
                       pruning_fidelity, pruning_gates,
                       save_goldens)

StageOutput = tuple[list[Path], dict[str, Any]]  # the files a stage wrote, and what the manifest records of it

BACKENDS = "backends"  # as a library: the version report of every engine backend the recipe selects


class SourceModel:
    """The recipe's network: its skeleton, its weights and the digests of its files, each made once, when needed."""

    def __init__(self, recipe: Recipe, adapter: ModelAdapter, text_embeddings: Path | None = None):
        """``text_embeddings``: the folder a text encoder keeps its embeddings in (None: in memory only)."""
        self.recipe, self.adapter, self.text_embeddings = recipe, adapter, text_embeddings
        self._digests: dict[str, str] = {}
        self._noted = self._text_noted = False

    @cached_property
    def skeleton(self) -> torch.nn.Module:
        """The network on the meta device (its config, no weights), refused if its weights alone cannot fit."""
        m = self.recipe.model
        try:
            return self.adapter.checkpoint.fitting_skeleton(m.preset, m.path)
        except RecipeError as exc:
            raise RecipeError(f"{self.recipe.source.name}: {exc}") from None

    @cached_property
    def bundle(self) -> ModelBundle:
        model = self.recipe.model
        if model.preset is not None:
            try:
                bundle = self.adapter.checkpoint.load_preset(model.preset, model.seed)
            except RecipeError as exc:
                raise RecipeError(f"{self.recipe.source.name}: {exc}") from None
        else:
            bundle = self.adapter.checkpoint.load_folder(Path(model.path))
        if bundle.random_weights and not self._noted:
            self._noted = True
            console.print(f"[bold yellow]note:[/] {model.family} {bundle.description}: "
                          "RANDOM weights, so scores and fidelity say nothing about a trained model. "
                          "Set \\[model].path to a checkpoint folder for real results.", soft_wrap=True)
        self.adapter.adopt(bundle)
        if bundle.encode_text is not None and self.text_embeddings is not None:
            bundle.encode_text.keep_on_disk(self.text_embeddings, self.digest("sampling"))
        text = self.adapter.text_source(bundle)
        if text is not None and text.startswith(STANDIN_TEXT) and model.path is not None and not self._text_noted:
            self._text_noted = True
            console.print(f"[bold yellow]note:[/] {model.path}: {text}; prompts are not text the model reads",
                          soft_wrap=True)
        return bundle

    def release(self) -> None:
        """Free the weights (the next ``bundle`` loads them again)."""
        self.__dict__.pop("bundle", None)

    def digest(self, files: str) -> str:
        """Identity of one class of the model's files (MODEL_FILES), hashed once per build."""
        if files not in self._digests:
            m = self.recipe.model
            self._digests[files] = model_digest(self.adapter, files, m.preset, m.path, m.seed)
        return self._digests[files]


def model_digest(adapter: ModelAdapter, files: str, preset: str | None, path: str | None, seed: int) -> str:
    """Identity of one class of a model's files (MODEL_FILES), for the build cache, without loading the model."""
    if files == "network" and preset is not None:
        # A preset's weights are made by code: the family's modules are part of their identity.
        return content_key(adapter.family, preset, adapter.checkpoint.presets[preset], seed, __version__,
                           torch.__version__, family_sources(adapter))
    listed: list[Path] = []  # a preset's sampling and conventions are code
    if path is not None:
        listed = {"network": adapter.checkpoint.weights_files,  # config and weights
                  "sampling": adapter.checkpoint.sampling_files,  # scheduler, tokenizer, text encoder
                  "conventions": adapter.checkpoint.conventions_files,  # what the contract records
                  }[files](Path(path))
    return content_key(adapter.family, [(f.name, sha256_file(f)) for f in listed])


MODEL_FILES = ("network", "sampling", "conventions")
SHAPES = ("latent", "contract_ranges", "validated_shapes")


@dataclass
class StageContext:
    """What a stage function reads: the recipe, its model, the folder it writes into, the finished stages."""

    recipe: Recipe
    adapter: ModelAdapter
    root: Path
    model: SourceModel
    backends: list[Backend]
    records: dict[str, StageRecord] = field(default_factory=dict)  # stages done (run or reused), by name
    variants: tuple[str, ...] = MODEL_VARIANTS  # a ratio sweep exports and builds the pruned model alone
    keys: dict[str, str] = field(default_factory=dict)  # the key of every stage run or reused, by name
    team: Team | None = None  # the torchrun processes a shared stage's work is dealt out to
    # hold at most the models a step needs, loading them again when needed (a build of a large model; a
    # sweep, and a model reloaded faster than its memory matters, keep them)
    frugal: bool = False
    cache: StageCache | None = None  # outputs shared with the other builds of the output folder
    versions: dict[str, str] = field(default_factory=dict)  # the library versions stage keys hash

    @property
    def shape(self) -> VideoShape:
        m = self.recipe.model
        return VideoShape(m.frames, m.latent_height, m.latent_width)

    @cached_property
    def validated_shapes(self) -> list[dict[str, int]]:
        return validated_shapes(self.recipe)

    @property
    def contract_ranges(self) -> dict[str, list[int]]:
        """The [min, max] every engine is validated over, per axis (the contract records those of its dynamic axes)."""
        return {axis: [r.min, r.max] for axis, r in profile_ranges(self.recipe).items()}

    @property
    def pruned_steps(self) -> tuple[float, float]:
        """The stretch of each trajectory the pruned model runs, as the plan chose it (saved with the model)."""
        start, stop = read_json(self.root / "pruned" / PRUNED_CONFIG).get("steps", list(FULL))
        return float(start), float(stop)

    @cached_property
    def pruned(self) -> torch.nn.Module:
        """The pruned model as saved by the prune stage, reloaded from disk (which also checks the saved form)."""
        return load_pruned(self.root / "pruned")[2]

    def models(self) -> Iterator[tuple[str, torch.nn.Module]]:
        for variant in self.variants:
            yield variant, self.model.bundle.model if variant == "original" else self.pruned

    def release(self, *variants: str) -> None:
        """Frugal: free these models' weights (all without ``variants``), so that a build holds at most two
        models (pruning fidelity's pair), never those and an engine or an export's working set as well."""
        if not self.frugal:
            return
        for variant in variants or MODEL_VARIANTS:
            if variant == "original":
                self.model.release()
            else:
                self.__dict__.pop("pruned", None)
        gc.collect()
        return_free_memory()

    def original_output(self, stage_name: str, reads: dict[str, Any], make: Callable[[], StageOutput]) -> StageOutput:
        """A stage's work on the original model alone: from the shared cache where a build did it with the same
        inputs (the stage's own, but not its upstream stages', and ``reads``: the original's files it reads),
        else ``make()``'s, then cached. So a build whose [pruning] changed redoes only the pruned model's part."""
        if self.cache is None:
            return make()
        stage = next(s for s in STAGES if s.name == stage_name)
        own = {n: input_value(n, self, self.versions) for n in stage.inputs_for(self.recipe) if not n.startswith("stage:")}
        name, key = f"{stage_name}:original", content_key(f"{stage_name}:original", own, reads)
        found = self.cache.fetch(name, key, self.root)
        if found is not None:
            detail(f"{stage_name}: the original model's part reused from {self.cache.folder} (key {key[:12]})")
            return found.files, found.data
        files, data = make()
        self.cache.store(name, key, self.root, files, data)
        return files, data

    def shape_value(self, name: str) -> Any:
        return {"latent": lambda: vars(self.shape), "contract_ranges": lambda: self.contract_ranges,
                "validated_shapes": lambda: self.validated_shapes}[name]()

    def files_digest(self, section: str) -> str | None:
        """The content of the files a recipe section names (a path alone would miss a file overwritten in
        place), e.g. a token protocol's token file."""
        files = self.recipe.input_files(section)
        return content_key({key: sha256_file(Path(path)) for key, path in files.items()}) if files else None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], StageOutput]
    upstream: tuple[str, ...] = ()  # stages whose files it reads
    sections: tuple[str, ...] = ()  # recipe sections whose values it reads
    model_files: tuple[str, ...] = ()  # of MODEL_FILES
    input_files: tuple[str, ...] = ()  # recipe sections whose named files' content it reads
    shapes: tuple[str, ...] = ()  # of SHAPES: the shapes it runs the model at or records
    libraries: tuple[str, ...] = ()  # keys of build.library_versions(), or BACKENDS
    needs_model: bool = True  # load (and check) the weights before it starts
    shared: bool = False  # its work is dealt out among torchrun's processes (StageContext.team)
    # its output is a verdict (the gates): every build computes its own, never taken from the shared cache
    verdict: bool = False
    # what is wrong with a shared-cache entry's output (files placed in the build folder, data) that its hashes
    # cannot show, its data against what its files say; None where nothing is (a problem makes it a miss)
    reuse_problem: Callable[[StageContext, StageOutput], str | None] | None = None
    # inputs (``kind:name``) it reads only for some recipes: (whether a recipe makes it read them, the inputs)
    conditional: tuple[Callable[[Recipe], bool], tuple[str, ...]] | None = None

    @property
    def inputs(self) -> list[str]:
        """What the key hashes for every recipe, as ``kind:name``."""
        return [*(f"stage:{s}" for s in self.upstream), *(f"section:{s}" for s in self.sections),
                *(f"model:{m}" for m in self.model_files), *(f"files:{s}" for s in self.input_files),
                *(f"shape:{s}" for s in self.shapes), *(f"library:{lib}" for lib in self.libraries)]

    def inputs_for(self, recipe: Recipe) -> list[str]:
        """What the key hashes for ``recipe``: ``inputs``, and the conditional ones where it reads them."""
        more = self.conditional[1] if self.conditional is not None and self.conditional[0](recipe) else ()
        return [*self.inputs, *more]


def input_value(name: str, ctx: StageContext, versions: dict[str, str]) -> Any:
    kind, _, item = name.partition(":")
    if kind == "library":
        return [b.versions() for b in ctx.backends] if item == BACKENDS else versions[item]
    return {"stage": lambda: ctx.records[item].files, "section": lambda: ctx.recipe.section(item),
            "model": lambda: ctx.model.digest(item), "files": lambda: ctx.files_digest(item),
            "shape": lambda: ctx.shape_value(item), "measure": lambda: output_measure(ctx.recipe).to_json()}[kind]()


def stage_key(stage: Stage, ctx: StageContext, versions: dict[str, str]) -> str:
    """The one place a cache key is made: the stage's name and the value of every input it declares (for this
    recipe)."""
    return content_key(stage.name, {name: input_value(name, ctx, versions) for name in stage.inputs_for(ctx.recipe)})


# -- the stage functions ----------------------------------------------------------------------------------
CALIBRATION_RUNS = "calibration"  # the finished runs of an unfinished calibration, a folder per stage key


def output_measure(recipe: Recipe) -> OutputMeasure | None:
    """What the ``sensitivity`` criterion changes heads by, when the recipe ranks by it (it alone costs extra
    forward passes, so calibration measures it then only, for the recipe's action)."""
    pruning = recipe.pruning
    if pruning.criterion != "sensitivity":
        return None
    return OutputMeasure(pruning.action, pruning.frames_window, recipe.calibration.sensitivity_batch)


def calibrate_scores(ctx: StageContext) -> StageOutput:
    """Runs saved as they finish (resumed after a crash), shared with the team's other processes; the team's
    other processes return here without writing anything."""
    args = (ctx.adapter, ctx.model.bundle, ctx.shape, ctx.recipe.calibration)
    measure = output_measure(ctx.recipe)
    if ctx.team is not None and not ctx.team.leader:
        calibrate(*args, team=ctx.team, measure=measure)
        return [], {}
    runs = ctx.root / CALIBRATION_RUNS
    key = ctx.keys["calibrate"]
    for stale in sorted(runs.iterdir()) if runs.is_dir() else []:  # of calibrations no recipe asks for now
        if stale.name != key:
            shutil.rmtree(stale, ignore_errors=True)
    store = RunStore(runs / key, key)
    scores = calibrate(*args, store=store, team=ctx.team, measure=measure)
    paths = scores.save(ctx.root)
    heads = sum(m.heads for m in scores.modules.values())
    shutil.rmtree(runs, ignore_errors=True)  # scores.json holds them now
    return paths, {"modules": len(scores.modules), "heads": heads, "samples": scores.samples}


def searches_ratio(recipe: Recipe) -> bool:
    return recipe.pruning.ratio == AUTO_RATIO


def plan_heads(ctx: StageContext) -> StageOutput:
    """The heads to remove; with ratio = "auto", the ratio too, by sampling held-out runs (search.py), the one
    case the plan loads the model."""
    scores = Scores.load(ctx.root)
    r = ctx.recipe
    plan = choose_ratio(ctx.adapter, ctx.model.bundle, ctx.shape, scores, r.pruning, r.validation) \
        if searches_ratio(r) else make_plan(scores, r.pruning)
    path = ctx.root / "plan.json"
    write_json(path, plan.to_json())
    return [path], plan.to_json()["summary"]


def prune_model(ctx: StageContext) -> StageOutput:
    plan = PruningPlan.from_json(json.loads((ctx.root / "plan.json").read_text()))
    original = ctx.model.bundle.model
    pruned = pruned_copy(ctx.adapter, original, plan, Scores.load(ctx.root).compensation if plan.compensate else None)
    files = save_pruned(ctx.adapter, ctx.model.bundle.config, pruned, plan.kept_heads, ctx.root / "pruned",
                        plan.local_heads, plan.window, plan.steps)
    before, after = parameter_count(original), parameter_count(pruned)
    return files, {"parameters_original": before, "parameters_pruned": after, "parameters_removed": before - after}


def contract_conventions(ctx: StageContext) -> dict[str, Any]:
    """How a runtime drives this build's engines beyond names and shapes: the family's conventions for the loaded
    model (its scheduler, guidance, text) and, under a step schedule, the rule that switches engines."""
    conventions = ctx.adapter.conventions(ctx.model.bundle)
    start, stop = ctx.pruned_steps
    if (start, stop) != FULL:  # the runtime's rule for which engine runs a call (schedule.py)
        train = int(conventions["scheduler"]["config"]["num_train_timesteps"])
        conventions["step_schedule"] = StepSchedule(start, stop, train).to_json()
    return conventions


def export_models(ctx: StageContext) -> StageOutput:
    section = ctx.recipe.export
    terms = ContractTerms(ctx.recipe.model.family, ctx.contract_ranges, contract_conventions(ctx))
    files, data = [], {}

    def export(variant: str) -> StageOutput:
        model = ctx.model.bundle.model if variant == "original" else ctx.pruned
        spec = ctx.adapter.export_spec(model, ctx.shape, section.batch, section.dynamic_axes)
        info = export_onnx(model, spec, ctx.root / "onnx" / f"{variant}.onnx", section.opset,
                           section.external_data, terms)
        made, parts = list(info.files), {}
        for component in ctx.adapter.model_components(model, ctx.shape):
            part, parts[f"{component.name}.{variant}"] = export_component(ctx, component, variant)
            made += part
        return made, {"path": str(info.path.relative_to(ctx.root)), "parameters": info.parameters,
                      "bytes": info.bytes_on_disk, "external_data": info.external_data, "nodes": info.nodes,
                      "contract": info.contract, **({"components": parts} if parts else {})}

    components = {}
    for variant in ctx.variants:
        made, entry = ctx.original_output("export", {}, lambda: export("original")) if variant == "original" \
            else export(variant)
        files += made
        data[variant] = {k: v for k, v in entry.items() if k not in ("contract", "components")}
        data["contract"] = entry["contract"]  # the same for both: pruning keeps every input and output
        components.update(entry.get("components", {}))
        ctx.release(variant)  # the next variant (and the engines after) without this one's weights
    if ctx.variants == MODEL_VARIANTS:
        data["parameters_removed"] = data["original"]["parameters"] - data["pruned"]["parameters"]
        for component in ctx.adapter.pipeline_components(ctx.model.bundle, ctx.shape):
            made, components[component.name] = ctx.original_output(
                "export", {"component": component.name}, lambda component=component: export_component(ctx, component))
            files += made
    if components:
        data["components"] = components
    return files, {k: data[k] for k in [*ctx.variants, *(k for k in ("parameters_removed", "components") if k in data),
                                        "contract"]}


def exported_contract_problem(ctx: StageContext, output: StageOutput) -> str | None:
    """A reused export whose recorded contract is not the one its ONNX files carry (the manifest would hand a
    runtime a scheduler or ranges that no engine was built with)."""
    files, data = output
    for variant in ctx.variants:
        entry = data.get(variant)
        path = ctx.root / str(entry.get("path") if isinstance(entry, dict) else None)
        problem = contract_mismatch(data.get("contract"), path) if path in files else \
            f"its data names no exported {variant} model among its files"
        if problem:
            return problem
    return None


def export_component(ctx: StageContext, component: Component, variant: str | None = None) -> StageOutput:
    """One of the pipeline's other models (text encoder, VAE decoder), or a model's other graph (of ``variant``),
    to ONNX, with the tokenizer the text encoder needs."""
    section = ctx.recipe.export
    name = component.name if variant is None else f"{component.name}.{variant}"
    info = export_onnx(exportable(component.module), component.spec, ctx.root / "onnx" / f"{name}.onnx",
                       section.opset, section.external_data)
    files = list(info.files)
    entry = {"path": str(info.path.relative_to(ctx.root)), "parameters": info.parameters,
             "bytes": info.bytes_on_disk, **graph_io(info.path), "meaning": component.meaning}
    if component.name == "text_encoder":
        files.append(write_tokenizer(ctx.model.bundle.encode_text, ctx.root / "onnx" / TOKENIZER_FILE))
        entry["tokenizer"] = str(files[-1].relative_to(ctx.root))
    return files, entry


def _check_components(ctx: StageContext, components: list[tuple[str, Component]]
                      ) -> tuple[list[Path], dict[str, dict]]:
    """Each component's engine (by its name in the build) against its PyTorch module on inputs the export did not
    see, stored as its goldens (``f3export check`` re-runs them): the goldens' files and the worst agreement per
    engine."""
    built = ctx.records["engine"].data.get("components", {})
    backend = next((b for b in ctx.backends if b.name == COMPONENT_BACKEND), None)
    files, worst = [], {}
    for name, component in components if built else ():
        with torch.no_grad():
            expected = component.module(*component.check_inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        golden = ({k: v.numpy() for k, v in component.check_inputs.items()},
                  {out: value.numpy() for out, value in zip(component.spec.output_names, expected)})
        files.append(ctx.root / "goldens" / f"{name}.npz")
        save_goldens(files[-1], [golden])
        engine = backend.load(ctx.root / built[name]["path"])
        worst[f"{name}.{COMPONENT_BACKEND}"] = vars(compare_engine(engine, [golden]))
    return files, worst


def _model_components(ctx: StageContext, variant: str) -> list[tuple[str, Component]]:
    """The adapter's graphs of ``variant``'s model, by their names in the build (``<name>.<variant>``)."""
    model = ctx.model.bundle.model if variant == "original" else ctx.pruned
    return [(f"{c.name}.{variant}", c) for c in ctx.adapter.model_components(model, ctx.shape)]


def _files_of(record: StageRecord, path: str) -> dict[str, str]:
    """The record's files that are ``path`` and its external data (``path.data``)."""
    return {rel: digest for rel, digest in record.files.items() if rel in (path, path + ".data")}


def build_engines(ctx: StageContext) -> StageOutput:
    export = ctx.records["export"]
    files, data = [], {}
    for backend in ctx.backends:
        for variant in ctx.variants:
            onnx_path = ctx.root / export.data[variant]["path"]
            engine_path = ctx.root / "engines" / backend.engine_name(onnx_path)

            def build(backend=backend, onnx_path=onnx_path, engine_path=engine_path) -> StageOutput:
                return backend.build(onnx_path, engine_path), {}

            reads = {"backend": backend.name, "onnx": _files_of(export, export.data[variant]["path"])}
            made, _ = ctx.original_output("engine", reads, build) if variant == "original" else build()
            files += made
            data[f"{variant}.{backend.name}"] = {"backend": backend.name, "variant": variant,
                                                 "path": str(engine_path.relative_to(ctx.root)),
                                                 "precision": backend.precision, "versions": backend.versions()}
    component_backend = next((b for b in ctx.backends if b.name == COMPONENT_BACKEND), None)
    for name, entry in export.data.get("components", {}).items() if component_backend is not None else ():
        onnx_path = ctx.root / entry["path"]
        engine_path = ctx.root / "engines" / component_backend.engine_name(onnx_path)
        made, _ = ctx.original_output(
            "engine", {"component": name, "onnx": _files_of(export, entry["path"])},
            lambda onnx_path=onnx_path, engine_path=engine_path: (component_backend.build(onnx_path, engine_path), {}))
        files += made
        data.setdefault("components", {})[name] = {"backend": COMPONENT_BACKEND,
                                                   "path": str(engine_path.relative_to(ctx.root))}
    return files, data




def _check_contract_terms(ctx: StageContext) -> None:
    """The export's contract says what this build's model and recipe say (family, conventions, validated ranges):
    an export reused from the shared cache, files and record rewritten alike, could carry another scheduler that
    no hash shows and that only an engines-only runtime would follow."""
    contract = ctx.records["export"].data["contract"]
    expected = json.loads(json.dumps({
        "family": ctx.recipe.model.family, "conventions": contract_conventions(ctx),
        "dynamic_axes": {axis: ctx.contract_ranges.get(axis) for axis in contract.get("dynamic_axes") or {}}}))
    recorded = {key: contract.get(key) for key in expected}
    if recorded != expected:
        raise CheckError(f"{ctx.root}: the export's {first_difference(expected, recorded, 'contract')} is not what "
                         "this model and recipe give; it came from the shared cache, edited since: delete "
                         f"{ctx.cache.folder if ctx.cache else 'that cache'} and build again")


def validate_engines(ctx: StageContext) -> StageOutput:
    """Engines against PyTorch on fresh goldens, and the pruned model against the original over held-out runs.
    All of it runs in every build: a verdict is computed by the build that reports it, never reused from the
    shared cache (whose engines it checks, among others)."""
    section = ctx.recipe.validation
    _check_contract_terms(ctx)
    backends = {b.name: b for b in ctx.backends}
    engines = {name: e for name, e in ctx.records["engine"].data.items() if name != "components"}

    def engine_metrics(variant: str, goldens: list) -> dict[str, dict]:
        """Each engine of ``variant`` against the goldens, one engine loaded at a time."""
        return {name: vars(compare_engine(backends[e["backend"]].load(ctx.root / e["path"]), goldens))
                for name, e in engines.items() if e["variant"] == variant}

    def check(variant: str) -> StageOutput:
        golden_path = ctx.root / "goldens" / f"{variant}.npz"
        save_goldens(golden_path, golden_samples(ctx.adapter, ctx.model.bundle.model if variant == "original"
                                                 else ctx.pruned, ctx.validated_shapes, section))
        made, worst = _check_components(ctx, _model_components(ctx, variant))
        return [golden_path, *made], worst

    files, measured, components = [], {}, {}
    for variant in ctx.variants:
        made, worst = check(variant)
        files += made
        components.update(worst)
        if variant == "original":
            ctx.release("original")  # frugal: its engines run without it in memory (pruning fidelity reloads it)
            measured["original"] = engine_metrics("original", load_goldens(made[0]))
    made, worst = _check_components(
        ctx, [(c.name, c) for c in ctx.adapter.pipeline_components(ctx.model.bundle, ctx.shape)])
    files += made
    components.update(worst)
    fidelity = pruning_fidelity(ctx.adapter, ctx.model.bundle,
                                scheduled(ctx.adapter, ctx.model.bundle, ctx.pruned, ctx.pruned_steps),
                                ctx.shape, section)
    ctx.release()  # the engines run without the PyTorch models in memory
    if "pruned" in ctx.variants:
        measured["pruned"] = engine_metrics("pruned", load_goldens(ctx.root / "goldens" / "pruned.npz"))
    metrics, gates = {}, []
    if components:
        measured["components"] = components
    for variant in measured:
        for name, worst in measured[variant].items():
            metrics[f"export.{name}"] = worst
            precision = backends[engines[name]["backend"]].precision if name in engines else "fp32"
            gates += export_gates(Comparison(**worst), section, precision, f"export.{name}")
    metrics["pruning"] = fidelity.to_json()
    gates += pruning_gates(ctx.adapter, fidelity, section)
    report = ctx.root / "validation.json"
    summary = {"shapes": ctx.validated_shapes, "metrics": metrics, "gates": gates_json(gates),
               "passed": all(g.passed for g in gates)}
    write_json(report, summary)
    files.append(report)
    pictures = []
    if fidelity.videos:
        pictures.append(ctx.root / "samples.png")
        video_strips(pictures[-1], fidelity.videos)
    files += pictures
    return files, summary


# -- the graph --------------------------------------------------------------------------------------------
STAGES = (
    # calibrate: ranking by sensitivity measures it for the recipe's action (and window) too
    Stage("calibrate", calibrate_scores, sections=("calibration",), model_files=("network", "sampling"),
          input_files=("calibration",), shapes=("latent",),
          libraries=("torch", "diffusers", "transformers", "f3export"), shared=True,
          conditional=(lambda recipe: output_measure(recipe) is not None, ("measure:sensitivity",))),
    # plan: a given ratio reads scores.json and [pruning] only; ratio = "auto" samples the held-out runs with
    # the model (search.py), so then it reads what validation's runs read
    Stage("plan", plan_heads, upstream=("calibrate",), sections=("pruning",), libraries=("f3export",),
          needs_model=False, conditional=(searches_ratio, (
              "section:validation", "model:network", "model:sampling", "files:validation", "shape:latent",
              "library:torch", "library:diffusers", "library:transformers"))),
    # prune: compensation reads the calibration's means (compensation.safetensors)
    Stage("prune", prune_model, upstream=("plan", "calibrate"), model_files=("network",),
          libraries=("torch", "f3export")),
    # export: the contract records the profile ranges and the conventions files (the scheduler); the text
    # encoder and VAE (sampling files) are exported beside the models
    Stage("export", export_models, upstream=("prune",), sections=("export",),
          model_files=("network", "sampling", "conventions"),
          shapes=("latent", "contract_ranges"),
          libraries=("torch", "onnx", "onnx_graphsurgeon", "diffusers", "transformers", "f3export"),
          reuse_problem=exported_contract_problem),
    Stage("engine", build_engines, upstream=("export",), sections=("engine",), libraries=(BACKENDS,),
          needs_model=False),
    Stage("validate", validate_engines, upstream=("engine", "prune"), sections=("validation",),
          model_files=("network", "sampling"), input_files=("validation",), shapes=("latent", "validated_shapes"),
          libraries=("torch", "diffusers", "transformers", BACKENDS, "f3export"), verdict=True),
)
STAGE_NAMES = [stage.name for stage in STAGES]
