"""What the NumPy samplers share: the interface ``f3export generate`` drives, refusals of what is not ported,
and the pieces of diffusers' schedules that several schedulers compute alike.

The ports copy diffusers' arithmetic, dtypes included (which tables are float64, which float32), so that they step
as diffusers does to float32 rounding; a coefficient is cast to the sample's dtype before it meets an array, as a
0-d torch tensor is."""

from __future__ import annotations

import abc
import math
from typing import Any, Mapping

import numpy as np

from ..errors import CheckpointError, Unsupported


def unported(name: str, key: str, value: Any, note: str = "") -> Unsupported:
    return Unsupported(f"scheduler {name} {key} = {value!r}: not implemented by the engines-only sampler{note}")


class Sampler(abc.ABC):
    """A diffusers scheduler's sampling, torch-free. The loop is the same for all::

        s.set_timesteps(steps)
        latents = noise * s.init_noise_sigma
        for t in s.timesteps:
            latents = s.step(model(s.scale_model_input(latents, t), t), t, latents)

    A multistep sampler keeps its history inside, reset by ``set_timesteps``. ``random``: whether ``step`` draws
    noise (from the ``rng`` its constructor takes)."""

    name: str  # diffusers' class name, as a model's scheduler config records it
    defaults: Mapping[str, Any] = {}  # diffusers' defaults for keys a config may leave out
    random = False
    init_noise_sigma = 1.0
    timesteps: np.ndarray

    def __init__(self, config: Mapping[str, Any]):
        self.config = {**self.defaults, **config}
        why = config_error(self.config)
        if why is not None:
            raise CheckpointError(f"scheduler {self.name} config: {why}")

    def unported(self, key: str, note: str = "") -> Unsupported:
        return unported(self.name, key, self.config.get(key), note)

    def refuse(self, *keys: str) -> None:
        """Refuse options that change the sampling when set and that this port does not implement."""
        for key in keys:
            if self.config.get(key):
                raise self.unported(key)

    def choice(self, key: str, allowed: tuple[Any, ...]) -> Any:
        if self.config.get(key) not in allowed:
            raise self.unported(key, f" (it implements {', '.join(map(str, allowed))})")
        return self.config[key]

    @abc.abstractmethod
    def set_timesteps(self, steps: int) -> None:
        """``timesteps`` for ``steps`` sampling steps, as diffusers' ``set_timesteps`` makes them."""

    @abc.abstractmethod
    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray) -> np.ndarray:
        """The sample at the next timestep: diffusers' ``step(...).prev_sample``."""

    def scale_model_input(self, sample: np.ndarray, t: Any) -> np.ndarray:
        return sample  # each ported scheduler's scale_model_input is the identity (or it has none)


def _beta(value: Any) -> bool:
    return type(value) in (int, float) and 0 < value < 1  # NaN and infinities compare False


def config_error(config: Mapping[str, Any]) -> str | None:
    """Why ``config`` (diffusers' defaults filled in) defines no schedule a sampler can step, or None: a config
    read from an untrusted file (a build's manifest) is checked before it makes tables or timesteps, so that a
    NaN or out-of-range value is refused in one line rather than sampled into a NaN video."""
    count = config.get("num_train_timesteps")
    if type(count) is not int or count < 1:
        return f"num_train_timesteps = {count!r} is not a positive integer"
    offset = config.get("steps_offset", 0)
    if type(offset) is not int or not 0 <= offset < count:
        return f"steps_offset = {offset!r} is not an integer in [0, num_train_timesteps = {count})"
    for key in ("beta_start", "beta_end"):
        if key in config and not _beta(config[key]):
            return f"{key} = {config[key]!r} is not a number in (0, 1)"
    trained = config.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list) or len(trained) != count:
            return f"trained_betas is not a list of num_train_timesteps = {count} betas"
        bad = next((i for i, beta in enumerate(trained) if not _beta(beta)), None)
        if bad is not None:
            return f"trained_betas[{bad}] = {trained[bad]!r} is not a number in (0, 1)"
    shift = config.get("shift", 1.0)
    if type(shift) not in (int, float) or not 0 < shift < math.inf:
        return f"shift = {shift!r} is not a finite number > 0"
    return None


def betas(name: str, config: Mapping[str, Any], scaled_linear_dtype: type = np.float32) -> np.ndarray:
    """The training betas. ``scaled_linear_dtype``: the CogVideoX schedulers square a float64 linspace, the
    others a float32 one."""
    count, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    if schedule == "linear":
        return np.linspace(start, end, count, dtype=np.float32)
    if schedule == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, count, dtype=scaled_linear_dtype) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), 0.999) for i in range(count)],
                          dtype=np.float32)
    raise unported(name, "beta_schedule", schedule)


def alphas_cumprod(name: str, config: Mapping[str, Any], scaled_linear_dtype: type = np.float32) -> np.ndarray:
    """The cumulative product of ``1 - betas``, in the betas' dtype, accumulated in float64 as torch's cumprod
    does."""
    alphas = 1.0 - betas(name, config, scaled_linear_dtype)
    return np.cumprod(alphas, dtype=np.float64).astype(alphas.dtype)


def spaced_timesteps(name: str, config: Mapping[str, Any], steps: int, grid: int | None = None) -> np.ndarray:
    """``steps`` training timesteps, descending, by ``timestep_spacing``. ``grid``: how many points linspace and
    leading spacing lay before keeping the first ``steps`` (UniPC lays ``steps + 1``; DDIM ``steps``)."""
    count, grid = config["num_train_timesteps"], grid or steps
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, count - 1, grid).round()[::-1][:steps].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, grid) * (count // grid)).round()[::-1][:steps].astype(np.int64) \
            + config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(count, 0, -count / steps)).astype(np.int64) - 1
    raise unported(name, "timestep_spacing", spacing, " (it implements linspace, leading, trailing)")


PREDICTIONS = ("epsilon", "sample", "v_prediction")


def predicted_original(kind: str, alpha: Any, sigma: Any, sample: np.ndarray, output: np.ndarray) -> np.ndarray:
    """x0 from the model's output at noise level ``sample = alpha * x0 + sigma * noise`` (for a flow
    ``alpha = 1 - sigma``, and a flow prediction is noise - x0)."""
    alpha, sigma = sample.dtype.type(alpha), sample.dtype.type(sigma)
    if kind == "epsilon":
        return (sample - sigma * output) / alpha
    if kind == "sample":
        return output
    if kind == "v_prediction":
        return alpha * sample - sigma * output
    return sample - sigma * output  # flow_prediction: the constructors let no other kind through


def shifted(name: str, sigmas: np.ndarray, shift: float, terminal: float | None = None) -> np.ndarray:
    """Flow-matching sigmas shifted toward noise (``shift`` > 1), then stretched so the last is
    ``1 - terminal`` when ``terminal`` (diffusers' ``shift_terminal``) is set."""
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if terminal:
        remaining = 1 - sigmas
        if remaining[-1] == 0:
            raise unported(name, "shift_terminal", terminal, " for a single step (diffusers' own stretches its "
                                                             "sigma to NaN)")
        sigmas = 1 - remaining / (remaining[-1] / (1 - terminal))
    return sigmas


class AlphaSchedule(Sampler):
    """DDIM-style sampling over the training timesteps' ``alphas_cumprod`` (which ``table`` computes), each step
    from timestep ``t`` to ``t - num_train_timesteps // steps`` (past 0: ``final_alpha_cumprod``)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.train_steps = self.config["num_train_timesteps"]
        self.alphas_cumprod = self.table()
        self.final_alpha_cumprod = np.float32(1.0) if self.config.get("set_alpha_to_one", True) \
            else self.alphas_cumprod[0]
        self.timesteps = np.arange(self.train_steps)[::-1]
        self.steps = self.train_steps

    @abc.abstractmethod
    def table(self) -> np.ndarray:
        """``alphas_cumprod`` over the training timesteps, in diffusers' dtype."""

    def set_timesteps(self, steps: int) -> None:
        timesteps = spaced_timesteps(self.name, self.config, steps)
        if timesteps.max() >= self.train_steps:  # leading spacing: steps_offset past the last training timestep
            raise CheckpointError(f"scheduler {self.name} config: steps_offset = {self.config.get('steps_offset')} at "
                                  f"{steps} steps starts at timestep {timesteps.max()}, past the last of "
                                  f"num_train_timesteps = {self.train_steps}")
        self.timesteps, self.steps = timesteps, steps

    def alphas(self, t: int) -> tuple[Any, Any]:
        """``alphas_cumprod`` at ``t`` and at the timestep the step goes to."""
        previous = t - self.train_steps // self.steps
        return self.alphas_cumprod[t], self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
