"""Recipes: one TOML file that says what to build, validated before anything runs.

Each section is a frozen dataclass; the field metadata carries the checks, so
the schema, defaults and error messages live in one place. Errors name the
file and the key (``tav.toml: [pruning].ratio = 1.5 is out of range [0, 1]``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import RecipeError
from .roots import confine

DYNAMIC_AXES = ("batch", "frames", "height", "width")
CUSTOM_MODEL_KEYS = ("class_name", "temporal_modules", "text_per_frame")  # [model] keys of family "diffusers"


def spec(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
         choices: tuple | None = None, nonempty: bool = False, path: bool = False,
         read_by: tuple[str, ...] | None = None, doc: str = "") -> Any:
    """A recipe key: its default and the checks a value must pass.

    ``path``: a file system path; ``read_by``: the engine backends that read the key (None: all of them).
    """
    meta = {"low": low, "high": high, "choices": choices, "nonempty": nonempty, "path": path, "read_by": read_by,
            "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSection:
    family: str = spec(doc="model family, e.g. 'tune-a-video'")
    preset: str | None = spec(None, doc="built-in config with seeded random weights")
    path: str | None = spec(None, path=True, doc="local model folder (diffusers layout)")
    seed: int = spec(0, low=0, doc="seed of a preset's random weights")
    frames: int = spec(8, low=1, high=1024)
    latent_height: int = spec(32, low=8, high=512)
    latent_width: int = spec(32, low=8, high=512)
    # family = "diffusers" only: a model f3export has no adapter for, described here.
    class_name: str | None = spec(None, doc="diffusers model class, e.g. 'UNet3DConditionModel'")
    temporal_modules: list[str] = spec([], doc="glob patterns naming its temporal Attention modules")
    text_per_frame: bool = spec(False, doc="the model takes one text embedding per frame")

    @property
    def adapter_options(self) -> dict:
        return {key: getattr(self, key) for key in CUSTOM_MODEL_KEYS} if self.family == "diffusers" else {}


TOKENS_DOC = ".npy file of int token sequences [runs, sequence] in the model's layout (token models)"


@dataclass(frozen=True)
class CalibrationSection:
    prompts: list[str] = spec(["a man is surfing"], nonempty=True)
    seeds: list[int] = spec([0], nonempty=True)
    steps: int = spec(10, low=1, high=1000)
    guidance_scale: float = spec(7.5, low=0.0)
    tokens: str | None = spec(None, path=True, doc=TOKENS_DOC + "; replaces prompts x seeds")


@dataclass(frozen=True)
class PruningSection:
    criterion: str = spec("contribution", choices=("contribution", "mixing", "magnitude"))
    scope: str = spec("global", choices=("global", "module"))
    ratio: float = spec(0.5, low=0.0, high=1.0, doc="fraction of temporal heads removed")
    min_heads_per_module: int = spec(0, low=0)
    keep: list[str] = spec([], doc="module names (glob patterns) never pruned")


@dataclass(frozen=True)
class ExportSection:
    opset: int = spec(17, low=17, high=23)
    batch: int = spec(2, low=1, doc="batch the graph is traced at (2 = classifier-free guidance)")
    dynamic_axes: list[str] = spec(list(DYNAMIC_AXES), choices=DYNAMIC_AXES)
    external_data: str = spec("auto", choices=("auto", "always", "never"))


BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class EngineSection:
    backend: str | None = spec(None, choices=BACKENDS, doc="one engine backend")
    backends: list[str] = spec([], choices=BACKENDS, doc="several engine backends")
    device: str = spec("cpu", choices=("cpu", "cuda", "auto"), read_by=("onnxruntime",))
    optimization_level: str = spec("extended", choices=("disabled", "basic", "extended", "all"),
                                   read_by=("onnxruntime",))
    precision: str = spec("fp16", choices=("fp32", "fp16", "bf16"), read_by=("tensorrt",))
    builder_optimization_level: int = spec(3, low=0, high=5, read_by=("tensorrt",))
    fp32_norms: bool = spec(True, read_by=("tensorrt",),
                            doc="keep normalisation, softmax and reductions in fp32 (fp16/bf16 overflow)")
    # Every backend's validated range (TensorRT: also its optimization profile).
    profile_batch: list[int] = spec([], low=1, doc="[min, opt, max]; default: the export shape, static")
    profile_frames: list[int] = spec([], low=1)
    profile_height: list[int] = spec([], low=1, doc="latent height")
    profile_width: list[int] = spec([], low=1, doc="latent width")

    @property
    def selected(self) -> list[str]:
        return list(self.backends) or [self.backend or "onnxruntime"]


@dataclass(frozen=True)
class ValidationSection:
    prompts: list[str] = spec(["a dog running on the beach"], nonempty=True)
    seeds: list[int] = spec([1000], nonempty=True)
    steps: int = spec(10, low=1, high=1000)
    guidance_scale: float = spec(7.5, low=0.0)
    tokens: str | None = spec(None, path=True, doc=TOKENS_DOC + "; held out from calibration")
    export_samples: int = spec(2, low=1, high=64, doc="fresh random inputs for export fidelity")
    export_max_rel_l2: float = spec(1e-4, low=0.0, doc="fp32 engines")
    export_min_cosine: float = spec(0.9999, low=-1.0, high=1.0)
    export_fp16_max_rel_l2: float = spec(2e-2, low=0.0, doc="fp16 / bf16 engines")
    export_fp16_min_cosine: float = spec(0.999, low=-1.0, high=1.0)
    pruning_min_step_cosine: float = spec(0.9, low=-1.0, high=1.0)
    pruning_min_latent_psnr: float = spec(20.0)
    pruning_min_logit_cosine: float = spec(0.9, low=-1.0, high=1.0, doc="token models: per frame")
    pruning_min_top1_agreement: float = spec(0.5, low=0.0, high=1.0, doc="token models: same argmax token")


@dataclass(frozen=True)
class OutputSection:
    name: str | None = spec(None, doc="artifact folder name; default: the recipe file's stem")
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

    @classmethod
    def from_dict(cls, source: Path, data: dict[str, Any]) -> "Recipe":
        """A recipe as stored in a manifest: read from an untrusted folder, so checked like a recipe file."""
        where = f"{source.name} (as stored in the manifest)"
        for name in data:
            if name not in SECTIONS:
                raise RecipeError(f"{where}: unknown section [{name}]")
        sections = {}
        for name, section in SECTIONS.items():
            raw = data.get(name)
            if not isinstance(raw, dict):
                raise RecipeError(f"{where}: [{name}] missing or not a table")
            stored = {k: v for k, v in raw.items() if v is not None}  # None is how an unset optional key is stored
            sections[name] = _build_section(section, stored, f"{where}: [{name}]")
        return cls(source=source, **sections)


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


def _build_section(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a table [{where.split('[')[-1]}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise RecipeError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        if name in raw:
            values[name] = _check_value(raw[name], hints[name], dict(f.metadata), f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required key {name!r}")
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
    for text in overrides:
        section, key, value = _parse_override(text)
        if section not in SECTIONS:
            raise RecipeError(f"--set {text!r}: unknown section [{section}]")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: [{section}] is not a table")
        table[key] = value
    for section in raw:
        if section not in SECTIONS:
            raise RecipeError(f"{path.name}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
    if "model" not in raw:
        raise RecipeError(f"{path.name}: missing section [model]")
    sections = {
        name: _build_section(cls, raw.get(name, {}), f"{path.name}: [{name}]") for name, cls in SECTIONS.items()
    }
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
    _check_engine(recipe)
    _check_backend_keys(recipe, set(raw.get("engine", {})))
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
    """Under F3EXPORT_ALLOWED_ROOTS (a shared build server), the model folder, the token files and the
    final artifact folder (``dir/name``, symlinks resolved) must lie inside the allowed roots. Each file
    read from the model folder is checked again when the build lists them (a symlink inside may point out)."""
    where = recipe.source.name
    if recipe.model.path is not None:
        confine(recipe.model.path, f"{where}: [model].path")
    for name in ("calibration", "validation"):
        tokens = getattr(recipe, name).tokens
        if tokens is not None:
            confine(tokens, f"{where}: [{name}].tokens")
    confine(recipe.artifact_dir, f"{where}: [output].dir/name")


def _check_backend_keys(recipe: Recipe, given: set[str]) -> None:
    """A key the recipe sets (in the file or by --set) that no selected backend reads would be dropped
    silently (fp16 asked for, fp32 built): refuse it instead."""
    selected = recipe.engine.selected
    for f in dataclasses.fields(EngineSection):
        read_by = f.metadata["read_by"]
        if f.name in given and read_by is not None and not set(read_by) & set(selected):
            raise RecipeError(f"{recipe.source.name}: [engine].{f.name} = {getattr(recipe.engine, f.name)!r} is read "
                              f"only by {', '.join(map(repr, read_by))}, which the recipe does not select (it selects "
                              f"{', '.join(map(repr, selected))})")


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


def _check_model_family(recipe: Recipe) -> None:
    from .models import FAMILIES
    from .models.diffusers_video import diffusers_class
    from .errors import CheckpointError

    where = f"{recipe.source.name}: [model]"
    model = recipe.model
    if model.family not in FAMILIES:
        raise RecipeError(f"{where}.family = {model.family!r} is not one of {', '.join(map(repr, FAMILIES))}")
    presets = FAMILIES[model.family].presets
    if model.preset is not None and model.preset not in presets:
        known = ", ".join(map(repr, presets)) or "none (give 'path')"
        raise RecipeError(f"{where}.preset = {model.preset!r} is not one of {known}")
    if model.path is not None and not Path(model.path).is_dir():
        raise RecipeError(f"{where}.path = {model.path!r}: folder not found")
    _check_family_keys(recipe, FAMILIES)
    if model.family == "diffusers":
        if model.class_name is None or not model.temporal_modules:
            raise RecipeError(f"{where}: family 'diffusers' needs 'class_name' and 'temporal_modules'")
        try:
            diffusers_class(model.class_name)
        except CheckpointError:
            raise RecipeError(f"{where}.class_name = {model.class_name!r} is not a diffusers model class") from None
    else:
        for key in CUSTOM_MODEL_KEYS:
            if getattr(model, key) not in (None, [], False):
                raise RecipeError(f"{where}.{key} applies only to family 'diffusers'")


def _family_keys(adapter: type) -> set[str]:
    return set(adapter.run_keys) | {gate.recipe_key for gate in adapter.fidelity_gates}


def _check_family_keys(recipe: Recipe, families: dict[str, type]) -> None:
    """[calibration]/[validation] keys that only some families read must not be set for the others."""
    own = _family_keys(families[recipe.model.family])
    others = set().union(*map(_family_keys, families.values())) - own
    for name in ("calibration", "validation"):
        section = getattr(recipe, name)
        for f in dataclasses.fields(section):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            if f.name in others and getattr(section, f.name) != default:
                raise RecipeError(f"{recipe.source.name}: [{name}].{f.name} does not apply to "
                                  f"{recipe.model.family} models")
        tokens = getattr(section, "tokens", None)
        if tokens is not None and not Path(tokens).is_file():
            raise RecipeError(f"{recipe.source.name}: [{name}].tokens = {tokens!r}: file not found")
