"""Use a built engine in your own denoising loop, with no other f3export machinery.

    unet = EngineUNet("artifacts/tav")                  # the pruned engine, first backend built
    noise = unet(latents, t, text_embeddings)           # torch tensors or numpy arrays in, same out

Production code can equally load the engine files directly (ONNX Runtime,
TensorRT); this helper reads the manifest to find them, refuses a build that
failed or did not finish, and serves an engine only if it hashes as built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import open_build
from .engines import make_backend
from .errors import CheckError


class EngineUNet:
    """Serves one engine of a finished build that passed, after checking its hash against the manifest."""

    def __init__(self, artifact_dir: str | Path, variant: str = "pruned", backend: str | None = None,
                 expect_sha256: str | None = None):
        build = open_build(Path(artifact_dir), expect_sha256)
        entries = [e for e in build.engines.values()
                   if e.variant == variant and (backend is None or e.backend == backend)]
        if not entries:
            raise CheckError(f"{artifact_dir}: no {variant} engine{' for ' + backend if backend else ''} "
                             "in the manifest")
        entry = build.verified_engine(entries[0].name)
        self.engine = make_backend(entry.backend, build.recipe, build.root).load(entry.path)

    def __call__(self, sample, timestep, encoder_hidden_states):
        as_torch = hasattr(sample, "detach")
        batch = sample.shape[0]
        feeds = {
            "sample": _numpy(sample),
            "timestep": np.broadcast_to(_numpy(timestep).astype(np.float32).reshape(-1), (batch,)).copy(),
            "encoder_hidden_states": _numpy(encoder_hidden_states),
        }
        out = self.engine.run(feeds)["noise_pred"]
        if as_torch:
            import torch

            return torch.from_numpy(out).to(sample.device)
        return out


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))
