"""Engine backends. Each turns an exported ONNX file into something a runtime loads, and runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .onnxruntime import OnnxRuntimeBackend


class Engine(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def engine_name(self, onnx_path: Path) -> str:
        """File name of the engine built from ``onnx_path``."""

    def build(self, onnx_path: Path, engine_path: Path) -> list[Path]:
        """Build the engine (written atomically); returns the files it wrote."""

    def load(self, engine_path: Path) -> Engine: ...

    def versions(self) -> dict[str, str]: ...


def get_backend(name: str, **options) -> Backend:
    backends = {"onnxruntime": OnnxRuntimeBackend}
    return backends[name](**options)
