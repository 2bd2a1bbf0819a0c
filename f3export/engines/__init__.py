"""Engine backends. Each turns an exported ONNX file into something a runtime loads, and runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..recipe import Recipe


class Engine(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str
    precision: str  # "fp32", "fp16" or "bf16": selects the validation tolerances

    def engine_name(self, onnx_path: Path) -> str:
        """File name of the engine built from ``onnx_path``."""

    def build(self, onnx_path: Path, engine_path: Path) -> list[Path]:
        """Build the engine (written atomically); returns the files it wrote."""

    def load(self, engine_path: Path) -> Engine: ...

    def versions(self) -> dict[str, str]: ...


def profile_ranges(recipe: Recipe):
    """min/opt/max of every axis: the recipe's profile lists, else static at the export shape."""
    from .tensorrt import AxisRange

    engine, model = recipe.engine, recipe.model
    opt = {"batch": recipe.export.batch, "frames": model.frames, "height": model.latent_height,
           "width": model.latent_width}
    return {axis: AxisRange(*(getattr(engine, f"profile_{axis}") or [opt[axis]] * 3)) for axis in opt}


def make_backend(name: str, recipe: Recipe, root: Path) -> Backend:
    """The backend ``name`` configured from the recipe; raises BackendUnavailable where it cannot run."""
    engine = recipe.engine
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(device=engine.device, optimization_level=engine.optimization_level)
    from .tensorrt import TensorRTBackend

    return TensorRTBackend(profile_ranges(recipe), precision=engine.precision,
                           builder_optimization_level=engine.builder_optimization_level,
                           fp32_norms=engine.fp32_norms, timing_cache=root / "engines" / "timing.cache")
