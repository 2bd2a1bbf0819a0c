"""A build tool is trusted only if it never hands out a wrong engine and never loses work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from filelock import FileLock
from safetensors.torch import save_file

import f3export.build as build_module
from f3export.build import lock_file
from f3export.errors import CheckpointError
from f3export.recipe import load_recipe

from conftest import (FAST_RECIPE, ORIGINAL_STYLE_CONFIG, STAGES, TAV, assert_reruns_exactly, rebuild, run,
                      write_checkpoint)


# -- bad checkpoints: one clear line naming the file and the first bad key ---------------------------------
@pytest.fixture
def checkpoint(tmp_path, tiny_model):
    write_checkpoint(tmp_path, tiny_model, "safetensors", ORIGINAL_STYLE_CONFIG)
    return tmp_path, tmp_path / "unet" / "diffusion_pytorch_model.safetensors"


def test_truncated_safetensors_is_named(checkpoint):
    folder, weights = checkpoint
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: cannot read safetensors"):
        TAV.checkpoint.load_folder(folder)


def test_bin_that_is_not_a_state_dict_is_named(checkpoint):
    folder, weights = checkpoint
    weights.unlink()
    torch.save([torch.zeros(2)], folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: not a state dict of tensors"):
        TAV.checkpoint.load_folder(folder)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("conv_in.bias"), r"missing key 'conv_in\.bias' \(1 missing\)"),
    (lambda s: s.update({"lora.weight": torch.zeros(1)}), r"unexpected key 'lora\.weight' \(1 unexpected\)"),
])
def test_missing_and_extra_keys_name_the_first_one(checkpoint, tiny_model, change, message):
    folder, weights = checkpoint
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    change(state)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=message):
        TAV.checkpoint.load_folder(folder)


def test_config_that_does_not_parse_is_named(checkpoint):
    folder, _ = checkpoint
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unet/config\.json: not valid JSON"):
        TAV.checkpoint.load_folder(folder)


def test_bad_checkpoint_exits_2_in_one_line(checkpoint, write_recipe):
    folder, weights = checkpoint
    weights.write_bytes(b"\x00" * 16)
    path = write_recipe(FAST_RECIPE.replace('preset = "tiny"', f'path = "{folder}"'))
    done = subprocess.run([sys.executable, "-m", "f3export", "build", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "diffusion_pytorch_model.safetensors" in done.stderr and "Traceback" not in done.stderr


# -- concurrent builds ---------------------------------------------------------------------------------------
def test_second_build_into_the_same_folder_is_refused_while_the_first_holds_the_lock(write_recipe):
    path = write_recipe()
    root = path.parent / "artifacts" / "fast"
    root.mkdir(parents=True)
    lock = lock_file(load_recipe(path))
    lock.parent.mkdir(parents=True)
    with FileLock(str(lock)):
        result = run("build", path)
    assert result.exit_code == 2
    assert "another f3export build holds" in result.output
    assert not (root / "manifest.json").exists()


# -- stale caches: a change reruns exactly the stages downstream of it --------------------------------------
@pytest.mark.parametrize("override, stage", [
    ("calibration.guidance_scale=5.0", "calibrate"),
    ("model.seed=1", "calibrate"),  # other weights: every stage reading the model
    ("pruning.ratio=0.25", "plan"),
    ("export.opset=18", "export"),
    ("engine.optimization_level='basic'", "engine"),
    ("validation.export_samples=2", "validate"),
])
def test_a_changed_input_reruns_exactly_the_stages_it_reaches(rebuildable, override, stage):
    path, root = rebuildable
    before, after = rebuild(path, root, "--set", override)
    reading_weights = ["calibrate", "prune", "export", "validate"] if stage == "calibrate" and "seed" in override \
        else [stage]
    assert_reruns_exactly(before, after, {s: True for s in reading_weights})
    assert after[stage]["key"] != before[stage]["key"]


@pytest.mark.parametrize("library, stages", [
    ("torch", ["calibrate", "prune", "export", "validate"]),
    ("onnx", ["export"]),
    ("onnxruntime", ["engine", "validate"]),
    ("f3export", ["calibrate", "plan", "prune", "export", "validate"]),
])
def test_a_changed_library_version_reruns_the_stages_that_use_it(rebuildable, monkeypatch, library, stages):
    path, root = rebuildable
    real = build_module.library_versions
    monkeypatch.setattr(build_module, "library_versions", lambda: {**real(), library: "99.0"})
    if library == "onnxruntime":  # stages key on the backend's own report of its version
        from f3export.engines.onnxruntime import OnnxRuntimeBackend
        monkeypatch.setattr(OnnxRuntimeBackend, "versions", lambda self: {"onnxruntime": "99.0"})
    before, after = rebuild(path, root)
    assert_reruns_exactly(before, after, {s: True for s in stages})
    for stage in stages:
        assert after[stage]["key"] != before[stage]["key"]


# -- interruption and determinism ----------------------------------------------------------------------------
STAGE_FOLDERS = {"export": "onnx", "engine": "engines"}  # where each stage writes its models


def kill_inside(path, stage: str) -> None:
    """Start a build and SIGKILL it inside ``stage``, at a point the test sees: the build is stopped while the
    stage is writing a model (its temporary folder is there, so nothing of the stage can be recorded yet)."""
    folder = path.parent / "artifacts" / "fast" / STAGE_FOLDERS[stage]
    process = subprocess.Popen([sys.executable, "-m", "f3export", "build", str(path), "--force"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (partial := list(folder.glob(".*.tmp-*"))):
        assert process.poll() is None, f"the build ended before {stage} wrote a model"
        time.sleep(0.01)
    process.send_signal(signal.SIGSTOP)
    assert all(p.exists() for p in partial), f"{stage} finished its model before the build was stopped"
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=120) == -signal.SIGKILL


@pytest.mark.parametrize("stage", STAGE_FOLDERS)
def test_a_build_killed_mid_stage_reruns_to_the_same_result(built, write_recipe, stage):
    _, reference_root, _ = built
    path = write_recipe()
    root = path.parent / "artifacts" / "fast"
    kill_inside(path, stage)
    killed = json.loads((root / "manifest.json").read_text())
    assert killed["status"] == "building" and stage not in killed["stages"]  # never recorded as done
    result = run("build", path)
    assert result.exit_code == 0, result.output
    reference = json.loads((reference_root / "manifest.json").read_text())["stages"]
    final = json.loads((root / "manifest.json").read_text())["stages"]
    for name in STAGES:  # same content as an uninterrupted build: byte-identical files
        assert final[name]["files"] == reference[name]["files"], name
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name], "no partial file is left"


def test_same_recipe_builds_byte_identical_artifacts(built, write_recipe):
    _, reference_root, _ = built
    path = write_recipe()
    assert run("build", path).exit_code == 0
    reference = json.loads((reference_root / "manifest.json").read_text())["stages"]
    again = json.loads((path.parent / "artifacts" / "fast" / "manifest.json").read_text())["stages"]
    assert {s: again[s]["files"] for s in STAGES} == {s: reference[s]["files"] for s in STAGES}
    assert os.path.getsize(path.parent / "artifacts" / "fast" / "onnx" / "pruned.onnx") > 0


def test_a_preset_too_big_for_this_machine_is_refused_before_allocating(write_recipe, monkeypatch):
    monkeypatch.setattr("f3export.models.memory.available_memory_bytes", lambda: 1_000_000)  # 1 MB free
    result = run("build", write_recipe())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "fast.toml: [model].preset = 'tiny': its weights alone need 6 MiB, more than the 1 MiB" in result.output
