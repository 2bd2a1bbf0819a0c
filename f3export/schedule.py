"""Step schedules: the pruned model at some denoising steps, the original at the others.

Temporal attention changes least through the middle of sampling (PAB's broadcast ranges), so a pruned model
may be good enough there and not at the first steps, which lay out the motion. ``[pruning] pruned_steps =
[start, stop]`` is a stretch of the trajectory in fractions of it; a call runs the pruned model where its timestep's
position in the trajectory, ``1 - t / num_train_timesteps``, lies in [start, stop) (stop 1 included). The
rule reads the timestep alone, so PyTorch validation, the engines-only ``generate`` and a diffusers pipeline
driving the drop-in denoiser all switch at the same calls, at any step count.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

FULL = (0.0, 1.0)


class StepSchedule(NamedTuple):
    """The stretch [start, stop) of the trajectory (fractions) that runs the pruned model."""

    start: float
    stop: float
    train_timesteps: int  # the scheduler's num_train_timesteps

    @property
    def full(self) -> bool:
        return (self.start, self.stop) == FULL

    def prunes(self, timestep: float) -> bool:
        position = 1.0 - float(timestep) / self.train_timesteps
        return self.start <= position and (position < self.stop or self.stop >= 1.0)

    def share(self, timesteps: Iterable[float]) -> float:
        """The fraction of a trajectory's steps (its ``timesteps``) that run the pruned model."""
        listed = [float(t) for t in timesteps]
        return sum(map(self.prunes, listed)) / len(listed)

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "num_train_timesteps": self.train_timesteps,
                "pruned_when": "start <= 1 - timestep / num_train_timesteps < stop (stop 1 included); the "
                               "original engine at every other call"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StepSchedule":
        """From a contract (untrusted): ValueError where a field is missing or out of range."""
        start, stop, train = float(data["start"]), float(data["stop"]), int(data["num_train_timesteps"])
        if not (0.0 <= start < stop <= 1.0 and train > 0):
            raise ValueError(f"step schedule [{start}, {stop}] over {train} timesteps")
        return cls(start, stop, train)


class ScheduledDenoiser:
    """Called as a denoiser (``sample, timestep, ...``): ``pruned`` where the schedule prunes the call's
    timestep, ``original`` elsewhere (PyTorch models or engines alike)."""

    def __init__(self, original: Any, pruned: Any, schedule: StepSchedule):
        self.original, self.pruned, self.schedule = original, pruned, schedule

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        first = timestep.reshape(-1)[0] if hasattr(timestep, "reshape") else timestep
        model = self.pruned if self.schedule.prunes(float(first)) else self.original
        return model(*args, **kwargs)


def scheduled(adapter: Any, bundle: Any, pruned: Any, steps: Iterable[float]) -> Any:
    """What runs a build's pruned denoising: ``pruned`` itself, or, under a step schedule, it and the original
    (``bundle.model``) switched by the family's scheduler's timesteps."""
    start, stop = steps
    if (start, stop) == FULL:
        return pruned
    train = int(adapter.scheduler(bundle).config["num_train_timesteps"])
    return ScheduledDenoiser(bundle.model, pruned, StepSchedule(float(start), float(stop), train))
