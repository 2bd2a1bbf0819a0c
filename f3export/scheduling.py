"""DDIM sampling in NumPy, for runtimes without PyTorch (``f3export generate``).

The arithmetic of diffusers' ``DDIMScheduler`` (eta = 0: deterministic), read from the same config the build
recorded in its contract, and tested step for step against diffusers' own. Configs using what this does not
implement (thresholding, zero-SNR rescaling, other beta schedules) are refused by name."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import CheckError


def _betas(config: dict[str, Any]) -> np.ndarray:
    count, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    if schedule == "linear":
        return np.linspace(start, end, count, dtype=np.float32)
    if schedule == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, count, dtype=np.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), 0.999) for i in range(count)],
                          dtype=np.float32)
    raise CheckError(f"scheduler beta_schedule {schedule!r}: not implemented by the engines-only DDIM sampler")


class DDIM:
    """``DDIMScheduler`` with eta = 0: ``set_timesteps``, ``timesteps``, ``step``; initial noise is N(0, 1)."""

    def __init__(self, config: dict[str, Any]):
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if config.get(key):
                raise CheckError(f"scheduler {key} = true: not implemented by the engines-only DDIM sampler")
        self.config = config
        self.train_steps = config["num_train_timesteps"]
        self.alphas_cumprod = np.cumprod(1.0 - _betas(config), dtype=np.float32)
        self.final_alpha_cumprod = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.timesteps = np.arange(self.train_steps)[::-1]
        self.steps = self.train_steps

    def set_timesteps(self, steps: int) -> None:
        spacing, offset, count = self.config.get("timestep_spacing", "leading"), \
            self.config.get("steps_offset", 0), self.train_steps
        if spacing == "linspace":
            timesteps = np.linspace(0, count - 1, steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            timesteps = (np.arange(0, steps) * (count // steps)).round()[::-1].astype(np.int64) + offset
        elif spacing == "trailing":
            timesteps = np.round(np.arange(count, 0, -count / steps)).astype(np.int64) - 1
        else:
            raise CheckError(f"scheduler timestep_spacing {spacing!r}: not one of linspace, leading, trailing")
        self.timesteps, self.steps = timesteps, steps

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        previous = t - self.train_steps // self.steps
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        beta = 1 - alpha
        kind = self.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            original = (sample - beta ** 0.5 * model_output) / alpha ** 0.5
            epsilon = model_output
        elif kind == "sample":
            original = model_output
            epsilon = (sample - alpha ** 0.5 * original) / beta ** 0.5
        elif kind == "v_prediction":
            original = alpha ** 0.5 * sample - beta ** 0.5 * model_output
            epsilon = alpha ** 0.5 * model_output + beta ** 0.5 * sample
        else:
            raise CheckError(f"scheduler prediction_type {kind!r}: not one of epsilon, sample, v_prediction")
        if self.config.get("clip_sample"):
            bound = self.config.get("clip_sample_range", 1.0)
            original = np.clip(original, -bound, bound)
        return (alpha_prev ** 0.5 * original + (1 - alpha_prev) ** 0.5 * epsilon).astype(sample.dtype)
