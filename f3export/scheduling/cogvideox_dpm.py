"""CogVideoX's DPM-Solver (``CogVideoXDPMScheduler``) in NumPy: DPM-Solver++(2M) SDE over CogVideoX's DDIM
schedule.

Its step is random whatever ``eta`` says: diffusers ignores eta and adds fresh noise scaled by
``sqrt(1 - alpha_prev) * sqrt(1 - exp(-2h))``, which is 0 only where the step ends at alpha 1 (the last step,
with ``set_alpha_to_one``). So ``step`` takes the noise, or draws it from the sampler's ``rng``, and draws
nothing where its scale is 0."""

from __future__ import annotations

from typing import Any

import numpy as np

from .cogvideox_ddim import CogVideoXDDIM


def log_snr(alpha: Any) -> Any:
    """Half the log-SNR at ``alphas_cumprod`` ``alpha`` (-inf at 0, inf at 1, as diffusers' torch gives)."""
    with np.errstate(divide="ignore"):
        return np.log((alpha / (1 - alpha)) ** 0.5)


class CogVideoXDPM(CogVideoXDDIM):
    """``CogVideoXDPMScheduler`` stepped as ``CogVideoXPipeline`` steps it: first order at the first step and at
    a step to timestep < 0, else second order with the previous step's x0 (kept inside, reset by
    ``set_timesteps``)."""

    name = "CogVideoXDPMScheduler"
    random = True

    def __init__(self, config: dict[str, Any], rng: np.random.Generator | None = None):
        super().__init__(config)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.previous: tuple[int, np.ndarray] | None = None  # the last step's timestep and x0

    def set_timesteps(self, steps: int) -> None:
        super().set_timesteps(steps)
        self.previous = None

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """``noise``: the N(0, 1) draw diffusers would make (its second, at a second-order step); drawn from
        ``rng`` when not given."""
        alpha, alpha_prev = self.alphas(t)
        original = self.original(model_output, alpha, sample)
        h = log_snr(alpha_prev) - log_snr(alpha)
        cast = sample.dtype.type
        denoised = original
        if self.previous is not None and t - self.train_steps // self.steps >= 0:
            back, old = self.previous
            r = (log_snr(alpha) - log_snr(self.alphas_cumprod[back])) / h
            denoised = cast(1 + 1 / (2 * r)) * original - cast(1 / (2 * r)) * old
        self.previous = int(t), original
        prev_sample = cast(((1 - alpha_prev) / (1 - alpha)) ** 0.5 * np.exp(-h)) * sample \
            - cast(np.expm1(-2 * h) * alpha_prev ** 0.5) * denoised
        noise_scale = (1 - alpha_prev) ** 0.5 * (1 - np.exp(-2 * h)) ** 0.5
        if noise_scale == 0:
            return prev_sample
        if noise is None:
            noise = self.rng.standard_normal(sample.shape, dtype=sample.dtype)
        return prev_sample + cast(noise_scale) * noise
