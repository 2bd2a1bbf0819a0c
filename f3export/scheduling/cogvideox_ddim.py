"""CogVideoX's DDIM (``CogVideoXDDIMScheduler``) in NumPy: DDIM at eta = 0 over a schedule whose SNR is divided by
``snr_shift_scale`` and optionally rescaled to zero at the last timestep, as CogVideoX was trained."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import PREDICTIONS, AlphaSchedule, alphas_cumprod, predicted_original


def rescale_zero_terminal_snr(table: np.ndarray) -> np.ndarray:
    """``alphas_cumprod`` whose square roots are shifted and scaled to end at 0 with the first kept (arXiv
    2305.08891, Algorithm 1), as CogVideoX applies it to alphas_cumprod after the SNR shift."""
    roots = table ** 0.5
    first, last = roots[0], roots[-1]
    return ((roots - last) * (first / (first - last))) ** 2


class CogVideoXDDIM(AlphaSchedule):
    """``CogVideoXDDIMScheduler`` (its step is DDIM's at eta = 0, written as ``a * sample + b * x0``, and it never
    clips x0, whatever ``clip_sample`` says)."""

    name = "CogVideoXDDIMScheduler"
    defaults = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "snr_shift_scale": 3.0}

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.kind = self.choice("prediction_type", PREDICTIONS)

    def table(self) -> np.ndarray:
        table = alphas_cumprod(self.name, self.config, scaled_linear_dtype=np.float64)
        shift = self.config["snr_shift_scale"]
        table = table / (shift + (1 - shift) * table)
        return rescale_zero_terminal_snr(table) if self.config.get("rescale_betas_zero_snr") else table

    def original(self, model_output: np.ndarray, alpha: Any, sample: np.ndarray) -> np.ndarray:
        """x0 predicted at a timestep whose ``alphas_cumprod`` is ``alpha``."""
        return predicted_original(self.kind, alpha ** 0.5, (1 - alpha) ** 0.5, sample, model_output)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        alpha, alpha_prev = self.alphas(t)
        original = self.original(model_output, alpha, sample)
        a = ((1 - alpha_prev) / (1 - alpha)) ** 0.5
        b = alpha_prev ** 0.5 - alpha ** 0.5 * a
        cast = sample.dtype.type
        return cast(a) * sample + cast(b) * original
