"""Cache keys cover every file of the model folder a stage reads, and no other file.

The network (unet config and weights) is read by calibrate, prune, export and validate; the files of the
sampling loop (scheduler config, tokenizer, text encoder) and the token files only by the stages that run
trajectories: calibrate and validate. A changed file reruns those stages, and a stage downstream of them
only if the files it consumes changed (``assert_reruns_exactly``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from f3export.models.tune_a_video import TINY

from conftest import (COGVIDEO_TOKENS_RECIPE, FAST_RECIPE, ORIGINAL_STYLE_CONFIG, STAGES, TAV, assert_reruns_exactly,
                      rebuild, run, write_checkpoint, write_clip)

NETWORK_READERS = ["calibrate", "prune", "export", "validate"]
TEXT_ENCODER_READERS = ["calibrate", "export", "validate"]  # export: deploys the text encoder and tokenizer
SCHEDULER_READERS = ["calibrate", "export", "validate"]  # export: the engine contract records the scheduler


@pytest.fixture(scope="module")
def tav_folder_build(tmp_path_factory, tiny_bundle) -> Path:
    """A finished build of a Tune-A-Video folder with a DDIM scheduler config, a CLIP tokenizer and text encoder.

    Everything lives under one folder (recipe, model/, artifacts/), so ``copy_build`` can copy it whole.
    """
    base = tmp_path_factory.mktemp("tav-folder")
    model = base / "model"
    write_checkpoint(model, tiny_bundle.model, "safetensors", ORIGINAL_STYLE_CONFIG)
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **TAV.default_scheduler}))
    write_clip(model, TINY.cross_attention_dim)
    recipe = base / "fast.toml"
    recipe.write_text(FAST_RECIPE.replace('preset = "tiny"', f'path = "{model}"').replace("steps = 3", "steps = 2")
                      .replace("{out}", str(base / "artifacts")))
    result = run("build", recipe)
    assert result.exit_code == 0, result.output
    return recipe


def copy_build(recipe: Path, dest: Path) -> tuple[Path, Path, Path]:
    """A copy of the folder holding ``recipe``, its recipe pointing into the copy: (recipe, model, artifacts)."""
    shutil.copytree(recipe.parent, dest, dirs_exist_ok=True)
    copy = dest / recipe.name
    copy.write_text(recipe.read_text().replace(str(recipe.parent), str(dest)))
    return copy, dest / "model", dest / "artifacts" / recipe.stem


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def perturb_weights(path: Path, name: str) -> None:
    """Add seeded noise to the tensor whose key ends with ``name`` (prefixes vary with the writer's version)."""
    state = load_file(path)
    key = next(k for k in state if k.endswith(name))
    state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, path, metadata={"format": "pt"})


def validation_metrics(root: Path) -> dict:
    return json.loads((root / "validation.json").read_text())["metrics"]


def add_unread_files(model: Path) -> None:
    """A model card, notes and a .bin the safetensors shadows (a vae/ is read: validation decodes with it)."""
    (model / "README.md").write_text("# a model card\n")
    (model / "tokenizer" / "README.md").write_text("notes\n")
    unet = model / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")


def test_network_and_sampling_files_are_listed_apart_and_unread_files_are_not(tav_folder_build, tmp_path):
    _, model, _ = copy_build(tav_folder_build, tmp_path)
    tokenizer = sorted(p.name for p in (model / "tokenizer").iterdir())
    add_unread_files(model)
    assert [str(p.relative_to(model)) for p in TAV.checkpoint.weights_files(model)] == \
        ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert [str(p.relative_to(model)) for p in TAV.checkpoint.sampling_files(model)] == \
        ["scheduler/scheduler_config.json", *(f"tokenizer/{name}" for name in tokenizer),
         "text_encoder/config.json", "text_encoder/model.safetensors"]
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(tokenizer)


def test_without_a_text_encoder_the_tokenizer_is_not_read_and_not_listed(tmp_path, tiny_model):
    write_checkpoint(tmp_path, tiny_model, "safetensors", ORIGINAL_STYLE_CONFIG)
    write_clip(tmp_path, TINY.cross_attention_dim)
    shutil.rmtree(tmp_path / "text_encoder")
    assert TAV.checkpoint.load_folder(tmp_path).encode_text is None
    assert TAV.checkpoint.sampling_files(tmp_path) == []


def test_a_changed_scheduler_reruns_the_stages_reading_it_to_what_a_fresh_build_gives(tav_folder_build, tmp_path):
    """Issue 11: a changed scheduler config reused every stage (PSNR 39.9 where a fresh build gave 34.9)."""
    recipe, model, root = copy_build(tav_folder_build, tmp_path)
    stale = validation_metrics(root)
    edit_json(model / "scheduler" / "scheduler_config.json", beta_schedule="linear")
    before, after = rebuild(recipe, root)
    assert_reruns_exactly(before, after, {stage: True for stage in SCHEDULER_READERS})
    assert json.loads((root / "manifest.json").read_text())["contract"]["conventions"]["scheduler"]["config"][
        "beta_schedule"] == "linear"
    rebuilt, scores = validation_metrics(root), (root / "scores.json").read_text()
    assert rebuilt["pruning"] != stale["pruning"]  # the scheduler matters, so reusing the cache was wrong
    assert run("build", recipe, "--force").exit_code == 0
    assert validation_metrics(root) == rebuilt
    assert (root / "scores.json").read_text() == scores


@pytest.mark.parametrize("file, change, rerun", [
    ("tokenizer/tokenizer_config.json", lambda path: edit_json(path, model_max_length=1000), TEXT_ENCODER_READERS),
    ("text_encoder/model.safetensors", lambda path: perturb_weights(path, "final_layer_norm.weight"),
     TEXT_ENCODER_READERS),
    ("unet/diffusion_pytorch_model.safetensors", lambda path: perturb_weights(path, "conv_in.weight"),
     NETWORK_READERS),
])
def test_a_changed_model_file_reruns_exactly_the_stages_that_read_it(tav_folder_build, tmp_path, file, change,
                                                                      rerun):
    recipe, model, root = copy_build(tav_folder_build, tmp_path)
    change(model / file)
    before, after = rebuild(recipe, root)
    assert_reruns_exactly(before, after, {stage: True for stage in rerun})
    for stage in rerun:
        assert after[stage]["key"] != before[stage]["key"], stage


def test_files_the_build_does_not_read_rerun_nothing(tav_folder_build, tmp_path):
    recipe, model, root = copy_build(tav_folder_build, tmp_path)
    add_unread_files(model)
    before, after = rebuild(recipe, root)
    assert {stage: after[stage]["key"] for stage in STAGES} == {stage: before[stage]["key"] for stage in STAGES}




def write_tokens(path: Path, seed: int) -> None:
    """One run in the tiny CogVideo layout: 8 text tokens, 5 frames of <start_of_image> (310) + 63 image tokens."""
    image = np.random.default_rng(seed).integers(0, 256, (5, 63))
    frames = np.concatenate([np.full((5, 1), 310), image], axis=1).reshape(1, 320)
    np.save(path, np.concatenate([np.full((1, 8), 300), frames], axis=1))


def test_a_token_file_overwritten_in_place_reruns_the_stage_that_reads_it(tmp_path):
    write_tokens(tmp_path / "calibration.npy", seed=0)
    write_tokens(tmp_path / "validation.npy", seed=1)
    recipe = tmp_path / "cogvideo.toml"
    recipe.write_text(COGVIDEO_TOKENS_RECIPE.replace("{base}", str(tmp_path)))
    assert run("build", recipe).exit_code == 0
    root = tmp_path / "artifacts" / "cogvideo"

    write_tokens(tmp_path / "calibration.npy", seed=2)  # same path, other tokens
    before, after = rebuild(recipe, root)
    assert_reruns_exactly(before, after, {"calibrate": True})
    assert after["calibrate"]["key"] != before["calibrate"]["key"]

    write_tokens(tmp_path / "validation.npy", seed=3)
    before, after = rebuild(recipe, root)
    assert_reruns_exactly(before, after, {"validate": True})
    assert after["validate"]["key"] != before["validate"]["key"]


def test_a_changed_profile_range_reruns_export_and_the_contract_records_the_new_range(rebuildable):
    """Written from what the contract promises, not from the stage declarations (a declaration missing from
    both would go unseen): the engines' validated range of an axis is the recipe's profile, and the contract
    that records it is inside the ONNX files, so a new range is a new export, engine and validation."""
    from f3export.contract import read_contract

    path, root = rebuildable
    before, after = rebuild(path, root, "--set", "engine.profile_frames=[2, 4, 6]")
    assert {stage: after[stage]["key"] != before[stage]["key"] for stage in STAGES} == {
        "calibrate": False, "plan": False, "prune": False, "export": True, "engine": True, "validate": True}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["contract"]["dynamic_axes"]["frames"] == [2, 6]
    for engine in manifest["engines"].values():
        assert read_contract(root / engine["path"])["dynamic_axes"]["frames"] == [2, 6]
    assert [shape["frames"] for shape in json.loads((root / "validation.json").read_text())["shapes"]] == [4, 2, 6]
