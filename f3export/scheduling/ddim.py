"""DDIM sampling in NumPy, for runtimes without PyTorch (``f3export generate``).

The arithmetic of diffusers' ``DDIMScheduler`` (eta = 0: deterministic), read from the same config the build
recorded in its contract, and tested step for step against diffusers' own. Configs using what this does not
implement (thresholding, zero-SNR rescaling, other beta schedules) are refused by name."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import PREDICTIONS, AlphaSchedule, alphas_cumprod, predicted_original


class DDIM(AlphaSchedule):
    """``DDIMScheduler`` with eta = 0: ``set_timesteps``, ``timesteps``, ``step``; initial noise is N(0, 1)."""

    name = "DDIMScheduler"
    defaults = {"prediction_type": "epsilon"}

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.refuse("thresholding", "rescale_betas_zero_snr")
        self.kind = self.choice("prediction_type", PREDICTIONS)

    def table(self) -> np.ndarray:
        return alphas_cumprod(self.name, self.config)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        alpha, alpha_prev = self.alphas(t)
        beta = 1 - alpha
        original = predicted_original(self.kind, alpha ** 0.5, beta ** 0.5, sample, model_output)
        if self.kind == "epsilon":
            epsilon = model_output
        elif self.kind == "sample":
            epsilon = (sample - alpha ** 0.5 * original) / beta ** 0.5
        else:  # v_prediction
            epsilon = alpha ** 0.5 * model_output + beta ** 0.5 * sample
        if self.config.get("clip_sample"):
            bound = self.config.get("clip_sample_range", 1.0)
            original = np.clip(original, -bound, bound)
        return (alpha_prev ** 0.5 * original + (1 - alpha_prev) ** 0.5 * epsilon).astype(sample.dtype)
