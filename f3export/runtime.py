"""Use a built engine in your own loop, with no other f3export machinery.

    unet = EngineUNet("artifacts/tav")                  # the pruned engine, first backend built
    noise = unet(latents, t, text_embeddings)           # torch tensors or numpy arrays in, same out

    model = EngineRunner("artifacts/cogvideo")          # any family: inputs by the engine contract's names
    logits = model(tokens=tokens, text_len=text_len)    # or positionally, in the contract's order

    unet = denoiser("artifacts/tav")                    # the pruned engine, or under a step schedule
                                                        # ([pruning].pruned_steps) both engines switched by timestep

Inputs are taken by the names and order of the build's engine contract, cast to its dtypes; a 1-D input
given as one value (a timestep, a text length) is repeated over the batch. One output is returned as is,
several as a dict by name. Production code can equally load the engine files directly (ONNX Runtime,
TensorRT); this helper reads the manifest to find them, refuses a build that failed or did not finish,
and serves an engine only if it hashes as built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import MANIFEST, FinishedBuild, open_build
from .engines import COMPONENT_BACKEND, make_backend
from .errors import CheckError, ShapeError
from .schedule import ScheduledDenoiser, StepSchedule


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the engine contract."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]  # a static axis as its size, a dynamic one as its name

    @property
    def rank(self) -> int:
        return len(self.shape)

    def shown(self) -> str:
        return f"[{', '.join(map(str, self.shape))}]"

    def validated_sizes(self, index: int, ranges: dict[str, tuple[int, int]]) -> tuple[int, int]:
        """The [min, max] the build validated axis ``index`` at: a static size, or its named axis's range."""
        axis = self.shape[index]
        return (axis, axis) if isinstance(axis, int) else ranges[axis]


def _is_axis(axis: Any) -> bool:
    """A contract shape's entry: a static size or an axis name."""
    if isinstance(axis, str):
        return axis != ""
    return isinstance(axis, int) and not isinstance(axis, bool) and axis >= 0


def _tensor(raw: Any) -> TensorSpec:
    """One ``{name, dtype, shape}`` entry of a manifest, checked (TypeError or ValueError where malformed)."""
    if not isinstance(raw["name"], str) or not isinstance(raw["shape"], list) or not all(map(_is_axis, raw["shape"])):
        raise ValueError(raw)
    return TensorSpec(raw["name"], np.dtype(raw["dtype"]), tuple(raw["shape"]))


def contract_tensors(build: FinishedBuild, kind: str, section: tuple[str, ...] = ("contract",)) -> list[TensorSpec]:
    """The ``inputs`` or ``outputs`` of the engine contract (or of ``("components", name)``), checked (the manifest
    is untrusted input)."""
    where = f"{build.root / MANIFEST}: {'.'.join(section)}.{kind}"
    try:
        table = build.doc
        for key in section:
            table = table[key]
        return [_tensor(t) for t in table[kind]]
    except (KeyError, TypeError, ValueError):
        raise CheckError(f"{where}: missing or malformed (a list of {{name, dtype, shape}}, a shape of sizes and "
                         "axis names)") from None


def validated_ranges(build: FinishedBuild, tensors: list[TensorSpec]) -> dict[str, tuple[int, int]]:
    """The [min, max] the build validated each named axis of its engine contract over (``contract.dynamic_axes``);
    every named axis of ``tensors`` has one, as the build records it."""
    where = f"{build.root / MANIFEST}: contract.dynamic_axes"
    raw = build.doc["contract"].get("dynamic_axes")
    if not isinstance(raw, dict) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
            and 1 <= r[0] <= r[1] for r in raw.values()):
        raise CheckError(f"{where}: missing or malformed (each axis name's validated [min, max])")
    for t in tensors:
        for axis in t.shape:
            if isinstance(axis, str) and axis not in raw:
                raise CheckError(f"{where}: no validated range of axis {axis!r} (of {t.name!r})")
    return {axis: (low, high) for axis, (low, high) in raw.items()}


class EngineRunner:
    """Serves one engine of a finished build that passed, after checking its hash against the manifest:
    the denoiser's (``variant`` "pruned" or "original") or a pipeline component's ("text_encoder",
    "vae_decoder": the ONNX Runtime engine the build made and checked for it)."""

    def __init__(self, artifact_dir: str | Path, variant: str = "pruned", backend: str | None = None,
                 expect_sha256: str | None = None):
        build = open_build(Path(artifact_dir), expect_sha256, runtime=True)
        components = build.doc.get("components") or {}
        if isinstance(components, dict) and variant in components and backend in (None, COMPONENT_BACKEND):
            section = ("components", variant)
            path, backend = build.component_engine(variant), COMPONENT_BACKEND
        else:
            entries = [e for e in build.engines.values()
                       if e.variant == variant and (backend is None or e.backend == backend)]
            if not entries:
                raise CheckError(f"{artifact_dir}: no {variant} engine{' for ' + backend if backend else ''} "
                                 "in the manifest")
            entry = build.verified_engine(entries[0].name)
            section, path, backend = ("contract",), entry.path, entry.backend
        self.root = build.root
        self.inputs, self.outputs = (contract_tensors(build, kind, section) for kind in ("inputs", "outputs"))
        # a component's engine records no ranges (its axes were checked at the export's and validation's sizes)
        self.ranges = validated_ranges(build, self.inputs + self.outputs) if section == ("contract",) else {}
        self.engine = make_backend(backend, build.recipe, build.root).load(path)
        contract = build.doc.get("contract")
        conventions = contract.get("conventions") if isinstance(contract, dict) else None
        self.step_schedule = conventions.get("step_schedule") if isinstance(conventions, dict) else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = [t.name for t in self.inputs]
        if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
            raise TypeError(f"the engine takes {', '.join(names)}")
        given = {**dict(zip(names, args)), **kwargs}
        missing = [n for n in names if n not in given]
        if missing:
            raise TypeError(f"missing engine input(s) {', '.join(missing)}")
        device = next((v.device for v in given.values() if hasattr(v, "detach")), None)
        feeds = {t.name: _numpy(given[t.name], t.dtype) for t in self.inputs}
        first, batch = feeds[names[0]], self.inputs[0].shape[0] if self.inputs[0].rank else None
        for t in self.inputs:
            if t.rank == 1 and t.shape[0] == batch and feeds[t.name].size == 1 and first.ndim:
                # one value for every row of the batch (an input whose axis is another, [2] weights, stays)
                feeds[t.name] = np.broadcast_to(feeds[t.name].reshape(-1), first.shape[:1]).copy()
        self._refuse_unvalidated(feeds)
        out = self.engine.run(feeds)
        if device is not None:
            import torch

            out = {name: torch.from_numpy(value).to(device) for name, value in out.items()}
        return out[self.outputs[0].name] if len(self.outputs) == 1 else {t.name: out[t.name] for t in self.outputs}

    def _refuse_unvalidated(self, feeds: dict[str, np.ndarray]) -> None:
        """Inputs at a shape the build never validated its engine at are refused, not run: nothing vouches for
        the engine's output there (a TensorRT profile or a graph may even accept them). Each input has the
        contract's rank, a static axis its size, a dynamic axis a size in its validated range and the same size
        in every input that has it."""
        seen: dict[str, tuple[int, str]] = {}
        for t in self.inputs:
            shape = feeds[t.name].shape
            where = f"{self.root}: input {t.name!r}"
            if len(shape) != t.rank:
                raise ShapeError(f"{where} has shape {list(shape)}; the engine takes {t.rank} axes {t.shown()}")
            for index, (size, axis) in enumerate(zip(shape, t.shape)):
                if isinstance(axis, int):
                    if size != axis:
                        raise ShapeError(f"{where}: axis {index} is {size}; the engine takes {axis} only "
                                         f"(shape {t.shown()})")
                    continue
                low, high = self.ranges.get(axis, (size, size))  # a component's axis: no recorded range
                if not low <= size <= high:
                    raise ShapeError(f"{where}: axis {axis!r} is {size}, outside the range the build validated, "
                                     f"[{low}, {high}]")
                other, owner = seen.setdefault(axis, (size, t.name))
                if size != other:
                    raise ShapeError(f"{where}: axis {axis!r} is {size}, but input {owner!r} has {axis} = {other} "
                                     "(an axis has one size in every input)")


EngineUNet = EngineRunner  # the name of the diffusion families' denoising loop: noise = unet(sample, t, context)


def denoiser(artifact_dir: str | Path, variant: str = "pruned", backend: str | None = None) -> Any:
    """What a build deploys as ``variant``: its engine; for "pruned" under a step schedule (the contract's
    ``conventions.step_schedule``), the pruned and original engines, switched by each call's timestep."""
    runner = EngineRunner(artifact_dir, variant, backend)
    if variant != "pruned" or runner.step_schedule is None:
        return runner
    try:
        parsed = StepSchedule.from_json(runner.step_schedule)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckError(f"{Path(artifact_dir) / 'manifest.json'}: contract.conventions.step_schedule: malformed "
                         f"({exc})") from None
    return ScheduledDenoiser(EngineRunner(artifact_dir, "original", backend), runner, parsed)


def _numpy(value: Any, dtype: np.dtype) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype, order="C")  # ascontiguousarray would make a 0-d input 1-d
