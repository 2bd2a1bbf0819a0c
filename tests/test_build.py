"""End to end: `f3export build` and `f3export check` on the tiny Tune-A-Video preset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import torch

from f3export.engines.onnxruntime import OnnxRuntimeBackend
from f3export.export import export_onnx

from conftest import FAST_RECIPE, SMALL_SHAPE, TAV, relative_l2, run


def manifest(root):
    return json.loads((root / "manifest.json").read_text())


def test_build_writes_every_artifact(built):
    _, root, output = built
    for rel in ("manifest.json", "scores.json", "plan.json", "pruned/model.safetensors", "pruned/config.json",
                "onnx/original.onnx", "onnx/pruned.onnx", "engines/pruned.ort-cpu-extended.onnx",
                "engines/original.ort-cpu-extended.onnx", "validation.json", "goldens/pruned.npz"):
        assert (root / rel).is_file(), rel
    assert not list(root.rglob(".*tmp*")), "no temporary files are left behind"
    doc = manifest(root)
    assert doc["status"] == "passed" and doc["engines"]["pruned.onnxruntime"]["good"] is True
    assert set(doc["versions"]) >= {"f3export", "torch", "onnx", "onnxruntime"}
    assert "RANDOM weights" in output and "validation gates" in output


def test_pruned_onnx_is_smaller_by_exactly_the_removed_temporal_parameters(built):
    _, root, _ = built
    params = manifest(root)["parameters"]
    plan = json.loads((root / "plan.json").read_text())
    assert plan["summary"]["removed_heads"] == 28
    assert params["torch"]["removed"] > 0
    assert params["onnx"]["original"] - params["onnx"]["pruned"] == params["torch"]["removed"]
    assert params["onnx_removed_equals_torch_removed"] is True
    model = onnx.load(str(root / "onnx/pruned.onnx"))
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in model.graph.output] == ["noise_pred"]


def test_export_fidelity_meets_the_fp32_gate(built):
    _, root, _ = built
    metrics = json.loads((root / "validation.json").read_text())["metrics"]
    for variant in ("original", "pruned"):
        assert metrics[f"export.{variant}.onnxruntime"]["rel_l2"] <= 1e-4
        assert metrics[f"export.{variant}.onnxruntime"]["nonfinite"] == 0
    assert len(metrics["pruning"]["per_run"][0]["step_cosine"]) == 3


def test_engine_runs_other_shapes_through_its_dynamic_axes(built):
    _, root, _ = built
    from f3export.prune import load_pruned

    _, _, pruned = load_pruned(root / "pruned")
    session = ort.InferenceSession(str(root / "engines/pruned.ort-cpu-extended.onnx"),
                                   providers=["CPUExecutionProvider"])
    spec = TAV.export_spec(pruned, type(SMALL_SHAPE)(frames=6, latent_height=12, latent_width=16), batch=1,
                           dynamic=[], seed=3)
    (out,) = session.run(None, {k: v.numpy() for k, v in spec.inputs.items()})
    with torch.no_grad():
        reference = pruned(**spec.inputs)
    assert out.shape == (1, 4, 6, 12, 16)
    assert relative_l2(torch.from_numpy(out), reference) < 1e-4


def test_check_passes_then_fails_on_a_corrupted_engine(built, tmp_path):
    _, root, _ = built
    copy = tmp_path / "fast"
    shutil.copytree(root, copy)
    ok = run("check", copy)
    assert ok.exit_code == 0, ok.output
    engine = copy / "engines/pruned.ort-cpu-extended.onnx"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    bad = run("check", copy)
    assert bad.exit_code == 1
    assert "pruned.ort-cpu-extended.onnx: content changed since the build" in bad.output


def test_rebuild_reuses_unchanged_stages_and_redoes_the_rest(built, tmp_path):
    recipe, root, _ = built
    work = tmp_path / "artifacts"
    shutil.copytree(root, work / "fast")
    moved = tmp_path / "fast.toml"
    moved.write_text(recipe.read_text().replace(str(root.parent), str(work)))
    before = manifest(work / "fast")["stages"]
    assert run("build", moved).exit_code == 0
    assert manifest(work / "fast")["stages"] == before  # every stage reused: nothing rewritten

    assert run("build", moved, "--set", "pruning.ratio=0.25").exit_code == 0
    after = manifest(work / "fast")["stages"]
    assert after["calibrate"] == before["calibrate"]
    assert all(after[s]["key"] != before[s]["key"] for s in ("plan", "prune", "export", "engine", "validate"))


def test_failed_gate_fails_the_build_and_marks_engines_not_good(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("pruning_min_latent_psnr = 5.0", "pruning_min_latent_psnr = 500.0"))
    result = run("build", path)
    assert result.exit_code == 1
    assert "pruning.latent_psnr_min" in result.output and "FAIL" in result.output
    doc = manifest(path.parent / "artifacts" / "fast")
    assert doc["status"] == "failed" and doc["engines"]["pruned.onnxruntime"]["good"] is False


def test_external_data_export_is_checked_and_runs(tmp_path, tiny_model):
    spec = TAV.export_spec(tiny_model, SMALL_SHAPE, batch=2, dynamic=["batch", "frames"])
    info = export_onnx(tiny_model, spec, tmp_path / "model.onnx", opset=17, external_data="always")
    assert info.external_data and [f.name for f in info.files] == ["model.onnx", "model.onnx.data"]
    stored = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer
    external = [i for i in stored if i.data_location == onnx.TensorProto.EXTERNAL]
    entries = [{e.key: int(e.value) for e in i.external_data if e.key != "location"} for i in external]
    assert sum(e["length"] for e in entries) == sum(np.prod(i.dims) for i in external) * 4  # fp32, each once
    assert all(e["offset"] % 4096 == 0 for e in entries)  # every tensor starts on a page: a runtime can map it
    assert max(e["offset"] + e["length"] for e in entries) == (tmp_path / "model.onnx.data").stat().st_size
    assert sum(np.prod(i.dims) for i in external) > 0.99 * sum(p.numel() for p in tiny_model.parameters())
    backend = OnnxRuntimeBackend()
    files = backend.build(tmp_path / "model.onnx", tmp_path / "engine.onnx")
    assert [f.name for f in files] == ["engine.onnx", "engine.onnx.data"]
    out = backend.load(tmp_path / "engine.onnx").run({k: v.numpy() for k, v in spec.inputs.items()})
    with torch.no_grad():
        reference = tiny_model(**spec.inputs)
    assert relative_l2(torch.from_numpy(out["noise_pred"]), reference) < 1e-4
    assert np.isfinite(out["noise_pred"]).all()


def test_runtime_helper_runs_the_engine_in_a_denoising_loop(built):
    from f3export.prune import load_pruned
    from f3export.runtime import EngineUNet

    _, root, _ = built
    unet = EngineUNet(root)
    _, _, pruned = load_pruned(root / "pruned")
    spec = TAV.export_spec(pruned, SMALL_SHAPE, batch=2, dynamic=[], seed=11)
    noise = unet(spec.inputs["sample"], 500, spec.inputs["encoder_hidden_states"])
    with torch.no_grad():
        reference = pruned(spec.inputs["sample"], torch.tensor([500.0, 500.0]), spec.inputs["encoder_hidden_states"])
    assert isinstance(noise, torch.Tensor) and relative_l2(noise, reference) < 1e-4


def test_check_of_a_manifest_from_another_version_is_one_clear_line(built, tmp_path):
    _, root, _ = built
    copy = tmp_path / "fast"
    shutil.copytree(root, copy)
    doc = manifest(copy)
    doc["versions"]["f3export"] = "0.0.9"
    doc["recipe"]["engine"]["retired_option"] = 1
    (copy / "manifest.json").write_text(json.dumps(doc))
    result = run("check", copy)
    assert result.exit_code == 2
    assert "built by f3export '0.0.9', whose recipe does not match this f3export" in result.output
