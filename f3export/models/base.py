"""The adapter interface every model family implements, and the shared diffusion-video adapter.

The core (calibrate, prune, export, validate) sees a family only through
``ModelAdapter``: how to build and load the network, where its temporal
attention modules are, what its inputs look like, and how one denoising
trajectory runs. Families that share a call signature share the code below.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from diffusers import DDIMScheduler
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import __version__
from ..artifacts import content_key, sha256_file
from ..errors import CheckpointError, RecipeError
from ..recipe import RecipeKey, family_key
from ..weights import read_json
from .attention import AttentionHeads, DiffusersAttentionHeads
from .protocols import DiffusionProtocol, EvaluationProtocol, Run, Trajectory


@dataclass(frozen=True)
class TemporalSite:
    """A temporal attention module: the unit F3-Pruning ranks and prunes heads of.

    ``attention`` is the module path; ``access`` how its heads are read and cut
    (a diffusers ``Attention`` unless the family says otherwise). ``norm`` is
    the path of the norm feeding it, whose input is the residual stream; it is
    removed together with the attention when all heads go, unless
    ``shared_norm`` says other modules read it too.
    """

    attention: str
    norm: str | None = None
    shared_norm: bool = False
    access: type[AttentionHeads] = DiffusersAttentionHeads

    def heads_of(self, model: nn.Module) -> AttentionHeads:
        heads = self.access(model.get_submodule(self.attention))
        problem = heads.unsupported()
        if problem is not None:
            raise CheckpointError(f"{self.attention}: {problem}")
        return heads

    @property
    def own_norm(self) -> str | None:
        """The norm that belongs to this attention alone (goes with it), if any."""
        return None if self.shared_norm else self.norm


@dataclass(frozen=True)
class VideoShape:
    frames: int
    latent_height: int
    latent_width: int

    @classmethod
    def of_axes(cls, axes: dict[str, int]) -> "VideoShape":
        """From sizes by the recipe's axis names (``frames``, ``height``, ``width``)."""
        return cls(axes["frames"], axes["height"], axes["width"])


@dataclass
class ModelBundle:
    """A loaded model and what is needed to drive it."""

    family: str
    model: nn.Module
    config: dict[str, Any]
    description: str
    random_weights: bool
    encode_text: Callable[[list[str]], torch.Tensor] | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportSpec:
    """Named example inputs, output names and dynamic axes of the ONNX graph."""

    inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


@dataclass(frozen=True)
class ExportIO:
    """A family's graph signature, declared: every input and output by name (in order) with the recipe's axis
    name of each dimension that may vary (``{"sample": {0: "batch", 2: "frames", ...}}``)."""

    inputs: dict[str, dict[int, str]]
    outputs: dict[str, dict[int, str]]

    def spec(self, inputs: dict[str, torch.Tensor], dynamic: list[str]) -> ExportSpec:
        """The export of these example inputs with the axes of ``dynamic`` left dynamic."""
        axes = {name: {i: axis for i, axis in named.items() if axis in dynamic}
                for name, named in {**self.inputs, **self.outputs}.items()}
        return ExportSpec(inputs, list(self.outputs), {name: named for name, named in axes.items() if named})


@dataclass(frozen=True)
class FidelityGate:
    """A pruning-fidelity metric of the family, gated as ``min over runs >= [validation].<limit>``."""

    metric: str
    limit: RecipeKey

    @property
    def recipe_key(self) -> str:
        return self.limit.name


def fidelity_gate(metric: str, recipe_key: str, default: float, **checks: Any) -> FidelityGate:
    return FidelityGate(metric, family_key("validation", recipe_key, float, default, **checks))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def psnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB, the peak being the reference's value range."""
    mse = torch.mean((actual.double() - reference.double()) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


class ModelAdapter(ABC):
    """A family, composed of: loading (presets, ``load_folder``, ``weights_files``), structure
    (``temporal_sites``), export I/O (``io`` and ``example_inputs``) and its evaluation ``protocol``, plus the
    recipe keys only it reads (``option_keys``, the protocol's, its gates' limits)."""

    family: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]
    io: ClassVar[ExportIO]
    protocol: ClassVar[EvaluationProtocol]
    fixed_axes: ClassVar[tuple[str, ...]] = ()  # input axes the exported graph cannot leave dynamic
    option_keys: ClassVar[tuple[RecipeKey, ...]] = ()  # [model] keys: the constructor's arguments
    fidelity_gates: ClassVar[tuple[FidelityGate, ...]] = ()
    calibration_note: ClassVar[str | None] = None  # what the statistics cover when not every token (scores.json)

    @classmethod
    def recipe_keys(cls) -> tuple[RecipeKey, ...]:
        """Every recipe key this family declares, besides those of every family."""
        return (*cls.option_keys, *cls.protocol.recipe_keys, *(gate.limit for gate in cls.fidelity_gates))

    @classmethod
    def check_options(cls, options: dict[str, Any], where: str) -> None:
        """Refuse (RecipeError naming the key; ``where`` is the recipe's "<file>: [model]") options that cannot
        describe a model, before anything is loaded."""

    @abstractmethod
    def fidelity(self, reference: Trajectory, candidate: Trajectory) -> dict[str, float | list[float]]:
        """Pruning-fidelity metrics of one run, pruned (candidate) against original (reference)."""

    def shape_error(self, model: nn.Module, shape: VideoShape) -> str | None:
        """Why this model cannot run clips of ``shape``, or None (``model`` may be a ``skeleton``)."""
        return None

    @abstractmethod
    def conventions(self, bundle: ModelBundle) -> dict[str, Any]:
        """How a runtime must drive the exported graph beyond its names and shapes (JSON, for the contract)."""

    def conventions_files(self, folder: Path) -> list[Path]:
        """The files of a checkpoint folder ``conventions`` reads besides the network's (the export keys on them)."""
        return []

    @abstractmethod
    def folder_config(self, folder: Path) -> dict[str, Any]:
        """The network config of a checkpoint folder, read without its weights."""

    def skeleton(self, preset: str | None, path: str | None) -> nn.Module:
        """The network of a preset or a folder on the meta device: its sizes and limits, no weights allocated."""
        config = self.presets[preset] if preset is not None else self.folder_config(Path(path))
        with torch.device("meta"):
            return self.build(config)

    def fitting_skeleton(self, preset: str | None, path: str | None) -> nn.Module:
        """``skeleton``, refused (one line, nothing allocated) when its weights alone exceed the memory available."""
        skeleton = self.skeleton(preset, path)
        needed, available = weight_bytes(skeleton), available_memory_bytes()
        if available is not None and needed > available:
            subject, error = (f"[model].preset = {preset!r}: its weights", RecipeError) if preset is not None else \
                (f"{path}: the weights its config describes", CheckpointError)
            raise error(f"{subject} alone need {_size(needed)}, more than the {_size(available)} of memory "
                        "available on this machine")
        return skeleton

    def options_error(self, model: nn.Module) -> str | None:
        """Why this adapter's options (recipe [model] keys describing the network) do not fit ``model``, or None."""
        return None

    def forward_memory(self, model: nn.Module, shape: VideoShape, batch: int) -> "ForwardMemory":
        """What one forward of ``model`` (a skeleton) at this shape needs at least, sized on the meta device.

        Where the forward cannot run on meta tensors (an op without a meta kernel, a value read back), the
        part that ran and the input latents stand for the activations: a weaker bound rather than a crash.
        """
        tensors = [*model.parameters(), *model.buffers()]
        sizes = _ActivationSizes({t.untyped_storage()._cdata for t in tensors})
        floor = 4 * batch * shape.frames * shape.latent_height * shape.latent_width  # a float32 per latent position
        try:
            inputs = self._meta_inputs(model, shape, batch, floor)
            with torch.no_grad(), sizes:
                model.eval()(*inputs.values())
            floor = 0
        except Exception:  # sizing is advice: whatever a meta forward raises, the bounds fall back
            pass
        return ForwardMemory(weight_bytes(model), max(sizes.largest, floor), max(sizes.working_set, floor))

    def _meta_inputs(self, model: nn.Module, shape: VideoShape, batch: int, size: int) -> dict[str, torch.Tensor]:
        """The export inputs at this shape as meta tensors. Where making them reads a value back (a random
        length, say), they are made on the CPU and moved, if they are small (``size``: a bound of their bytes)."""
        try:
            with torch.device("meta"):
                return self.example_inputs(model, shape, batch, seed=0)
        except RuntimeError:
            if size > 2**28:
                raise
            return {name: t.to("meta") for name, t in self.example_inputs(model, shape, batch, seed=0).items()}

    def memory_error(self, model: nn.Module, shape: VideoShape, batch: int) -> str | None:
        """Why one forward at this shape cannot fit in the memory available, or None."""
        memory, available = self.forward_memory(model, shape, batch), available_memory_bytes()
        if available is None or memory.needed <= available:
            return None
        return (f"needs at least {_size(memory.needed)} for one forward (largest activation "
                f"{_size(memory.largest_activation)}), more than the {_size(available)} available")

    @abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """The network of a config, with freshly initialised weights."""

    @abstractmethod
    def load_folder(self, folder: Path) -> ModelBundle:
        """A model from a local checkpoint folder in the family's on-disk format."""

    @abstractmethod
    def weights_files(self, folder: Path) -> list[Path]:
        """The network's files in a checkpoint folder (config and weights): every stage that loads it reads them."""

    def sampling_files(self, folder: Path) -> list[Path]:
        """The other files of a checkpoint folder that ``trajectory`` reads (scheduler, tokenizer, text encoder).

        They change calibration and validation but not the network, so only those stages key on them.
        """
        return []

    @abstractmethod
    def temporal_sites(self, model: nn.Module) -> list[TemporalSite]:
        """The temporal attention modules, in a stable order."""

    @abstractmethod
    def example_inputs(self, model: nn.Module, shape: VideoShape, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """Inputs of one forward pass, seeded, by the names of ``io``."""

    def export_spec(self, model: nn.Module, shape: VideoShape, batch: int, dynamic: list[str],
                    seed: int = 0) -> ExportSpec:
        """Inputs of one forward pass (seeded), their names and the recipe's dynamic axes."""
        return self.io.spec(self.example_inputs(model, shape, batch, seed), dynamic)

    @abstractmethod
    def trajectory(self, bundle: ModelBundle, model: nn.Module, run: Run, shape: VideoShape,
                   on_step: Callable[[int], None] | None = None) -> Trajectory:
        """One run of the family's ``protocol`` (its sampling loop, or a forward pass)."""

    def options(self) -> dict[str, Any]:
        """Constructor arguments of this adapter, saved with a pruned model to rebuild it."""
        return {}

    def load_preset(self, name: str, seed: int) -> ModelBundle:
        config = self.presets[name]
        self.fitting_skeleton(name, None)  # what the weights will take, before allocating them
        torch.manual_seed(seed)
        model = self.build(config).eval()
        with torch.no_grad():
            # Norms initialise to ones/zeros; perturb them as training would, so that no two tensors are
            # identical (the ONNX exporter merges identical initializers, which would blur parameter counts).
            for module in model.modules():
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                    module.weight.add_(0.1 * torch.randn_like(module.weight))
                    module.bias.add_(0.1 * torch.randn_like(module.bias))
        return ModelBundle(self.family, model, config, f"preset '{name}' (seeded random weights, seed {seed})",
                           random_weights=True)

    def weights_digest(self, preset: str | None, path: str | None, seed: int) -> str:
        """Identity of the weights, for the build cache, without building the model."""
        if preset is not None:
            # A preset's weights are made by code: the family's modules are part of their identity.
            return content_key(self.family, preset, self.presets[preset], seed, __version__, torch.__version__,
                               family_sources(type(self)))
        return self._files_digest(self.weights_files(Path(path)))

    def sampling_digest(self, path: str | None) -> str:
        """Identity of the sampling files, for the build cache (a preset has none: its sampling is code)."""
        return self._files_digest(self.sampling_files(Path(path)) if path is not None else [])

    def conventions_digest(self, path: str | None) -> str:
        """Identity of the files ``conventions`` reads, for the build cache (a preset's conventions are code)."""
        return self._files_digest(self.conventions_files(Path(path)) if path is not None else [])

    def _files_digest(self, files: list[Path]) -> str:
        return content_key(self.family, [(f.name, sha256_file(f)) for f in files])


def family_sources(adapter: type[ModelAdapter]) -> list[str]:
    """The code of a family: the f3export modules its adapter class derives from and, for a family that is a
    package (network, checkpoint, adapter), every module of that package, so that a network change counts."""
    files: dict[Path, None] = {}
    for cls in adapter.__mro__:
        module = sys.modules[cls.__module__]
        if not cls.__module__.startswith("f3export."):
            continue
        path = Path(inspect.getfile(module))
        in_package = module.__package__ not in (None, "", __package__)
        files.update(dict.fromkeys(sorted(path.parent.glob("*.py")) if in_package else [path]))
    return [path.read_text() for path in files]


def _size(n: int) -> str:
    for unit, power in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30)):
        if n >= 2**power:
            return f"{n / 2**power:.1f} {unit}"
    return f"{n / 2**20:.0f} MiB"


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclass(frozen=True)
class ForwardMemory:
    """A lower bound of one forward's memory: the weights, plus the activations its most demanding op
    holds at once (its inputs and outputs); ``largest_activation`` is the largest single tensor made."""

    weights: int
    largest_activation: int
    working_set: int

    @property
    def needed(self) -> int:
        return self.weights + self.working_set


def _storages(tree: Any) -> dict[int, int]:
    """Storage identity -> bytes of every tensor in a pytree (a view shares its base's storage)."""
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


class _ActivationSizes(TorchDispatchMode):
    """Op by op (on meta tensors: shapes only), the largest new tensor and the largest set of activations one
    op holds at once. Weights are left out (counted once, apart); views and in-place results are not new."""

    def __init__(self, weights: set[int]):
        super().__init__()
        self.weights = weights
        self.largest = self.working_set = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, outputs = _storages((args, kwargs)), _storages(out)
        held = {k: n for k, n in {**inputs, **outputs}.items() if k not in self.weights}
        self.working_set = max(self.working_set, sum(held.values()))
        self.largest = max([self.largest] + [n for k, n in held.items() if k not in inputs])
        return out


def unmatched_pattern(key: str, patterns: list[str], names: list[str], what: str) -> str | None:
    """The first glob of a recipe's pattern key that matches none of ``names``, as an error showing a real name."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            example = f"e.g. {names[0]!r}" if names else f"the model has no {what}"
            return f"{key}: pattern {pattern!r} matches no {what} ({example})"
    return None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def seeded_text_embedding(prompt: str, tokens: int, width: int) -> torch.Tensor:
    """A deterministic stand-in for a text encoder's output when none is given."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return torch.randn((1, tokens, width), generator=torch.Generator().manual_seed(seed))


LATENT_AXES = {0: "batch", 2: "frames", 3: "height", 4: "width"}  # of latents [B, C, F, H, W]


class LatentVideoDiffusionAdapter(ModelAdapter):
    """Families whose network is ``noise_pred = unet(sample, timestep, encoder_hidden_states)``
    over latents ``[B, C, F, H, W]``, sampled with DDIM and classifier-free guidance."""

    latent_channels: ClassVar[int] = 4
    text_tokens: ClassVar[int] = 77
    protocol = DiffusionProtocol()
    io = ExportIO(inputs={"sample": LATENT_AXES, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"}},
                  outputs={"noise_pred": LATENT_AXES})
    fidelity_gates = (fidelity_gate("step_cosine", "pruning_min_step_cosine", 0.9, low=-1.0, high=1.0),
                      fidelity_gate("latent_psnr", "pruning_min_latent_psnr", 20.0))
    default_scheduler: ClassVar[dict[str, Any]] = {
        # Stable Diffusion 1.x training schedule, as in Tune-A-Video's scheduler/ folder.
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    }

    @abstractmethod
    def text_width(self, model: nn.Module) -> int:
        """Width of the text conditioning the network cross-attends to."""

    def example_inputs(self, model, shape, batch, seed):
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn((batch, self.latent_channels, shape.frames, shape.latent_height, shape.latent_width),
                             generator=generator)
        timestep = torch.randint(1, 1000, (1,), generator=generator).float().expand(batch).contiguous()
        context = torch.randn((batch, self.text_tokens, self.text_width(model)), generator=generator)
        return {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}

    def encode_prompts(self, bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
        if bundle.encode_text is not None:
            return bundle.encode_text(prompts)
        width = self.text_width(bundle.model)
        return torch.cat([seeded_text_embedding(p, self.text_tokens, width) for p in prompts])

    def scheduler(self, bundle: ModelBundle) -> DDIMScheduler:
        """The sampler of calibration and validation: DDIM with the folder's schedule (else SD 1.x's)."""
        return DDIMScheduler.from_config(bundle.scheduler_config or self.default_scheduler)

    def conventions(self, bundle):
        scheduler = self.scheduler(bundle)
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        channels = bundle.config.get("out_channels") or self.latent_channels
        return {
            "kind": "latent video diffusion: noise_pred = model(sample, timestep, encoder_hidden_states)",
            "sample": f"latents [batch, {self.latent_channels}, frames, height, width], scaled by the scheduler's "
                      "scale_model_input; the first step's latents are N(0, 1) x init_noise_sigma",
            "timestep": {"dtype": "float32", "shape": ["batch"], "range": [0, config["num_train_timesteps"] - 1],
                         "meaning": "the scheduler's integer timestep of this step, as float32, the same value "
                                    "for every batch row (both halves of the guidance batch)"},
            "encoder_hidden_states": f"text embeddings [batch, {self.text_tokens}, {self.text_width(bundle.model)}] "
                                     "of the prompt (the model folder's text encoder); the empty prompt's for the "
                                     "unconditional rows",
            "scheduler": {"class": type(scheduler).__name__, "config": config,
                          "note": "the scheduler the model was calibrated and validated with"},
            "guidance": {"batch_layout": ["unconditional", "conditional"],
                         "combine": "uncond, cond = noise[:B/2], noise[B/2:]; "
                                    "guided = uncond + guidance_scale * (cond - uncond)"},
            "output": {"name": "noise_pred", "channels": channels, "noise_channels": [0, self.latent_channels],
                       "meaning": f"noise_pred[:, :{self.latent_channels}] is the model output the scheduler "
                                  f"steps with (prediction_type = {config['prediction_type']!r})"
                                  + (f"; channels {self.latent_channels}..{channels - 1} are a learned variance "
                                     "the DDIM sampler does not use" if channels > self.latent_channels else "")},
        }

    def conventions_files(self, folder):
        return scheduler_files(folder)

    @torch.no_grad()
    def trajectory(self, bundle, model, run, shape, on_step=None):
        latent_shape = (1, self.latent_channels, shape.frames, shape.latent_height, shape.latent_width)
        context = self.encode_prompts(bundle, ["", run.prompt])
        return self.protocol.trajectory(model, run, self.scheduler(bundle), context, latent_shape, self.latent_channels,
                                        on_step)

    def fidelity(self, reference, candidate):
        return {"step_cosine": [cosine(c, r) for c, r in zip(candidate.noise_preds, reference.noise_preds)],
                "latent_psnr": psnr(candidate.latents, reference.latents)}

    def sampling_files(self, folder):
        return scheduler_files(folder) + clip_text_encoder_files(folder)


MODEL_SUFFIXES = (".json", ".safetensors", ".bin")  # configs and weights of a from_pretrained folder
TOKENIZER_SUFFIXES = (".json", ".txt")  # tokenizer configs and vocabularies (vocab.json, merges.txt, ...)


def component_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of a pipeline component folder with these suffixes, sorted; none if there is no folder.

    Which of them a loader opens varies with the library version (tokenizer.json or vocab.json, safetensors
    or bin), so all count; READMEs and the like do not.
    """
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)


def clip_text_encoder_files(folder: Path) -> list[Path]:
    """What ``load_clip_text_encoder`` reads: nothing without ``text_encoder/``, else the tokenizer and the encoder."""
    if not (folder / "text_encoder").is_dir():
        return []
    return component_files(folder / "tokenizer", TOKENIZER_SUFFIXES) + \
        component_files(folder / "text_encoder", MODEL_SUFFIXES)


def load_clip_text_encoder(folder: Path, tokens: int = 77) -> Callable[[list[str]], torch.Tensor] | None:
    """CLIP text encoder + tokenizer from ``text_encoder/`` and ``tokenizer/``, if the folder has them."""
    if not (folder / "text_encoder").is_dir():
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load the CLIP text encoder ({str(exc).splitlines()[0]})") from None

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokens, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids)[0]

    return encode


SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def scheduler_files(folder: Path) -> list[Path]:
    """What ``read_scheduler_config`` reads."""
    path = folder / SCHEDULER_CONFIG
    return [path] if path.is_file() else []


def read_scheduler_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / SCHEDULER_CONFIG) if scheduler_files(folder) else {}
