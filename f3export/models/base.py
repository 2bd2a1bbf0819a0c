"""The adapter interface every model family implements, and the shared diffusion-video adapter.

The core (calibrate, prune, export, validate) sees a family only through
``ModelAdapter``, which composes small pieces: its checkpoint format (loading,
``loading.py``), its temporal sites (``structure.py``), its graph signature
(``ExportIO``) and its evaluation protocol (``protocols.py``). Families that
share a call signature share the code below.
"""

from __future__ import annotations

import inspect
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import diffusers
from diffusers import SchedulerMixin
from torch import nn

from ..errors import RecipeError
from ..recipe import RecipeKey, family_key
from ..scheduling.guidance import DYNAMIC_CFG
from ..text_standin import STANDIN_TEXT, seeded_text_embedding
from ..videos import read_video
from . import memory
from .loading import CheckpointFormat, ModelBundle, PipelineFolder
from .pipeline_parts import DiffusersSampler
from .protocols import DiffusionProtocol, EvaluationProtocol, Run, Trajectory
from .structure import TemporalStructure


@dataclass(frozen=True)
class VideoShape:
    frames: int
    latent_height: int
    latent_width: int

    @classmethod
    def of_axes(cls, axes: dict[str, int]) -> "VideoShape":
        """From sizes by the recipe's axis names (``frames``, ``height``, ``width``)."""
        return cls(axes["frames"], axes["height"], axes["width"])


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


def fidelity_gate(metric: str, recipe_key: str, default: float | None, **checks: Any) -> FidelityGate:
    """A gate on ``metric``; with no default it only reports, unless the recipe sets a limit."""
    kind = float if default is not None else float | None
    return FidelityGate(metric, family_key("validation", recipe_key, kind, default, **checks))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def psnr(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB, the peak being the reference's value range."""
    mse = torch.mean((actual.double() - reference.double()) ** 2).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


class ModelAdapter(ABC):
    """A family, composed of its ``checkpoint`` format (loading: presets, folders, weights files), its
    ``structure`` (temporal sites), its export I/O (``io`` and ``example_inputs``) and its evaluation
    ``protocol``, plus the recipe keys only it reads (``option_keys``, the protocol's, its gates' limits)."""

    family: ClassVar[str]
    checkpoint: CheckpointFormat
    structure: TemporalStructure
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

    def fixed_axes_of(self, model: nn.Module) -> tuple[str, ...]:
        """The input axes the exported graph of ``model`` (a skeleton) cannot leave dynamic."""
        return self.fixed_axes

    def options(self) -> dict[str, Any]:
        """Constructor arguments of this adapter, saved with a pruned model to rebuild it."""
        return {}

    def options_error(self, model: nn.Module) -> str | None:
        """Why this adapter's options (recipe [model] keys describing the network) do not fit ``model``, or None."""
        return None

    def shape_error(self, model: nn.Module, shape: VideoShape) -> str | None:
        """Why this model cannot run clips of ``shape``, or None (``model`` may be a skeleton)."""
        return None

    def forward_memory(self, model: nn.Module, shape: VideoShape, batch: int) -> memory.ForwardMemory:
        """What one forward of ``model`` (a skeleton) at this shape needs at least, sized on the meta device."""
        floor = 4 * batch * shape.frames * shape.latent_height * shape.latent_width  # a float32 per latent position
        return memory.forward_memory(model, lambda: self._meta_inputs(model, shape, batch, floor), floor)

    def memory_error(self, model: nn.Module, shape: VideoShape, batch: int) -> str | None:
        """Why one forward of ``model`` (a skeleton) at this shape cannot fit in the memory available, or None."""
        needed = self.forward_memory(model, shape, batch)
        available = memory.available_memory_bytes()
        if available is None or needed.needed <= available:
            return None
        return (f"needs at least {memory.size_text(needed.needed)} for one forward (largest activation "
                f"{memory.size_text(needed.largest_activation)}), more than the {memory.size_text(available)} "
                "available")

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

    @abstractmethod
    def example_inputs(self, model: nn.Module, shape: VideoShape, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """Inputs of one forward pass, seeded, by the names of ``io``."""

    def export_spec(self, model: nn.Module, shape: VideoShape, batch: int, dynamic: list[str],
                    seed: int = 0) -> ExportSpec:
        """Inputs of one forward pass (seeded), their names and the recipe's dynamic axes."""
        return self.io.spec(self.example_inputs(model, shape, batch, seed), dynamic)

    @abstractmethod
    def conventions(self, bundle: ModelBundle) -> dict[str, Any]:
        """How a runtime must drive the exported graph beyond its names and shapes (JSON, for the contract)."""

    def adopt(self, bundle: ModelBundle) -> None:
        """Learn what the loaded folder decides beyond the network's config (called once it is loaded, before
        any input is made): nothing by default."""

    def prepare_runs(self, bundle: ModelBundle, runs: list[Run]) -> None:
        """Before ``runs`` (a calibration's or a validation's): whatever is made once for all of them."""

    def text_source(self, bundle: ModelBundle) -> str | None:
        """What made the runs' text conditioning, in words (scores.json, the report); None: no text."""
        return None

    def pipeline_components(self, bundle: ModelBundle, shape: VideoShape) -> list:
        """The rest of the model's pipeline a runtime needs (``components.Component``s); none by default."""
        return []

    def model_components(self, model: nn.Module, shape: VideoShape) -> list:
        """Other graphs of ``model`` itself a runtime needs (``components.Component``s: a KV-cache step graph),
        exported, built and checked for the original and the pruned model alike as ``<name>.<variant>``; none by
        default."""
        return []

    @abstractmethod
    def trajectory(self, bundle: ModelBundle, model: nn.Module, run: Run, shape: VideoShape,
                   on_step: Callable[[int], None] | None = None) -> Trajectory:
        """One run of the family's ``protocol`` (its sampling loop, or a forward pass)."""

    @abstractmethod
    def fidelity(self, reference: Trajectory, candidate: Trajectory) -> dict[str, float | list[float]]:
        """Pruning-fidelity metrics of one run, pruned (candidate) against original (reference)."""


def family_sources(adapter: ModelAdapter) -> list[str]:
    """The code of a family: the f3export modules its adapter, checkpoint format and structure classes derive
    from and, for a family that is a package (network, checkpoint, adapter), every module of that package, so
    that a network change counts (a preset's weights are made by code)."""
    files: dict[Path, None] = {}
    for cls in (*type(adapter).__mro__, *type(adapter.checkpoint).__mro__, *type(adapter.structure).__mro__):
        module = sys.modules[cls.__module__]
        if not cls.__module__.startswith("f3export."):
            continue
        path = Path(inspect.getfile(module))
        in_package = module.__package__ not in (None, "", __package__)
        files.update(dict.fromkeys(sorted(path.parent.glob("*.py")) if in_package else [path]))
    return [path.read_text() for path in files]


def video_fidelity(video: torch.Tensor, reference: torch.Tensor) -> dict[str, list[float]]:
    """Per-frame PSNR (dB) and SSIM of a video against a reference, both RGB [3, F, H, W] in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    frames, reference_frames = video.transpose(0, 1).double(), reference.transpose(0, 1).double()
    psnrs = peak_signal_noise_ratio(frames, reference_frames, data_range=2.0, reduction="none", dim=(1, 2, 3))
    ssims = structural_similarity_index_measure(frames, reference_frames, data_range=2.0, reduction="none",
                                                kernel_size=(min(11, *frames.shape[-2:]) - 1) // 2 * 2 + 1)
    return {"video_psnr": psnrs.tolist(), "video_ssim": ssims.tolist()}


LATENT_AXES = {0: "batch", 2: "frames", 3: "height", 4: "width"}  # of latents [B, C, F, H, W]


@dataclass(frozen=True)
class PipelineCall:
    """How a family's diffusers pipeline calls its denoiser, for an engine standing in for it (``dropin``): the
    latents' argument name, whether the pipeline holds them frames-first ([B, F, C, H, W]), and the arguments the
    engine's graph computes itself from the latents (so a pipeline may pass them, and they are not ignored)."""

    sample: str = "sample"
    frames_first: bool = False
    computed_in_graph: tuple[str, ...] = ()


class LatentVideoDiffusionAdapter(ModelAdapter):
    """Families whose network is ``noise_pred = unet(sample, timestep, encoder_hidden_states)``
    over latents ``[B, C, F, H, W]``, sampled with DDIM and classifier-free guidance."""

    text_tokens: ClassVar[int] = 77
    protocol = DiffusionProtocol()
    pipeline_call: ClassVar[PipelineCall] = PipelineCall()
    io = ExportIO(inputs={"sample": LATENT_AXES, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"}},
                  outputs={"noise_pred": LATENT_AXES})
    fidelity_gates = (fidelity_gate("step_cosine", "pruning_min_step_cosine", 0.9, low=-1.0, high=1.0),
                      fidelity_gate("latent_psnr", "pruning_min_latent_psnr", 20.0),
                      # in video space, where the model's output is frames (pixel space, or a vae/)
                      fidelity_gate("video_psnr", "pruning_min_video_psnr", None),
                      fidelity_gate("video_ssim", "pruning_min_video_ssim", None, low=-1.0, high=1.0))
    default_scheduler: ClassVar[dict[str, Any]] = {
        # Stable Diffusion 1.x training schedule, as in Tune-A-Video's scheduler/ folder.
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    }

    @abstractmethod
    def text_width(self, model: nn.Module) -> int:
        """Width of the text conditioning the network cross-attends to."""

    @abstractmethod
    def latent_channels(self, model: nn.Module) -> int:
        """Channels of the latents the network denoises (its input; 3 for a pixel-space RGB model)."""

    def adopt(self, bundle):
        """The folder's text encoder pads prompts to its own length (its tokenizer's maximum): the network's
        inputs take that many tokens (export, goldens, contract), as its pipeline gives them; ``text_tokens``
        is the family's released encoder's, and the stand-in's."""
        if bundle.encode_text is not None:
            self.text_tokens = bundle.encode_text.tokens

    def example_inputs(self, model, shape, batch, seed):
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn((batch, self.latent_channels(model), shape.frames, shape.latent_height, shape.latent_width),
                             generator=generator)
        timestep = torch.randint(1, 1000, (1,), generator=generator).float().expand(batch).contiguous()
        context = torch.randn((batch, self.text_tokens, self.text_width(model)), generator=generator)
        return {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}

    def encode_prompts(self, bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
        if bundle.encode_text is not None:
            return bundle.encode_text(prompts)
        width = self.text_width(bundle.model)
        return torch.cat([torch.from_numpy(seeded_text_embedding(p, self.text_tokens, width)) for p in prompts])

    def prepare_runs(self, bundle, runs):
        """Every prompt the runs read, encoded at once, and the text encoder freed before the denoiser runs (a
        T5-XXL's weights need not stay beside the transformer's)."""
        if bundle.encode_text is not None:
            bundle.encode_text([p for run in runs for p in
                                ((run.negative_prompt, run.prompt) if self.protocol.guided(run) else (run.prompt,))])
            bundle.encode_text.release()

    def text_source(self, bundle):
        if bundle.encode_text is not None:
            return bundle.encode_text.describe()
        return f"{STANDIN_TEXT} (seeded random embeddings of {self.text_tokens} x {self.text_width(bundle.model)}: " \
               "no text encoder in the model folder)"

    def pipeline_components(self, bundle, shape):
        from ..components import pipeline_components

        return pipeline_components(bundle, shape, self.latent_channels(bundle.model))

    checkpoint: PipelineFolder

    @property
    def scheduler_class(self) -> type[SchedulerMixin]:
        """The family's default sampler (a folder may name another its pipeline accepts)."""
        return getattr(diffusers, self.checkpoint.parts.schedulers[0])

    def scheduler(self, bundle: ModelBundle) -> DiffusersSampler:
        """The sampler of calibration and validation, with the folder's schedule (else the family's default): the
        class the folder names where the family's pipeline samples with it, else the family's."""
        config = bundle.scheduler_config or self.default_scheduler
        name = self.checkpoint.parts.scheduler_class(config, "scheduler/scheduler_config.json", self.checkpoint.owner)
        return DiffusersSampler(getattr(diffusers, name).from_config(config))

    def conventions(self, bundle):
        scheduler = self.scheduler(bundle)
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        latent = self.latent_channels(bundle.model)
        channels = bundle.config.get("out_channels") or latent
        return {
            "kind": "latent video diffusion: noise_pred = model(sample, timestep, encoder_hidden_states)",
            "sample": f"latents [batch, {latent}, frames, height, width], scaled by the scheduler's "
                      "scale_model_input; the first step's latents are N(0, 1) x init_noise_sigma",
            "timestep": {"dtype": "float32", "shape": ["batch"], "range": [0, config["num_train_timesteps"] - 1],
                         "meaning": "the scheduler's integer timestep of this step, as float32, the same value "
                                    "for every batch row (both halves of the guidance batch)"},
            "encoder_hidden_states": f"text embeddings [batch, {self.text_tokens}, {self.text_width(bundle.model)}] "
                                     "of the prompt (the model folder's text encoder); the negative prompt's for "
                                     "the unconditional rows (guidance.negative_prompt by default)",
            # how a runtime makes them: the folder's encoder, or (none in the folder) the seeded stand-in
            "text_conditioning": self.text_conditioning(bundle),
            "scheduler": {"class": type(scheduler.scheduler).__name__, "config": config,
                          "note": "the scheduler the model was calibrated and validated with"},
            "guidance": {"batch_layout": ["unconditional", "conditional"],
                         "combine": "uncond, cond = noise[:B/2], noise[B/2:]; "
                                    "guided = uncond + guidance_scale * (cond - uncond)",
                         "negative_prompt": self.protocol.negative_prompt,  # the unconditional row's default
                         # guidance <= 1: the conditional row alone, as the family's pipeline runs it
                         "skip_unconditional": self.protocol.skip_unconditional,
                         **({"dynamic_cfg": DYNAMIC_CFG} if self.protocol.dynamic_cfg else {})},
            "output": {"name": "noise_pred", "channels": channels, "noise_channels": [0, latent],
                       "meaning": f"noise_pred[:, :{latent}] is the model output the scheduler "
                                  f"steps with (prediction_type = {config['prediction_type']!r})"
                                  + (f"; channels {latent}..{channels - 1} are a learned variance "
                                     "the DDIM sampler does not use" if channels > latent else "")},
        }

    def text_conditioning(self, bundle: ModelBundle) -> dict[str, Any]:
        """How a runtime makes the text embeddings: the folder's encoder (class, tokens, whether padding is zeroed),
        or (none in the folder) the seeded stand-in."""
        text = bundle.encode_text
        if text is None:
            return {"source": "seeded stand-in (f3export.text_standin.seeded_text_embedding)",
                    "tokens": self.text_tokens, "width": self.text_width(bundle.model)}
        return {"source": "text encoder", "class": text.class_name, "tokens": text.tokens,
                "width": self.text_width(bundle.model), "padding_zeroed": text.encoding.masked,
                "prompt_clean": text.encoding.clean}

    @torch.no_grad()
    def trajectory(self, bundle, model, run, shape, on_step=None):
        channels = self.latent_channels(bundle.model)  # the model's I/O: a pruned or wrapped copy shares it
        latent_shape = (1, channels, shape.frames, shape.latent_height, shape.latent_width)
        guided = self.protocol.guided(run)
        context = self.encode_prompts(bundle, [run.negative_prompt, run.prompt] if guided else [run.prompt])
        source = self.source_latents(bundle, Path(run.source), latent_shape) if run.source else None
        result = self.protocol.trajectory(model, run, self.scheduler(bundle), context, latent_shape, channels,
                                          on_step, source)
        result.video = self.video(bundle, result.latents)
        return result

    def source_latents(self, bundle: ModelBundle, path: Path, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The clean latents [1, C, F, h, w] of a source video file: encoded by the folder's VAE, or the frames
        themselves for a pixel-space (3-channel) model. RecipeError naming the file where it does not fit."""
        video = read_video(path)[None]
        if bundle.vae is None and latent_shape[1] != 3:
            raise RecipeError(f"{path}: this model's latents are not frames and its folder has no vae/ to encode "
                              "a source video into them")
        scale = bundle.vae.scale if bundle.vae is not None else 1
        frames, height, width = latent_shape[2], latent_shape[3] * scale, latent_shape[4] * scale
        if tuple(video.shape[2:]) != (frames, height, width):
            raise RecipeError(f"{path}: {video.shape[2]} frames of {video.shape[4]}x{video.shape[3]}, the model "
                              f"runs {frames} frames of {width}x{height}")
        return bundle.vae.encode(video) if bundle.vae is not None else video

    def video(self, bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor | None:
        """RGB frames [3, F, H, W] in [-1, 1] of one run's final latents [1, C, F, h, w]: decoded by the folder's
        VAE, or the latents themselves for a pixel-space (3-channel) model; None for latents nothing decodes."""
        if bundle.vae is not None:
            return bundle.vae.decode(latents)[0]
        return latents[0].clamp(-1, 1) if latents.shape[1] == 3 else None

    def fidelity(self, reference, candidate):
        metrics = {"step_cosine": [cosine(c, r) for c, r in zip(candidate.noise_preds, reference.noise_preds)],
                   "latent_psnr": psnr(candidate.latents, reference.latents)}
        if reference.video is not None:
            metrics.update(video_fidelity(candidate.video, reference.video))
        return metrics
