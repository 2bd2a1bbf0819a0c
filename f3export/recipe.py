"""Recipes: one TOML file that says what to build, validated before anything runs.

Each section is a frozen dataclass; the field metadata carries the checks, so
the schema, defaults and error messages live in one place. Errors name the
file and the key (``tav.toml: [pruning].ratio = 1.5 is out of range [0, 1]``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from rich.markup import escape

from .criteria import CRITERIA
from .errors import RecipeError
from .report import console
from .roots import confine

DYNAMIC_AXES = ("batch", "frames", "height", "width")
AUTO_RATIO = "auto"  # [pruning].ratio chosen by the build: the largest whose held-out fidelity passes (search.py)


def spec(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
         choices: tuple | None = None, nonempty: bool = False, path: bool = False,
         input_file: bool = False, read_by: tuple[str, ...] | None = None, words: tuple[str, ...] = ()) -> Any:
    """A recipe key: its default and the checks a value must pass.

    ``path``: a file system path; ``input_file``: a file the build reads (it must exist and lie inside the
    allowed roots); ``read_by``: the engine backends that read the key (None: all of them); ``words``: strings
    a numeric key also takes (``ratio = "auto"``).
    """
    meta = {"low": low, "high": high, "choices": choices, "nonempty": nonempty, "path": path or input_file,
            "input_file": input_file, "read_by": read_by, "words": words}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RecipeKey:
    """A key that one family declares (an option of its network, a setting of its runs, the limit of one of its
    gates) in a section every family has: only recipes of that family may set it."""

    section: str
    name: str
    type: Any
    default: Any
    checks: dict[str, Any] = field(default_factory=dict)  # spec()'s keyword arguments

    def as_field(self) -> tuple[str, Any, Any]:
        return self.name, self.type, spec(self.default, **self.checks)


def family_key(section: str, name: str, type: Any, default: Any, **checks: Any) -> RecipeKey:
    return RecipeKey(section, name, type, default, checks)


@dataclass(frozen=True)
class ModelSection:
    family: str = spec()  # a model family: a key of f3export.models.FAMILIES
    preset: str | None = spec(None)  # built-in config with seeded random weights
    path: str | None = spec(None, path=True)  # local model folder (diffusers layout)
    seed: int = spec(0, low=0)  # seed of a preset's random weights
    frames: int = spec(8, low=1, high=1024)
    latent_height: int = spec(32, low=8, high=512)
    latent_width: int = spec(32, low=8, high=512)
    # or as a pipeline is called, in video frames and pixels: mapped to the latent sizes above through the VAE
    # of the folder (path): latent frames = (num_frames - 1) / temporal compression + 1, height / spatial, ...
    num_frames: int | None = spec(None, low=1, high=8192)
    height: int | None = spec(None, low=8, high=16384)
    width: int | None = spec(None, low=8, high=16384)

    @property
    def adapter_options(self) -> dict:
        """The keys its family declares here: they configure the family's adapter."""
        common = {f.name for f in dataclasses.fields(ModelSection)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in common}


@dataclass(frozen=True)
class CalibrationSection:
    prompts: list[str] = spec(["a man is surfing"], nonempty=True)
    seeds: list[int] = spec([0], nonempty=True)
    # where the runs' forward passes run: "cuda" puts each torchrun process on its own GPU (LOCAL_RANK), and
    # the processes then gather over NCCL instead of gloo; noise is drawn on the CPU either way
    device: str = spec("cpu", choices=("cpu", "cuda"))
    # heads one pass of the ``sensitivity`` criterion changes (each in its own copy of the batch): passes per
    # model call = ceil(heads / this), each at this many times the batch
    sensitivity_batch: int = spec(8, low=1)


# [pruning].action; a family allows those its structure can do. "frame-local" is "temporal-window" at window 0.
ACTIONS = ("remove", "frame-local", "temporal-window")
LOCAL_ACTIONS = ("frame-local", "temporal-window")  # the heads keep their weights and read fewer frames


@dataclass(frozen=True)
class PruningSection:
    criterion: str = spec("contribution", choices=CRITERIA)  # the registry itself: a criterion added is a choice
    scope: str = spec("global", choices=("global", "module"))
    # fraction of temporal heads pruned (removed or made frame-local), or "auto": the largest that passes
    # [validation]'s pruning gates
    ratio: float | str = spec(0.5, low=0.0, high=1.0, words=(AUTO_RATIO,))
    min_heads_per_module: int = spec(0, low=0)
    keep: list[str] = spec([])  # module names (glob patterns) never pruned
    # what happens to the heads ranked below the ratio: "remove" (F3), "frame-local" (joint 3D attention: they
    # attend within their own frame) or "temporal-window" (their own frame and ``window`` frames on each side);
    # unset: the family's default (its first)
    action: str | None = spec(None, choices=ACTIONS)
    window: int = spec(1, low=0)  # frames on each side a "temporal-window" head reads (read by that action only)
    # fold the calibration-mean of what the pruned heads no longer write (removed: all of it; frame-local or
    # windowed: what the window loses) into their module's output bias (FLAP's bias compensation)
    compensate: bool = spec(False)
    # the stretch [start, stop) of every denoising trajectory (fractions of it) that runs the pruned model; the
    # original runs the rest (f3export/schedule.py). [0, 1]: every step
    pruned_steps: list[float] = spec([0.0, 1.0], low=0.0, high=1.0)
    # with ratio = "auto": also search the stretches [s, stop] for each start s listed (after ``pruned_steps``), and
    # keep the one that removes the most attention per trajectory within the budget
    search_steps: list[float] = spec([], low=0.0, high=1.0)
    # with ratio = "auto" and action = "temporal-window": also search these windows (after ``window``), each
    # with every schedule, keeping the candidate that removes the most FLOPs per trajectory within the budget
    search_windows: list[int] = spec([], low=0)

    @property
    def frames_window(self) -> int:
        """The window the pruned heads keep: 0 for frame-local, ``window`` for temporal-window."""
        return self.window if self.action == "temporal-window" else 0


@dataclass(frozen=True)
class ExportSection:
    opset: int = spec(17, low=17, high=23)
    batch: int = spec(2, low=1)  # batch the graph is traced at (2 = classifier-free guidance)
    dynamic_axes: list[str] = spec(list(DYNAMIC_AXES), choices=DYNAMIC_AXES)
    external_data: str = spec("auto", choices=("auto", "always", "never"))


BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class EngineSection:
    backend: str | None = spec(None, choices=BACKENDS)  # one engine backend
    backends: list[str] = spec([], choices=BACKENDS)  # several engine backends
    device: str = spec("cpu", choices=("cpu", "cuda", "auto"), read_by=("onnxruntime",))
    optimization_level: str = spec("extended", choices=("disabled", "basic", "extended", "all"),
                                   read_by=("onnxruntime",))
    precision: str = spec("fp16", choices=("fp32", "fp16", "bf16"), read_by=("tensorrt",))
    builder_optimization_level: int = spec(3, low=0, high=5, read_by=("tensorrt",))
    # keep normalisation, softmax and reductions in fp32 (fp16/bf16 overflow)
    fp32_norms: bool = spec(True, read_by=("tensorrt",))
    # Every backend's validated range (TensorRT: also its optimization profile).
    profile_batch: list[int] = spec([], low=1)  # [min, opt, max]; default: the export shape, static
    profile_frames: list[int] = spec([], low=1)
    profile_height: list[int] = spec([], low=1)  # latent height
    profile_width: list[int] = spec([], low=1)  # latent width

    @property
    def selected(self) -> list[str]:
        return list(self.backends) or [self.backend or "onnxruntime"]


@dataclass(frozen=True)
class ValidationSection:
    prompts: list[str] = spec(["a dog running on the beach"], nonempty=True)
    seeds: list[int] = spec([1000], nonempty=True)
    export_samples: int = spec(2, low=1, high=64)  # fresh random inputs for export fidelity
    export_max_rel_l2: float = spec(1e-4, low=0.0)  # fp32 engines
    export_min_cosine: float = spec(0.9999, low=-1.0, high=1.0)
    export_fp16_max_rel_l2: float = spec(2e-2, low=0.0)  # fp16 / bf16 engines
    export_fp16_min_cosine: float = spec(0.999, low=-1.0, high=1.0)


@dataclass(frozen=True)
class OutputSection:
    name: str | None = spec(None)  # artifact folder name; default: the recipe file's stem
    dir: str = spec("artifacts", path=True)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "calibration": CalibrationSection,
    "pruning": PruningSection,
    "export": ExportSection,
    "engine": EngineSection,
    "validation": ValidationSection,
    "output": OutputSection,
}


@dataclass(frozen=True)
class Recipe:
    source: Path
    model: ModelSection
    calibration: CalibrationSection
    pruning: PruningSection
    export: ExportSection
    engine: EngineSection
    validation: ValidationSection
    output: OutputSection

    @property
    def name(self) -> str:
        return self.output.name or self.source.stem

    @property
    def artifact_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    @property
    def export_shape(self) -> dict[str, int]:
        """The size of every axis in DYNAMIC_AXES that the graph is traced (and first validated) at."""
        m = self.model
        return {"batch": self.export.batch, "frames": m.frames, "height": m.latent_height, "width": m.latent_width}

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))

    def as_dict(self) -> dict[str, Any]:
        return {name: self.section(name) for name in SECTIONS}

    def input_files(self, name: str) -> dict[str, str]:
        """The files section ``name`` sets that the build reads (keys declared ``input_file``), by key (a list's
        items as ``key[i]``)."""
        section = getattr(self, name)
        files = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata["input_file"] and value is not None:
                files.update({f"{f.name}[{i}]": v for i, v in enumerate(value)} if isinstance(value, list)
                             else {f.name: value})
        return files

    @classmethod
    def from_dict(cls, source: Path, data: dict[str, Any]) -> "Recipe":
        """A recipe as stored in a manifest: read from an untrusted folder, so checked like a recipe file."""
        where = f"{source.name} (as stored in the manifest)"
        for name in data:
            if name not in SECTIONS:
                raise RecipeError(f"{where}: unknown section [{name}]")
        family = _family(data.get("model"), where)
        sections = {}
        for name, section in family_sections(family).items():
            raw = data.get(name)
            if not isinstance(raw, dict):
                raise RecipeError(f"{where}: [{name}] missing or not a table")
            stored = {k: v for k, v in raw.items() if v is not None}  # None is how an unset optional key is stored
            sections[name] = _build_section(name, section, stored, f"{where}: [{name}]", family)
        return cls(source=source, **sections)


    @classmethod
    def for_runtime(cls, source: Path, data: dict[str, Any]) -> "Recipe":
        """What serving a build's engines reads of its stored recipe: [model], [export] and [engine], checked
        like a recipe's; family keys and the other sections are left out (None), since knowing them needs the
        model families, which need PyTorch (an engines-only runtime has none)."""
        where = f"{source.name} (as stored in the manifest)"
        sections: dict[str, Any] = dict.fromkeys(SECTIONS)
        for name in RUNTIME_SECTIONS:
            raw = data.get(name)
            if not isinstance(raw, dict):
                raise RecipeError(f"{where}: [{name}] missing or not a table")
            known = {f.name for f in dataclasses.fields(SECTIONS[name])}
            stored = {k: v for k, v in raw.items() if v is not None and k in known}
            sections[name] = _build_section(name, SECTIONS[name], stored, f"{where}: [{name}]", None)
        return cls(source=source, **sections)


RUNTIME_SECTIONS = ("model", "export", "engine")

def _declared_keys(family: str | None) -> tuple[RecipeKey, ...]:
    from .models import FAMILIES

    return FAMILIES[family].recipe_keys() if family in FAMILIES else ()


@functools.cache
def family_sections(family: str | None) -> dict[str, type]:
    """The section classes of a family's recipes: each of SECTIONS, extended by the keys the family declares."""
    keys = _declared_keys(family)
    return {name: dataclasses.make_dataclass(cls.__name__, [k.as_field() for k in keys if k.section == name],
                                              bases=(cls,), frozen=True)
            if any(k.section == name for k in keys) else cls
            for name, cls in SECTIONS.items()}


def _family(model: Any, where: str) -> str | None:
    """The recipe's [model].family if it names one; None where the [model] table will say what is wrong."""
    from .models import FAMILIES

    family = model.get("family") if isinstance(model, dict) else None
    if isinstance(family, str) and family not in FAMILIES:
        raise RecipeError(f"{where}: [model].family = {family!r} is not one of {', '.join(map(repr, FAMILIES))}")
    return family if isinstance(family, str) else None


def _foreign_key_problem(section: str, key: str, value: Any, family: str | None) -> str | None:
    """Why ``key`` of section ``section``, unknown to ``family``, cannot be set: None where no other family
    declares it either (an unknown key); "" where it holds their default, which is dropped (what a manifest
    of an earlier version holds, written when every family's keys were in every recipe)."""
    from .models import FAMILIES

    owners = {name: k for name, cls in FAMILIES.items() for k in cls.recipe_keys()
              if k.section == section and k.name == key and name != family}
    if not owners:
        return None
    if all(value == k.default for k in owners.values()):
        return ""
    if section == "model":  # an option describing another family's network
        return f"applies only to family {', '.join(map(repr, owners))}"
    return f"does not apply to {family} models"


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_scalar(value: Any, tp: type, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) <= sys.float_info.max else math.inf
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):  # TOML has nan and inf; no key means either
        raise RecipeError(f"{where} = {value!r} is not a finite number")
    return value


def _check_value(value: Any, tp: Any, meta: dict[str, Any], where: str) -> Any:
    if meta["words"]:
        if isinstance(value, str):
            if value not in meta["words"]:
                raise RecipeError(f"{where} = {value!r}: expected a number or {', '.join(map(repr, meta['words']))}")
            return value
        tp = next(a for a in get_args(tp) if a is not str)
    optional = type(None) in get_args(tp)
    if optional:
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_type = get_args(tp)[0]
        value = [_check_scalar(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        if meta["nonempty"] and not value:
            raise RecipeError(f"{where}: must not be empty")
        items = value
    else:
        value = _check_scalar(value, tp, where)
        items = [value]
    for item in items:
        if meta["choices"] is not None and item not in meta["choices"]:
            raise RecipeError(f"{where} = {item!r} is not one of {', '.join(map(repr, meta['choices']))}")
        low, high = meta["low"], meta["high"]
        if (low is not None and item < low) or (high is not None and item > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise RecipeError(f"{where} = {item!r} is out of range {bounds}")
        if isinstance(item, str) and meta["nonempty"] and not item.strip():
            raise RecipeError(f"{where}: must not be an empty string")
        problem = meta["path"] and path_problem(item)
        if problem:
            raise RecipeError(f"{where} = {_shown(item)} is not a usable path ({problem})")
    return value


def _build_section(name: str, cls: type, raw: Any, where: str, family: str | None) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a table [{name}]")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key in known:
            continue
        problem = _foreign_key_problem(name, key, raw[key], family)
        if problem is None:
            raise RecipeError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        if problem:
            raise RecipeError(f"{where}.{key} {problem}")
    raw = {k: v for k, v in raw.items() if k in known}
    values = {}
    for key, f in known.items():
        if key in raw:
            values[key] = _check_value(raw[key], hints[key], dict(f.metadata), f"{where}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required key {key!r}")
    return cls(**values)


def _parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value``; the value is read as TOML, or taken as a bare string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise RecipeError(f"--set {text!r}: expected section.key=value")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return section, key, value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: invalid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    overridden = set()  # (section, key) set by --set
    for text in overrides:
        section, key, value = _parse_override(text)
        if section not in SECTIONS:
            raise RecipeError(f"--set {text!r}: unknown section [{section}]")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: [{section}] is not a table")
        table[key] = value
        overridden.add((section, key))
    for section in raw:
        if section not in SECTIONS:
            raise RecipeError(f"{path.name}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
    if "model" not in raw:
        raise RecipeError(f"{path.name}: missing section [model]")
    family = _family(raw["model"], path.name)
    sections = {name: _build_section(name, cls, raw.get(name, {}), f"{path.name}: [{name}]", family)
                for name, cls in family_sections(family).items()}
    model = sections["model"]
    if (model.preset is None) == (model.path is None):
        raise RecipeError(f"{path.name}: [model] needs exactly one of 'preset' or 'path'")
    recipe = Recipe(source=path, **sections)
    problem = file_name_problem(recipe.name)
    if problem:
        raise RecipeError(f"{path.name}: [output].name = {_shown(recipe.name)} is not a usable folder name "
                          f"({problem})")
    problem = path_problem(str(recipe.artifact_dir))
    if problem:
        raise RecipeError(f"{path.name}: [output].dir/name = {_shown(str(recipe.artifact_dir))} is not a usable "
                          f"path ({problem})")
    _check_model_family(recipe)
    recipe = _with_latent_sizes(recipe, raw["model"])
    recipe = _with_family_action(recipe, set(raw.get("pruning", {})))
    recipe, given = _with_backend_switch(recipe, set(raw.get("engine", {})),
                                         {key for section, key in overridden if section == "engine"})
    _check_engine(recipe)
    _check_backend_keys(recipe, given)
    _check_allowed_roots(recipe)
    return recipe


NAME_MAX_BYTES = 255  # the longest file name Linux, macOS and Windows file systems take
PATH_MAX_BYTES = 4095  # the longest path Linux takes (PATH_MAX less the terminating NUL)


def _shown(text: str, limit: int = 80) -> str:
    """repr of a value for an error line, shortened: a 5000-byte path would bury the message."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file on this system, or None (whether it exists is checked later)."""
    if "\0" in path:
        return "it contains a NUL byte"
    for part in Path(path).parts:
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > NAME_MAX_BYTES:
            return f"the component {_shown(part, 20)} is {size} bytes in UTF-8, more than {NAME_MAX_BYTES}"
    size = len(os.fsencode(Path(path).absolute()))
    if size > PATH_MAX_BYTES:
        return f"{size} bytes once made absolute, more than {PATH_MAX_BYTES}"
    return None


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder's name on every common file system, or None."""
    if name in ("", ".", ".."):
        return "empty, '.' or '..'"
    if "\0" in name:
        return "it contains a NUL byte"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "it contains a control character"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX_BYTES:
        return f"{size} bytes in UTF-8, more than {NAME_MAX_BYTES}"
    return None


def _check_allowed_roots(recipe: Recipe) -> None:
    """Under F3EXPORT_ALLOWED_ROOTS (a shared build server), the model folder, the input files and the
    final artifact folder (``dir/name``, symlinks resolved) must lie inside the allowed roots. Each file
    read from the model folder is checked again when the build lists them (a symlink inside may point out)."""
    where = recipe.source.name
    if recipe.model.path is not None:
        confine(recipe.model.path, f"{where}: [model].path")
    for name in SECTIONS:
        for key, value in recipe.input_files(name).items():
            confine(value, f"{where}: [{name}].{key}")
    confine(recipe.artifact_dir, f"{where}: [output].dir/name")


def _check_backend_keys(recipe: Recipe, given: set[str]) -> None:
    """A key the recipe sets (in the file or by --set) that no selected backend reads would be dropped
    silently (fp16 asked for, fp32 built): refuse it instead."""
    selected = recipe.engine.selected
    for f in dataclasses.fields(EngineSection):
        if f.name in given and _unread(f, selected):
            raise RecipeError(f"{recipe.source.name}: [engine].{f.name} = {getattr(recipe.engine, f.name)!r} is read "
                              f"only by {', '.join(map(repr, f.metadata['read_by']))}, which the recipe does not "
                              f"select (it selects {', '.join(map(repr, selected))})")


SELECTION = ("backend", "backends")  # the [engine] keys that select backends


def _with_backend_switch(recipe: Recipe, given: set[str], from_command_line: set[str]) -> tuple[Recipe, set[str]]:
    """The recipe with its backends switched in one step by ``--set engine.backend=...`` (or ``backends``), and the
    [engine] keys still set (``given``).

    A backend chosen on the command line replaces the file's choice (its other selection key too), and the file's
    keys that only backends no longer selected read are ignored (back to their defaults), each with a note on
    stderr. Refusing them, as a file that contradicts itself is refused (``_check_backend_keys``), would turn
    trying another backend into a chain of key errors, one per key of the old one, each hiding the question that
    matters first (does the new backend run here?); and editing the file for a one-off switch is what ``--set``
    spares. A key of an unselected backend that the command line itself sets is still refused: that is a
    contradiction within one command, not a switch."""
    switch = set(SELECTION) & from_command_line
    if not switch:
        return recipe, given
    fields = {f.name: f for f in dataclasses.fields(EngineSection)}
    replaced = {key for key in SELECTION if key in given and key not in switch}  # the file's own choice
    engine = dataclasses.replace(recipe.engine, **{key: _default(fields[key]) for key in replaced})
    unread = {key for key in given - from_command_line - replaced if _unread(fields[key], engine.selected)}
    for key in sorted(replaced | unread):
        reason = ("the command line chooses the backends" if key in replaced else
                  f"read only by {', '.join(map(repr, fields[key].metadata['read_by']))}; "
                  f"--set engine.{'/'.join(sorted(switch))} selects {', '.join(map(repr, engine.selected))}")
        console.print(f"[bold yellow]note:[/] {escape(recipe.source.name)}: {escape(f'[engine].{key}')} = "
                      f"{escape(repr(getattr(recipe.engine, key)))} is ignored ({reason})", highlight=False)
    engine = dataclasses.replace(engine, **{key: _default(fields[key]) for key in unread})
    return dataclasses.replace(recipe, engine=engine), given - replaced - unread


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _unread(f: dataclasses.Field, selected: list[str]) -> bool:
    """Whether the [engine] key ``f`` is read by none of the ``selected`` backends."""
    read_by = f.metadata["read_by"]
    return read_by is not None and not set(read_by) & set(selected)


def _check_engine(recipe: Recipe) -> None:
    where = f"{recipe.source.name}: [engine]"
    engine = recipe.engine
    if engine.backend is not None and engine.backends:
        raise RecipeError(f"{where}: give 'backend' or 'backends', not both")
    for axis in DYNAMIC_AXES:
        values = getattr(engine, f"profile_{axis}")
        if not values:
            continue
        if len(values) != 3 or not values[0] <= values[1] <= values[2]:
            raise RecipeError(f"{where}.profile_{axis} = {values}: expected [min, opt, max] with min <= opt <= max")
        # Every backend is validated over these ranges (TensorRT also builds its profile from them).
        if axis not in recipe.export.dynamic_axes:
            raise RecipeError(f"{where}.profile_{axis} = {values}: {axis!r} is not in [export].dynamic_axes, "
                              "so the engine has no range of it")
        if not values[0] <= recipe.export_shape[axis] <= values[2]:
            raise RecipeError(f"{where}.profile_{axis} = {values} does not contain the export shape's "
                              f"{axis} = {recipe.export_shape[axis]}")


PIXEL_SIZES = {"num_frames": "frames", "height": "latent_height", "width": "latent_width"}  # -> latent keys


def _with_latent_sizes(recipe: Recipe, given: dict[str, Any]) -> Recipe:
    """The recipe with [model] num_frames / height / width (video frames, pixels) turned into latent sizes through
    the folder's VAE, as the family's pipeline does; refused where they do not divide, where the latent key is
    given too, or where there is no VAE to say how."""
    from .models import get_adapter
    from .models.loading import PipelineFolder

    pixels = {key: getattr(recipe.model, key) for key in PIXEL_SIZES if getattr(recipe.model, key) is not None}
    if not pixels:
        return recipe
    where = f"{recipe.source.name}: [model]"
    both = [f"{key} and {PIXEL_SIZES[key]}" for key in pixels if PIXEL_SIZES[key] in given]
    if both:
        raise RecipeError(f"{where}: {both[0]} both set; give the size once")
    checkpoint = get_adapter(recipe.model.family, recipe.model.adapter_options).checkpoint
    factors = checkpoint.parts.vae_factors(Path(recipe.model.path), checkpoint.owner) \
        if recipe.model.path is not None and isinstance(checkpoint, PipelineFolder) else None
    if factors is None:
        raise RecipeError(f"{where}.{next(iter(pixels))}: sizes in pixels need a model folder with a vae/ to map "
                          f"them to latents; give {', '.join(PIXEL_SIZES[k] for k in pixels)} instead")
    temporal, spatial = factors
    latent = {}
    for key, value in pixels.items():
        step, offset = (temporal, 1) if key == "num_frames" else (spatial, 0)
        if (value - offset) % step:
            unit = f"1 + a multiple of {step}" if offset else f"a multiple of {step}"
            raise RecipeError(f"{where}.{key} = {value}: the VAE takes {unit} (its compression is {step}x)")
        latent[PIXEL_SIZES[key]] = (value - offset) // step + offset
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **latent))


def _with_family_action(recipe: Recipe, given: set[str]) -> Recipe:
    """The recipe with [pruning].action resolved to the family's default, or refused where its heads cannot
    (or where ``window`` is set for an action that does not read it)."""
    from .models import get_adapter
    from .schedule import FULL

    actions = get_adapter(recipe.model.family, recipe.model.adapter_options).structure.actions
    action = recipe.pruning.action
    if action is None:
        recipe = dataclasses.replace(recipe, pruning=dataclasses.replace(recipe.pruning, action=actions[0]))
    elif action not in actions:
        raise RecipeError(f"{recipe.source.name}: [pruning].action = {action!r}: the heads of a "
                          f"{recipe.model.family} model can only be {' or '.join(map(repr, actions))}")
    stretch = recipe.pruning.pruned_steps
    if len(stretch) != 2 or not stretch[0] < stretch[1]:
        raise RecipeError(f"{recipe.source.name}: [pruning].pruned_steps = {stretch}: expected [start, stop] with "
                          "0 <= start < stop <= 1 (fractions of the denoising trajectory)")
    late = [start for start in recipe.pruning.search_steps if not start < stretch[1]]
    if late:
        raise RecipeError(f"{recipe.source.name}: [pruning].search_steps = {recipe.pruning.search_steps}: a start "
                          f"{late[0]} is not before the stop {stretch[1]} of [pruning].pruned_steps")
    for key in ("search_steps", "search_windows"):
        if getattr(recipe.pruning, key) and recipe.pruning.ratio != AUTO_RATIO:
            raise RecipeError(f"{recipe.source.name}: [pruning].{key} is searched by ratio = 'auto' only")
    if recipe.pruning.search_windows and recipe.pruning.action != "temporal-window":
        raise RecipeError(f"{recipe.source.name}: [pruning].search_windows is read only by action = "
                          f"'temporal-window' (the recipe's action is {recipe.pruning.action!r})")
    adapter = get_adapter(recipe.model.family, recipe.model.adapter_options)
    if (tuple(stretch) != FULL or recipe.pruning.search_steps) and not callable(getattr(adapter, "scheduler",
                                                                                             None)):
        raise RecipeError(f"{recipe.source.name}: [pruning].pruned_steps: a {recipe.model.family} model has no "
                          "denoising trajectory to schedule")
    if "window" in given and recipe.pruning.action != "temporal-window":
        raise RecipeError(f"{recipe.source.name}: [pruning].window is read only by action = 'temporal-window' "
                          f"(the recipe's action is {recipe.pruning.action!r})")
    return recipe


def _check_model_family(recipe: Recipe) -> None:
    from .models import FAMILIES, get_adapter

    where = f"{recipe.source.name}: [model]"
    model = recipe.model
    FAMILIES[model.family].check_options(model.adapter_options, where)
    presets = get_adapter(model.family, model.adapter_options).checkpoint.presets
    if model.preset is not None and model.preset not in presets:
        known = ", ".join(map(repr, presets)) or "none (give 'path')"
        raise RecipeError(f"{where}.preset = {model.preset!r} is not one of {known}")
    if model.path is not None and not Path(model.path).is_dir():
        raise RecipeError(f"{where}.path = {model.path!r}: folder not found")
    for name in SECTIONS:
        for key, value in recipe.input_files(name).items():
            if not Path(value).is_file():
                raise RecipeError(f"{recipe.source.name}: [{name}].{key} = {value!r}: file not found")
    for name in ("calibration", "validation"):
        FAMILIES[model.family].protocol.check_section(getattr(recipe, name), f"{recipe.source.name}: [{name}]",
                                                      model.frames)

