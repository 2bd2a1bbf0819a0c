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

from .artifacts import FinishedBuild, open_build
from .engines import COMPONENT_BACKEND, make_backend
from .errors import CheckError
from .schedule import ScheduledDenoiser, StepSchedule


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the engine contract."""

    name: str
    dtype: np.dtype
    rank: int


def contract_tensors(build: FinishedBuild, kind: str, section: str = "contract") -> list[TensorSpec]:
    """The ``inputs`` or ``outputs`` of the engine contract (or of ``components.<name>``), checked (the manifest
    is untrusted input)."""
    where = f"{build.root / 'manifest.json'}: {section}.{kind}"
    try:
        table = build.doc
        for key in section.split("."):
            table = table[key]
        return [TensorSpec(t["name"], np.dtype(t["dtype"]), len(t["shape"])) for t in table[kind]]
    except (KeyError, TypeError, ValueError):
        raise CheckError(f"{where}: missing or malformed (a list of {{name, dtype, shape}})") from None


class EngineRunner:
    """Serves one engine of a finished build that passed, after checking its hash against the manifest:
    the denoiser's (``variant`` "pruned" or "original") or a pipeline component's ("text_encoder",
    "vae_decoder": the ONNX Runtime engine the build made and checked for it)."""

    def __init__(self, artifact_dir: str | Path, variant: str = "pruned", backend: str | None = None,
                 expect_sha256: str | None = None):
        build = open_build(Path(artifact_dir), expect_sha256, runtime=True)
        components = build.doc.get("components") or {}
        if isinstance(components, dict) and variant in components and backend in (None, COMPONENT_BACKEND):
            section = f"components.{variant}"
            path, backend = build.component_engine(variant), COMPONENT_BACKEND
        else:
            entries = [e for e in build.engines.values()
                       if e.variant == variant and (backend is None or e.backend == backend)]
            if not entries:
                raise CheckError(f"{artifact_dir}: no {variant} engine{' for ' + backend if backend else ''} "
                                 "in the manifest")
            entry = build.verified_engine(entries[0].name)
            section, path, backend = "contract", entry.path, entry.backend
        self.inputs, self.outputs = (contract_tensors(build, kind, section) for kind in ("inputs", "outputs"))
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
        batch = feeds[names[0]].shape[0]
        for t in self.inputs:
            if t.rank == 1 and feeds[t.name].size == 1:  # one value for every row of the batch
                feeds[t.name] = np.broadcast_to(feeds[t.name].reshape(-1), (batch,)).copy()
        out = self.engine.run(feeds)
        if device is not None:
            import torch

            out = {name: torch.from_numpy(value).to(device) for name, value in out.items()}
        return out[self.outputs[0].name] if len(self.outputs) == 1 else {t.name: out[t.name] for t in self.outputs}


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
    return np.ascontiguousarray(np.asarray(value, dtype=dtype))
