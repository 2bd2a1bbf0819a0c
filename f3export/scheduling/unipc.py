"""UniPC (``UniPCMultistepScheduler``) in NumPy, as Wan 2.1 samples with it: flow sigmas (``use_flow_sigmas``,
``flow_shift``) and flow prediction, or the diffusion sigmas of a beta schedule with epsilon, sample or v
prediction; the data-prediction (``predict_x0``) solver, bh1 or bh2, of any order.

Each step corrects the previous step's prediction with the model output at it (UniC), then predicts the next
sample (UniP); the model outputs it needs, as x0, are kept inside and reset by ``set_timesteps``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import PREDICTIONS, Sampler, alphas_cumprod, predicted_original, shifted, spaced_timesteps


class UniPC(Sampler):
    """``UniPCMultistepScheduler``. ``step`` counts its calls since ``set_timesteps`` as its index into the
    schedule (diffusers' after ``set_begin_index(0)``); ``t`` is not read."""

    name = "UniPCMultistepScheduler"
    defaults = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                "solver_order": 2, "prediction_type": "epsilon", "predict_x0": True, "solver_type": "bh2",
                "lower_order_final": True, "flow_shift": 1.0, "timestep_spacing": "linspace",
                "final_sigmas_type": "zero"}

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.refuse("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "use_dynamic_shifting", "rescale_betas_zero_snr", "solver_p")
        if not self.config["predict_x0"]:
            raise self.unported("predict_x0")
        self.flow = bool(self.config.get("use_flow_sigmas"))
        self.kind = self.choice("prediction_type", PREDICTIONS + ("flow_prediction",) if self.flow else PREDICTIONS)
        # diffusers runs DPM-Solver's solver types as bh2
        self.config["solver_type"] = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}.get(
            self.config["solver_type"], self.config["solver_type"])
        self.bh1 = self.choice("solver_type", ("bh1", "bh2")) == "bh1"
        self.final = self.choice("final_sigmas_type", ("zero", "sigma_min"))
        self.solver_order = self.config["solver_order"]
        if self.final == "zero" and (self.bh1 or self.solver_order > 1 and not self.config["lower_order_final"]):
            raise self.unported("final_sigmas_type", f" with solver_type = {self.config['solver_type']!r} and "
                                f"lower_order_final = {self.config['lower_order_final']!r} (diffusers' own ends in "
                                "NaN or inf: only a first-order bh2 step reaches sigma 0)")
        self.corrector_off = set(self.config.get("disable_corrector") or ())
        table = alphas_cumprod(self.name, self.config)
        self.train_sigmas = ((1 - table) / table) ** 0.5

    def set_timesteps(self, steps: int) -> None:
        count = self.config["num_train_timesteps"]
        if self.flow:
            sigmas = shifted(self.name, np.linspace(1, 1 / count, steps + 1)[:-1], self.config["flow_shift"],
                             self.config.get("shift_terminal"))
            if abs(sigmas[0] - 1) < 1e-6:
                sigmas[0] -= 1e-6
            timesteps, last = sigmas * count, sigmas[-1]
        else:
            timesteps = spaced_timesteps(self.name, self.config, steps, grid=steps + 1)
            sigmas = np.interp(timesteps, np.arange(count), self.train_sigmas)
            last = self.train_sigmas[0]
        self.sigmas = np.concatenate([sigmas, [last if self.final == "sigma_min" else 0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.index, self.outputs, self.last_sample, self.last_order = 0, [], None, 0

    def alpha_sigma(self, i: int) -> tuple[np.float32, np.float32]:
        """The signal and noise scales at schedule index ``i``: ``sample = alpha * x0 + sigma * noise``."""
        sigma = self.sigmas[i]
        if self.flow:
            return 1 - sigma, sigma
        alpha = 1 / (sigma ** 2 + 1) ** 0.5
        return alpha, sigma * alpha

    def log_snr(self, i: int) -> np.float32:
        alpha, sigma = self.alpha_sigma(i)
        with np.errstate(divide="ignore"):  # inf at sigma 0, as diffusers' torch gives
            return np.log(alpha) - np.log(sigma)

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray) -> np.ndarray:
        i = self.index
        original = predicted_original(self.kind, *self.alpha_sigma(i), sample, model_output)
        if i > 0 and i - 1 not in self.corrector_off:
            sample = self.update(self.last_sample, i - 1, self.last_order, original)
        self.outputs = (self.outputs + [original])[-self.solver_order:]
        order = min(self.solver_order, len(self.timesteps) - i) if self.config["lower_order_final"] \
            else self.solver_order
        self.last_order = min(order, i + 1)  # the first steps have fewer outputs to go on
        self.last_sample, self.index = sample, i + 1
        return self.update(sample, i, self.last_order)

    def update(self, x: np.ndarray, s: int, order: int, original_next: np.ndarray | None = None) -> np.ndarray:
        """UniP (``original_next`` None): the sample at index ``s + 1`` from ``x`` at ``s`` and the last
        ``order`` x0 (the newest at ``s``). UniC: the same step redone with ``original_next``, the x0 the model
        gave at ``s + 1``, as one more point."""
        alpha_t, sigma_t = self.alpha_sigma(s + 1)
        sigma_s = self.alpha_sigma(s)[1]
        h = self.log_snr(s + 1) - self.log_snr(s)
        newest = self.outputs[-1]
        nodes = [(self.log_snr(s - k) - self.log_snr(s)) / h for k in range(1, order)]
        slopes = [(self.outputs[-(k + 1)] - newest) / node for k, node in enumerate(nodes, 1)]
        if original_next is not None:
            nodes.append(np.float32(1))
            slopes.append(original_next - newest)
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = hh if self.bh1 else h_phi_1
        x_t = sigma_t / sigma_s * x - alpha_t * h_phi_1 * newest
        if slopes:
            rhos = [0.5] if len(slopes) == 1 else self.rhos(np.asarray(nodes, dtype=np.float32), hh, b_h)
            x_t = x_t - alpha_t * b_h * sum(np.float32(rho) * slope for rho, slope in zip(rhos, slopes))
        return x_t.astype(x.dtype)

    @staticmethod
    def rhos(nodes: np.ndarray, hh: np.float32, b_h: np.float32) -> np.ndarray:
        """The weights of the slopes at ``nodes`` (UniPC's B(h) order conditions, solved)."""
        h_phi_k, factorial, b = np.expm1(hh) / hh - 1, 1, []
        for k in range(1, len(nodes) + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return np.linalg.solve(np.stack([nodes ** k for k in range(len(nodes))]), np.asarray(b, dtype=np.float32))
