"""A build inside diffusers' own pipelines: the pruned model, or an engine, as the pipeline's denoiser.

    from f3export.dropin import EngineDenoiser, pruned_denoiser
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 unet=pruned_denoiser("artifacts/modelscope"), scheduler=scheduler)
    pipe.register_modules(unet=EngineDenoiser("artifacts/modelscope"))   # or the ONNX Runtime engine

The pruned model cannot be saved as a plain diffusers folder for ``from_pretrained``: a diffusers config gives
every attention of a block the same head count, and pruning leaves each temporal attention its own (some none
at all). So it is rebuilt from the build's ``pruned/`` folder (its config records the heads each module kept),
as the diffusers class it came from. ``EngineDenoiser`` serves an engine with the call, ``config``, ``dtype``
and ``device`` a pipeline reads of its denoiser, at the shapes the build validated.
"""

from __future__ import annotations

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
from .prune import PRUNED_CONFIG, load_pruned
from .runtime import EngineRunner
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
        self.engine = EngineRunner(root, variant, backend)
        open_build(root).verify_files(("prune",))
        saved = read_json(root / "pruned" / PRUNED_CONFIG)
        config = saved.get("config")
        if not isinstance(config, dict) or saved.get("family") not in FAMILIES:
            raise CheckError(f"{root / 'pruned' / PRUNED_CONFIG}: no model config or family")
        self.config = FrozenDict(config)  # what pipelines read: in_channels, sample_size, ...
        # a network taking one text embedding per frame (UNetMotionModel) is exported taking one per video
        self.text_per_frame = getattr(get_adapter(saved["family"], saved.get("adapter_options")).checkpoint,
                                      "text_per_frame", False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # outputs come back on the device of the inputs

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                return_dict: bool = True, **kwargs: Any):
        unused = {k: v for k, v in kwargs.items() if v is not None}
        if args or unused:
            raise TypeError(f"the engine takes sample, timestep and encoder_hidden_states only, not "
                            f"{', '.join(unused) or 'more positional arguments'}")
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        frames = sample.shape[2]
        if self.text_per_frame and encoder_hidden_states.shape[0] == sample.shape[0] * frames:
            per_video = encoder_hidden_states[::frames]
            if not torch.equal(per_video.repeat_interleave(frames, dim=0), encoder_hidden_states):
                raise ValueError("the engine takes one text embedding per video; these differ between frames")
            encoder_hidden_states = per_video
        noise = self.engine(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)
        return DenoiserOutput(noise) if return_dict else (noise,)
