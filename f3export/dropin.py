"""A build inside diffusers' own pipelines: the pruned model, or an engine, as the pipeline's denoiser.

    from f3export.dropin import EngineDenoiser, pruned_denoiser
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 unet=pruned_denoiser("artifacts/modelscope"), scheduler=scheduler)
    pipe.register_modules(unet=EngineDenoiser("artifacts/modelscope"))   # or the ONNX Runtime engine

    pipe = CogVideoXPipeline.from_pretrained(folder)        # or WanPipeline: their pruned transformer, or engine
    pipe.transformer = pruned_denoiser("artifacts/cogvideox-pipeline")
    pipe.register_modules(transformer=EngineDenoiser("artifacts/cogvideox-pipeline"))

The pruned model cannot be saved as a plain diffusers folder for ``from_pretrained``: a diffusers config gives
every attention of a block the same head count, and pruning leaves each temporal attention its own (some none
at all). So it is rebuilt from the build's ``pruned/`` folder (its config records the heads each module kept),
as the diffusers class it came from. ``EngineDenoiser`` serves an engine with the call, ``config``, ``dtype``
and ``device`` a pipeline reads of its denoiser, at the shapes the build validated, called as the family's
pipeline calls it (``PipelineCall``: CogVideoX's frames-first latents, the rotary table the graph computes
itself). A pruned joint-attention transformer learns its frame layout from each call's latents (a pre-hook), so
a pipeline needs to set nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import BaseOutput

from .artifacts import open_build
from .errors import CheckError
from .models import FAMILIES, get_adapter
from .models.base import PipelineCall
from .prune import PRUNED_CONFIG, load_pruned
from .runtime import denoiser
from .weights import read_json


def pruned_denoiser(artifact_dir: str | Path) -> ModelMixin:
    """The pruned model of a finished diffusers-family build, as its diffusers class (after checking its files)."""
    root = Path(artifact_dir)
    build = open_build(root)
    build.verify_files(("prune",))
    _, _, model = load_pruned(root / "pruned")
    inner = getattr(model, "inner", None)
    if not isinstance(inner, ModelMixin):
        raise CheckError(f"{root}: a {build.recipe.model.family} build, whose network is not a diffusers model class")
    return inner.eval()


@dataclass
class DenoiserOutput(BaseOutput):
    """What diffusers' denoisers return: ``.sample``, or ``[0]`` with ``return_dict=False``."""

    sample: torch.Tensor


class EngineDenoiser(torch.nn.Module):
    """An engine of a finished build as a diffusers pipeline's denoiser (``unet`` or ``transformer``)."""

    def __init__(self, artifact_dir: str | Path, variant: str = "pruned", backend: str | None = None):
        super().__init__()
        root = Path(artifact_dir)
        self.engine = denoiser(root, variant, backend)  # under a step schedule, both engines by timestep
        open_build(root).verify_files(("prune",))
        saved = read_json(root / "pruned" / PRUNED_CONFIG)
        config = saved.get("config")
        if not isinstance(config, dict) or saved.get("family") not in FAMILIES:
            raise CheckError(f"{root / 'pruned' / PRUNED_CONFIG}: no model config or family")
        self.config = FrozenDict(config)  # what pipelines read: in_channels, sample_size, ...
        adapter = get_adapter(saved["family"], saved.get("adapter_options"))
        # a network taking one text embedding per frame (UNetMotionModel) is exported taking one per video
        self.text_per_frame = getattr(adapter.checkpoint, "text_per_frame", False)
        self.call: PipelineCall = getattr(adapter, "pipeline_call", PipelineCall())

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # outputs come back on the device of the inputs

    def cache_context(self, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        """diffusers' pipelines open a cache context around each call of their transformer; an engine has none."""
        return contextlib.nullcontext()

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any):
        """The pipeline's call (``PipelineCall``: the latents by the family's name and layout), on the engine."""
        names = [self.call.sample, "timestep", "encoder_hidden_states"]
        given = {**dict(zip(names, args)), **kwargs}
        unused = {k for k, v in given.items() if k not in names and k not in self.call.computed_in_graph
                  and v is not None}
        if len(args) > len(names) or unused or any(n not in given for n in names):
            raise TypeError(f"the engine takes {', '.join(names)} only, not "
                            f"{', '.join(sorted(unused)) or 'more positional arguments'}")
        sample, encoder_hidden_states = given[self.call.sample], given["encoder_hidden_states"]
        if self.call.frames_first:
            sample = sample.transpose(1, 2)
        timestep = torch.as_tensor(given["timestep"], dtype=torch.float32).reshape(-1)
        frames = sample.shape[2]
        if self.text_per_frame and encoder_hidden_states.shape[0] == sample.shape[0] * frames:
            per_video = encoder_hidden_states[::frames]
            if not torch.equal(per_video.repeat_interleave(frames, dim=0), encoder_hidden_states):
                raise ValueError("the engine takes one text embedding per video; these differ between frames")
            encoder_hidden_states = per_video
        noise = self.engine(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)
        if self.call.frames_first:
            noise = noise.transpose(1, 2)
        return DenoiserOutput(noise) if return_dict else (noise,)
