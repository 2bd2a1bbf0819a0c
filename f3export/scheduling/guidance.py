"""Classifier-free guidance's scale per step, for the PyTorch runs and the engines-only runtime alike."""

from __future__ import annotations

import math

DYNAMIC_CFG = "guidance(t) = 1 + guidance_scale * (1 - cos(pi * ((steps - t) / steps) ** 5)) / 2"


def guidance_at(scale: float, dynamic: bool, steps: int, t: float) -> float:
    """The guidance scale at timestep ``t``: constant, or CogVideoXPipeline's ``use_dynamic_cfg`` schedule
    (``DYNAMIC_CFG``: its formula reads the timestep's value against the number of steps)."""
    if not dynamic:
        return scale
    return 1 + scale * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)
