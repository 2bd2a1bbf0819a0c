"""TensorRT: profiles and cache keys everywhere; real engines where TensorRT and a GPU are present."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from f3export.cli import main
from f3export.engines import profile_ranges
from f3export.engines.tensorrt import AxisRange, engine_file_name, input_profile
from f3export.errors import BackendUnavailable
from f3export.export import export_onnx
from f3export.recipe import load_recipe

from conftest import SMALL_SHAPE, TAV


def tensorrt_unavailable_reason() -> str | None:
    from f3export.engines.tensorrt import _require_tensorrt

    try:
        _require_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    return None


UNAVAILABLE = tensorrt_unavailable_reason()
needs_gpu = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"TensorRT cannot run here: {UNAVAILABLE}")


def test_profile_is_static_at_the_export_shape_unless_the_recipe_widens_it(write_recipe):
    recipe = load_recipe(write_recipe(), ["engine.profile_frames=[2, 4, 16]"])
    ranges = profile_ranges(recipe)
    assert ranges["batch"] == AxisRange(2, 2, 2)
    assert ranges["frames"] == AxisRange(2, 4, 16)
    assert ranges["height"] == AxisRange(8, 8, 8) and ranges["width"] == AxisRange(8, 8, 8)


def test_profile_rejects_ranges_that_are_not_min_opt_max(write_recipe):
    from f3export.errors import RecipeError

    with pytest.raises(RecipeError, match=r"\[engine\]\.profile_batch = \[4, 2, 8\]: expected \[min, opt, max\]"):
        load_recipe(write_recipe(), ["engine.profile_batch=[4, 2, 8]"])


def test_input_profile_follows_the_onnx_named_dynamic_axes(tmp_path, tiny_model):
    spec = TAV.export_spec(tiny_model, SMALL_SHAPE, batch=2, dynamic=["batch", "frames"])
    info = export_onnx(tiny_model, spec, tmp_path / "m.onnx", 17, "auto")
    ranges = {"batch": AxisRange(1, 2, 4), "frames": AxisRange(2, 4, 8)}
    profile = input_profile(info.path, ranges)
    assert profile["sample"] == ((1, 4, 2, 8, 8), (2, 4, 4, 8, 8), (4, 4, 8, 8, 8))
    assert profile["timestep"] == ((1,), (2,), (4,))
    assert profile["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (4, 77, 32))


def test_engine_name_changes_with_onnx_content_builder_settings_and_gpu(tmp_path):
    onnx_a, onnx_b = tmp_path / "a" / "pruned.onnx", tmp_path / "b" / "pruned.onnx"
    for path, content in ((onnx_a, b"graph one"), (onnx_b, b"graph two")):
        path.parent.mkdir()
        path.write_bytes(content)
    settings = {"precision": "fp16", "builder_optimization_level": 3, "fp32_norms": True, "ranges": {}}
    versions = {"tensorrt": "10.9.0", "compute_capability": "90"}
    name = engine_file_name(onnx_a, settings, versions)
    assert name.startswith("pruned.trt10.9.0-sm90-fp16-") and name.endswith(".plan")
    assert engine_file_name(onnx_a, settings, versions) == name
    assert engine_file_name(onnx_b, settings, versions) != name
    assert engine_file_name(onnx_a, {**settings, "builder_optimization_level": 5}, versions) != name
    assert engine_file_name(onnx_a, settings, {**versions, "compute_capability": "89"}) != name


@pytest.mark.skipif(UNAVAILABLE is None, reason="TensorRT and a GPU are present")
def test_tensorrt_where_it_cannot_run_fails_before_any_work(write_recipe):
    path = write_recipe()
    result = CliRunner().invoke(main, ["build", str(path), "--set", "engine.backends=['onnxruntime', 'tensorrt']"])
    assert result.exit_code == 2
    assert result.output.startswith("error: [engine] backend 'tensorrt': ")
    assert len(result.output.strip().splitlines()) == 1
    assert not (path.parent / "artifacts" / "fast" / "manifest.json").exists()


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_tune_a_video_engine_passes_validation_on_the_gpu(write_recipe, precision):
    path = write_recipe()
    args = ["build", str(path), "--set", "engine.backends=['onnxruntime', 'tensorrt']",
            "--set", f"engine.precision='{precision}'", "--set", "engine.profile_batch=[1, 2, 4]"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    root = path.parent / "artifacts" / "fast"
    metrics = json.loads((root / "validation.json").read_text())["metrics"]
    assert metrics["export.pruned.tensorrt"]["nonfinite"] == 0
    assert CliRunner().invoke(main, ["check", str(root)]).exit_code == 0


@needs_gpu
def test_changed_builder_flag_rebuilds_the_engine(write_recipe):
    path = write_recipe()
    base = ["build", str(path), "--set", "engine.backend='tensorrt'", "--set", "engine.precision='fp32'"]
    assert CliRunner().invoke(main, base).exit_code == 0
    root = path.parent / "artifacts" / "fast"
    first = json.loads((root / "manifest.json").read_text())["stages"]["engine"]
    assert CliRunner().invoke(main, base).exit_code == 0
    assert json.loads((root / "manifest.json").read_text())["stages"]["engine"] == first
    assert CliRunner().invoke(main, base + ["--set", "engine.builder_optimization_level=1"]).exit_code == 0
    second = json.loads((root / "manifest.json").read_text())["stages"]["engine"]
    assert second["key"] != first["key"] and set(second["files"]) != set(first["files"])
