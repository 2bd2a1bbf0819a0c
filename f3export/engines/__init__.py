"""Engine backends. Each turns an exported ONNX file into something a runtime loads, and runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..recipe import Recipe


COMPONENT_BACKEND = "onnxruntime"  # the text encoder's and VAE decoder's engines (TensorRT ones: not yet)


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
    """min/opt/max of every axis: the recipe's profile lists, else static at the export shape.

    These are the ranges every backend's engine is validated over (``validated_shapes``); TensorRT also
    builds its optimization profile from them.
    """
    from .tensorrt import AxisRange

    export = recipe.export_shape
    return {axis: AxisRange(*(getattr(recipe.engine, f"profile_{axis}") or [export[axis]] * 3)) for axis in export}


def validated_shapes(recipe: Recipe) -> list[dict[str, int]]:
    """The shapes every engine is validated at: the export shape, then every axis at its range's min,
    then every axis at its max (duplicates dropped: without profile_* keys, the export shape alone)."""
    ranges = profile_ranges(recipe)
    shapes = [recipe.export_shape, {a: r.min for a, r in ranges.items()}, {a: r.max for a, r in ranges.items()}]
    return [shape for i, shape in enumerate(shapes) if shape not in shapes[:i]]


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
