"""ONNX Runtime: the embedded default engine.

The engine is the model as ONNX Runtime optimised it for the chosen
optimization level, saved so production loads it without re-optimising.
Levels above ``extended`` insert layout-specific kernels: such an engine
runs only on the kind of machine that built it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from ..artifacts import staged_model
from ..errors import BackendUnavailable, EngineError

LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ERROR_SEVERITY = 3  # keep ORT's optimizer notes off the console


@contextlib.contextmanager
def refusals(path: Path, operation: str) -> Iterator[None]:
    """ONNX Runtime's own exceptions (a pybind class per status code) as one line naming the file."""
    try:
        yield
    except Exception as exc:
        # ORT's Python layer checks feeds with ValueError/TypeError; everything under the block is ORT's call.
        if not (type(exc).__module__.startswith("onnxruntime") or isinstance(exc, (ValueError, TypeError))):
            raise
        reason = " ".join(str(exc).split())[:300]
        raise EngineError(f"{path}: ONNX Runtime refused to {operation} ({reason})") from None


def resolve_providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "auto":
        return [p for p in (PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in available]
    if PROVIDERS[device] not in available:
        raise BackendUnavailable(f"[engine].device = {device!r}: onnxruntime here offers only {', '.join(available)}")
    return [PROVIDERS[device]] + ([PROVIDERS["cpu"]] if device != "cpu" else [])


class OnnxRuntimeSession:
    """A session whose intra-op threads sleep between runs instead of spinning on their cores: a spinning
    session takes the cores that anything else in the process (PyTorch, a second session timed in turn with
    it) runs on (measured on 2 cores: 178 ms a run without spinning, 290 ms with)."""

    def __init__(self, path: Path, providers: list[str], level: str = "extended", threads: int = 0):
        options = ort.SessionOptions()
        options.log_severity_level = ERROR_SEVERITY
        options.graph_optimization_level = LEVELS[level]
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        with refusals(path, "load the model"):
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with refusals(self.path, "run the model on these inputs"):
            return dict(zip(self.output_names, self.session.run(None, inputs)))


class OnnxRuntimeBackend:
    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, device: str = "cpu", optimization_level: str = "extended"):
        self.device = device
        self.level = optimization_level
        self.providers = resolve_providers(device)

    def engine_name(self, onnx_path: Path) -> str:
        device = self.providers[0].removesuffix("ExecutionProvider").lower()
        return f"{onnx_path.stem}.ort-{device}-{self.level}.onnx"

    def build(self, onnx_path: Path, engine_path: Path) -> list[Path]:
        external = (onnx_path.parent / (onnx_path.name + ".data")).exists()
        data_name = engine_path.name + ".data"
        with staged_model(engine_path) as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = ERROR_SEVERITY
            options.graph_optimization_level = LEVELS[self.level]
            options.optimized_model_filepath = str(tmp / engine_path.name)
            if external:
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 data_name)
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            with refusals(onnx_path, "optimise the model"):
                ort.InferenceSession(str(onnx_path), options, providers=self.providers)
        return [engine_path] + ([engine_path.parent / data_name] if external else [])

    def load(self, engine_path: Path) -> OnnxRuntimeSession:
        return OnnxRuntimeSession(engine_path, self.providers, self.level)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": ort.__version__}
