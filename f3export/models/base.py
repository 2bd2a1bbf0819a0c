"""The adapter interface every model family implements, and the shared diffusion-video adapter.

The core (calibrate, prune, export, validate) sees a family only through
``ModelAdapter``: how to build and load the network, where its temporal
attention modules are, what its inputs look like, and how one denoising
trajectory runs. Families that share a call signature share the code below.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from .. import __version__
from ..artifacts import content_key, sha256_file
from ..errors import CheckpointError, RecipeError
from ..weights import read_json
from .attention import AttentionHeads, DiffusersAttentionHeads


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
        return self.access(model.get_submodule(self.attention))

    @property
    def own_norm(self) -> str | None:
        """The norm that belongs to this attention alone (goes with it), if any."""
        return None if self.shared_norm else self.norm


@dataclass(frozen=True)
class VideoShape:
    frames: int
    latent_height: int
    latent_width: int


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


@dataclass
class Run:
    """One calibration or validation input: a prompt and a seed, or one row of a token file."""

    prompt: str
    seed: int
    tokens: np.ndarray | None = None


@dataclass
class Trajectory:
    """What one run produced: the network's output at every step and the run's result.

    For diffusion: the guided noise predictions and the final latents; for a
    token model: the logits of one full-sequence forward, and those logits again.
    """

    outputs: list[torch.Tensor]
    final: torch.Tensor
    timesteps: list[int]


@dataclass(frozen=True)
class FidelityGate:
    """A pruning-fidelity metric of the family, gated as ``min over runs >= [validation].<recipe_key>``."""

    metric: str
    recipe_key: str


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def psnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB, the peak being the reference's value range."""
    mse = torch.mean((actual.double() - reference.double()) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


class ModelAdapter(ABC):
    family: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]
    fixed_axes: ClassVar[tuple[str, ...]] = ()  # input axes the exported graph cannot leave dynamic
    run_keys: ClassVar[tuple[str, ...]] = ()  # [calibration]/[validation] keys its runs read besides prompts, seeds
    fidelity_gates: ClassVar[tuple[FidelityGate, ...]] = ()

    def runs(self, section: Any) -> list[Run]:
        """The inputs a [calibration] or [validation] section asks for: every prompt with every seed."""
        return [Run(prompt, seed) for prompt in section.prompts for seed in section.seeds]

    def run_steps(self, steps: int) -> int:
        """Network calls (on_step callbacks) in one run given the recipe's ``steps``."""
        return steps

    @abstractmethod
    def fidelity(self, reference: Trajectory, candidate: Trajectory) -> dict[str, float | list[float]]:
        """Pruning-fidelity metrics of one run, pruned (candidate) against original (reference)."""

    def shape_error(self, model: nn.Module, shape: VideoShape) -> str | None:
        """Why this model cannot run clips of ``shape``, or None."""
        return None

    @abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """The network of a config, with freshly initialised weights."""

    @abstractmethod
    def load_folder(self, folder: Path) -> ModelBundle:
        """A model from a local checkpoint folder in the family's on-disk format."""

    @abstractmethod
    def weights_files(self, folder: Path) -> list[Path]:
        """The files whose content defines a folder's model (hashed for the build cache)."""

    @abstractmethod
    def temporal_sites(self, model: nn.Module) -> list[TemporalSite]:
        """The temporal attention modules, in a stable order."""

    @abstractmethod
    def export_spec(self, model: nn.Module, shape: VideoShape, batch: int, dynamic: list[str],
                    seed: int = 0) -> ExportSpec:
        """Inputs of one forward pass (seeded), their names and the recipe's dynamic axes."""

    @abstractmethod
    def trajectory(self, bundle: ModelBundle, model: nn.Module, run: Run, shape: VideoShape,
                   steps: int, guidance_scale: float, on_step: Callable[[int], None] | None = None) -> Trajectory:
        """Run the family's sampling loop (or forward pass) for one input."""

    def options(self) -> dict[str, Any]:
        """Constructor arguments of this adapter, saved with a pruned model to rebuild it."""
        return {}

    def load_preset(self, name: str, seed: int) -> ModelBundle:
        config = self.presets[name]
        with torch.device("meta"):  # shapes only: what the weights will take, before allocating them
            needed = sum(p.numel() * p.element_size() for p in self.build(config).parameters())
        available = available_memory_bytes()
        if available is not None and needed > available:
            raise RecipeError(f"[model].preset = {name!r}: its weights alone need {_size(needed)}, more than the "
                              f"{_size(available)} of memory available on this machine")
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
            sources = [inspect.getsource(sys.modules[cls.__module__]) for cls in type(self).__mro__
                       if cls.__module__.startswith("f3export.")]
            return content_key(self.family, preset, self.presets[preset], seed, __version__, torch.__version__,
                               sources)
        files = self.weights_files(Path(path))
        return content_key(self.family, [(f.name, sha256_file(f)) for f in files])


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


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


class LatentVideoDiffusionAdapter(ModelAdapter):
    """Families whose network is ``noise_pred = unet(sample, timestep, encoder_hidden_states)``
    over latents ``[B, C, F, H, W]``, sampled with DDIM and classifier-free guidance."""

    latent_channels: ClassVar[int] = 4
    text_tokens: ClassVar[int] = 77
    run_keys = ("steps", "guidance_scale")
    fidelity_gates = (FidelityGate("step_cosine", "pruning_min_step_cosine"),
                      FidelityGate("latent_psnr", "pruning_min_latent_psnr"))
    default_scheduler: ClassVar[dict[str, Any]] = {
        # Stable Diffusion 1.x training schedule, as in Tune-A-Video's scheduler/ folder.
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    }

    @abstractmethod
    def text_width(self, model: nn.Module) -> int:
        """Width of the text conditioning the network cross-attends to."""

    def export_spec(self, model, shape, batch, dynamic, seed=0):
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn((batch, self.latent_channels, shape.frames, shape.latent_height, shape.latent_width),
                             generator=generator)
        timestep = torch.randint(1, 1000, (1,), generator=generator).float().expand(batch).contiguous()
        context = torch.randn((batch, self.text_tokens, self.text_width(model)), generator=generator)
        sample_axes = {0: "batch", 2: "frames", 3: "height", 4: "width"}
        axes = {
            "sample": {i: n for i, n in sample_axes.items() if n in dynamic},
            "timestep": {0: "batch"} if "batch" in dynamic else {},
            "encoder_hidden_states": {0: "batch"} if "batch" in dynamic else {},
            "noise_pred": {i: n for i, n in sample_axes.items() if n in dynamic},
        }
        return ExportSpec({"sample": sample, "timestep": timestep, "encoder_hidden_states": context},
                          ["noise_pred"], {k: v for k, v in axes.items() if v})

    def encode_prompts(self, bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
        if bundle.encode_text is not None:
            return bundle.encode_text(prompts)
        width = self.text_width(bundle.model)
        return torch.cat([seeded_text_embedding(p, self.text_tokens, width) for p in prompts])

    @torch.no_grad()
    def trajectory(self, bundle, model, run, shape, steps, guidance_scale, on_step=None):
        scheduler = DDIMScheduler.from_config(bundle.scheduler_config or self.default_scheduler)
        scheduler.set_timesteps(steps)
        context = self.encode_prompts(bundle, ["", run.prompt])
        latents = torch.randn((1, self.latent_channels, shape.frames, shape.latent_height, shape.latent_width),
                              generator=torch.Generator().manual_seed(run.seed)) * scheduler.init_noise_sigma
        noise_preds = []
        for i, t in enumerate(scheduler.timesteps):
            if on_step is not None:
                on_step(i)
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            # Channels past the latent ones (a learned variance, as in Latte) are not part of the noise.
            noise = model(model_input, t.float().expand(2), context)[:, :self.latent_channels]
            uncond, cond = noise.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            noise_preds.append(guided)
            latents = scheduler.step(guided, t, latents).prev_sample
        return Trajectory(noise_preds, latents, [int(t) for t in scheduler.timesteps])

    def fidelity(self, reference, candidate):
        return {"step_cosine": [cosine(c, r) for c, r in zip(candidate.outputs, reference.outputs)],
                "latent_psnr": psnr(candidate.final, reference.final)}


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


def read_scheduler_config(folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    return read_json(path) if path.is_file() else {}
