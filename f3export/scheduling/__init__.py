"""Torch-free NumPy ports of diffusers' schedulers, with which ``f3export generate`` samples from ONNX engines.

Each port is tested step for step against diffusers' own class; a config using what a port does not implement is
refused in one line naming the key, rather than sampled differently."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import Unsupported
from .cogvideox_ddim import CogVideoXDDIM
from .cogvideox_dpm import CogVideoXDPM
from .common import Sampler
from .ddim import DDIM
from .flow_match_euler import FlowMatchEuler
from .unipc import UniPC

SAMPLERS: dict[str, type[Sampler]] = {sampler.name: sampler for sampler in
                                      (DDIM, CogVideoXDDIM, CogVideoXDPM, UniPC, FlowMatchEuler)}

__all__ = ["DDIM", "SAMPLERS", "Sampler", "numpy_sampler"]


def numpy_sampler(class_name: str, config: dict[str, Any], rng: np.random.Generator | None = None) -> Sampler:
    """The port of diffusers' scheduler ``class_name`` with ``config`` (its ``scheduler.config``). ``rng``: the
    noise source of a sampler whose step is random (``Sampler.random``); the others draw nothing."""
    sampler = SAMPLERS.get(class_name)
    if sampler is None:
        raise Unsupported(f"scheduler {class_name}: not implemented by the engines-only sampler (it implements "
                         f"{', '.join(SAMPLERS)})")
    return sampler(config, rng=rng) if sampler.random else sampler(config)
