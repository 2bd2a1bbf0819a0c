"""Flow-matching Euler (``FlowMatchEulerDiscreteScheduler``) in NumPy, with a static ``shift`` (and
``shift_terminal``); dynamic shifting, which needs the image size (``mu``) at each call, is refused."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import Sampler, shifted


class FlowMatchEuler(Sampler):
    """``FlowMatchEulerDiscreteScheduler``: ``sample + (sigma_next - sigma) * velocity``. ``step`` counts its calls
    since ``set_timesteps`` as its index into the schedule (diffusers' after ``set_begin_index(0)``); ``t`` is not
    read. Timesteps are float32, ``sigma * num_train_timesteps``."""

    name = "FlowMatchEulerDiscreteScheduler"
    defaults = {"num_train_timesteps": 1000, "shift": 1.0}

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.refuse("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas", "stochastic_sampling")
        count = self.config["num_train_timesteps"]
        # diffusers spans the inference sigmas between its shifted float32 training ones, then shifts them again
        ends = shifted(self.name, np.float32([count, 1]) / count, self.config["shift"])
        self.ends = [sigma * count for sigma in ends.tolist()]

    def set_timesteps(self, steps: int) -> None:
        count = self.config["num_train_timesteps"]
        sigmas = shifted(self.name, np.linspace(*self.ends, steps) / count, self.config["shift"],
                         self.config.get("shift_terminal")).astype(np.float32)
        self.timesteps = sigmas * count
        self.sigmas, self.index = np.append(sigmas, np.float32(0)), 0

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray) -> np.ndarray:
        sigma, sigma_next = self.sigmas[self.index:self.index + 2]
        self.index += 1
        return (sample + (sigma_next - sigma) * model_output).astype(sample.dtype)
