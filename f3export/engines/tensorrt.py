"""TensorRT engines for NVIDIA GPUs, built through Polygraphy's backend API.

One optimization profile spans the recipe's min/opt/max of every dynamic
axis; the engine file name carries the TensorRT version, the GPU's compute
capability, the precision and a hash of the ONNX content and every builder
setting, so a stale engine can never be picked up for a changed input.
In fp16/bf16, the known overflow points of diffusion networks (normalisation
layers, softmax and the reductions around them) can be pinned to fp32.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..artifacts import content_key, sha256_file, staged_model
from ..errors import BackendUnavailable, CheckpointError

CUDA_ATTR_CC_MAJOR, CUDA_ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int


def input_profile(onnx_path: Path, ranges: dict[str, AxisRange]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input, from its named dynamic axes and the recipe's ranges."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    profile = {}
    for graph_input in model.graph.input:
        shapes: list[list[int]] = [[], [], []]
        for dim in graph_input.type.tensor_type.shape.dim:
            if dim.dim_param:
                if dim.dim_param not in ranges:
                    raise CheckpointError(f"{onnx_path}: input {graph_input.name!r} has dynamic axis "
                                          f"{dim.dim_param!r}, which has no profile range (ranges: "
                                          f"{', '.join(ranges) or 'none'})")
                r = ranges[dim.dim_param]
                values = (r.min, r.opt, r.max)
            else:
                values = (dim.dim_value,) * 3
            for shape, value in zip(shapes, values):
                shape.append(value)
        profile[graph_input.name] = tuple(tuple(s) for s in shapes)
    return profile


def engine_file_name(onnx_path: Path, settings: dict, versions: dict[str, str]) -> str:
    """``<stem>.trt<version>-sm<cc>-<precision>-<key>.plan``; the key hashes the ONNX content and settings."""
    key = content_key(sha256_file(onnx_path), settings, versions)[:8]
    return (f"{onnx_path.stem}.trt{versions['tensorrt']}-sm{versions['compute_capability']}-"
            f"{settings['precision']}-{key}.plan")


def _compute_capability() -> str:
    """Compute capability of CUDA device 0 (e.g. "90"), through the CUDA runtime Polygraphy loads."""
    from polygraphy import cuda

    cudart = cuda.wrapper().handle
    count, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise OSError("no CUDA device visible")
    cudart.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_ATTR_CC_MAJOR, 0)
    cudart.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_ATTR_CC_MINOR, 0)
    return f"{major.value}{minor.value}"


def _require_tensorrt():
    """The tensorrt module and the GPU's compute capability, or one line with the real reason why not: a package
    missing (tensorrt, or polygraphy, which builds and runs its engines), else no CUDA GPU."""
    try:
        import tensorrt as trt
        import polygraphy  # noqa: F401  (imported here so that its absence is not reported as a missing GPU)
    except ImportError as exc:
        missing = f"{exc.name} is not installed" if isinstance(exc, ModuleNotFoundError) else \
            f"tensorrt cannot be imported ({_first_line(exc)})"
        raise BackendUnavailable(f"[engine] backend 'tensorrt': {missing} (pip install -e '.[tensorrt]' in "
                                 "f3export's checkout, on a machine with an NVIDIA GPU)") from None
    try:
        return trt, _compute_capability()
    except Exception as exc:  # Polygraphy reports a missing CUDA runtime with its own exception type
        raise BackendUnavailable(f"[engine] backend 'tensorrt': no CUDA GPU ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class TensorRTRunner:
    """Runs an engine on numpy inputs (Polygraphy copies them to and from the GPU)."""

    def __init__(self, engine_path: Path):
        from polygraphy.backend.trt import EngineFromPath, TrtRunner

        self.runner = TrtRunner(EngineFromPath(str(engine_path)))
        self.runner.activate()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.runner.infer(inputs, copy_outputs_to_host=True).items()}

    def __del__(self):
        if getattr(self, "runner", None) is not None and self.runner.is_active:
            self.runner.deactivate()


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, ranges: dict[str, AxisRange], precision: str = "fp16", builder_optimization_level: int = 3,
                 fp32_norms: bool = True, timing_cache: Path | None = None):
        self.trt, self.compute_capability = _require_tensorrt()
        self.ranges = ranges
        self.precision = precision
        self.level = builder_optimization_level
        self.fp32_norms = fp32_norms and precision != "fp32"
        self.timing_cache = timing_cache

    def settings(self) -> dict:
        return {"precision": self.precision, "builder_optimization_level": self.level,
                "fp32_norms": self.fp32_norms, "ranges": {k: vars(v) for k, v in self.ranges.items()}}

    def engine_name(self, onnx_path: Path) -> str:
        return engine_file_name(onnx_path, self.settings(), self.versions())

    def _keep_overflow_points_fp32(self, network) -> None:
        trt = self.trt
        risky = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in risky:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)

    def build(self, onnx_path: Path, engine_path: Path) -> list[Path]:
        from polygraphy.backend.trt import (CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessNetwork,
                                            Profile, SaveEngine)

        profile = Profile()
        for name, (low, opt, high) in input_profile(onnx_path, self.ranges).items():
            profile.add(name, min=low, opt=opt, max=high)
        network = NetworkFromOnnxPath(str(onnx_path))
        if self.fp32_norms:
            network = PostprocessNetwork(network, lambda network: self._keep_overflow_points_fp32(network))
        cache = str(self.timing_cache) if self.timing_cache else None
        config = CreateConfig(fp16=self.precision == "fp16", bf16=self.precision == "bf16", profiles=[profile],
                              precision_constraints="obey" if self.fp32_norms else None,
                              builder_optimization_level=self.level,
                              load_timing_cache=cache if cache and Path(cache).exists() else None)
        with staged_model(engine_path) as tmp:
            engine = EngineFromNetwork(network, config=config, save_timing_cache=cache)
            SaveEngine(engine, str(tmp / engine_path.name))()
        return [engine_path]

    def load(self, engine_path: Path) -> TensorRTRunner:
        return TensorRTRunner(engine_path)

    def versions(self) -> dict[str, str]:
        return {"tensorrt": self.trt.__version__, "compute_capability": self.compute_capability}
