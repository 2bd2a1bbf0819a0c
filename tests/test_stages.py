"""Stages as data: a stage's cache key changes exactly when one of the inputs its declaration names changes.

Each change below is real (a recipe override, an edited model file, an overwritten token file, another
library version, other upstream files) and names the declared inputs it alters; which keys must change
follows from ``f3export.stages.STAGES`` alone, and every input any stage declares is exercised here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from f3export.artifacts import BUILD_STAGES, StageRecord
from f3export.build import Build
from f3export.engines.onnxruntime import OnnxRuntimeBackend
from f3export.models.tune_a_video import TINY
from f3export.recipe import load_recipe
from f3export.stages import BACKENDS, STAGES, stage_key

from conftest import COGVIDEO_TOKENS_RECIPE, FAST_RECIPE, ORIGINAL_STYLE_CONFIG, TAV, write_checkpoint, write_clip

DECLARED = {name for stage in STAGES for name in [*stage.inputs, *(stage.conditional[1] if stage.conditional else ())]}
AUTO = "pruning.ratio='auto'"  # the plan searches the ratio: it reads its conditional inputs too



@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_bundle) -> Path:
    """A Tune-A-Video folder: network, DDIM scheduler config, CLIP tokenizer and text encoder."""
    model = tmp_path_factory.mktemp("stages") / "model"
    write_checkpoint(model, tiny_bundle.model, "safetensors", ORIGINAL_STYLE_CONFIG)
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **TAV.default_scheduler}))
    write_clip(model, TINY.cross_attention_dim)
    return model


def recipe_over(model: Path) -> Path:
    path = model.parent / "fast.toml"
    path.write_text(FAST_RECIPE.replace('preset = "tiny"', f'path = "{model}"')
                    .replace("{out}", str(model.parent / "artifacts")))
    return path


@pytest.fixture(scope="module")
def folder_build(model_folder) -> Build:
    """The build of a recipe over ``model_folder``, checked, not run (read-only: it is shared)."""
    return Build(load_recipe(recipe_over(model_folder), []))


@pytest.fixture
def folder_recipe(model_folder, tmp_path) -> Path:
    """A recipe over a private copy of ``model_folder`` (tmp_path/model), free to edit."""
    shutil.copytree(model_folder, tmp_path / "model")
    return recipe_over(tmp_path / "model")


@pytest.fixture
def token_recipe(tmp_path) -> Path:
    for name, seed in (("calibration", 0), ("validation", 1)):
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(seed).integers(0, 256, (1, 328)))
    path = tmp_path / "tokens.toml"
    path.write_text(COGVIDEO_TOKENS_RECIPE.replace("{base}", str(tmp_path)))
    return path


def keys_of(build: Build, versions: dict[str, str] | None = None, rewritten: str | None = None) -> dict[str, str]:
    """Every stage's key, each stage having written the same file but ``rewritten``, which wrote another."""
    records = {s.name: StageRecord(key="", files={"out": "1" if s.name == rewritten else "0"}) for s in STAGES}
    context = dataclasses.replace(build.context, records=records)
    return {stage.name: stage_key(stage, context, versions or build.versions) for stage in STAGES}


def keys(recipe: Path, overrides=()) -> dict[str, str]:
    """Every stage's key for the recipe and the files it names, as they are on disk now."""
    return keys_of(Build(load_recipe(recipe, list(overrides))))


def perturb(path: Path, suffix: str) -> None:
    state = load_file(path)
    key = next(k for k in state if k.endswith(suffix))
    state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, path, metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# (a change, the declared inputs it alters; FILE_CHANGES: a file of the model folder, how it changes, the inputs)
RECIPE_CHANGES = [
    ("calibration.guidance_scale=5.0", {"section:calibration"}),
    ("pruning.ratio=0.25", {"section:pruning"}),
    ("export.opset=18", {"section:export"}),
    ("engine.optimization_level='basic'", {"section:engine"}),
    ("validation.export_samples=2", {"section:validation"}),
    ("engine.profile_frames=[4, 4, 8]", {"section:engine", "shape:contract_ranges", "shape:validated_shapes"}),
    ("model.frames=6", {"shape:latent", "shape:contract_ranges", "shape:validated_shapes"}),
    ("output.name='elsewhere'", set()),
]
FILE_CHANGES = [
    ("unet/diffusion_pytorch_model.safetensors", lambda p: perturb(p, "conv_in.weight"), {"model:network"}),
    ("unet/config.json", lambda p: edit_json(p, norm_eps=1e-6), {"model:network"}),
    ("tokenizer/tokenizer_config.json", lambda p: edit_json(p, model_max_length=1000), {"model:sampling"}),
    ("text_encoder/model.safetensors", lambda p: perturb(p, "final_layer_norm.weight"), {"model:sampling"}),
    # the contract records the scheduler: a conventions file as well as a sampling file
    ("scheduler/scheduler_config.json", lambda p: edit_json(p, beta_schedule="linear"),
     {"model:sampling", "model:conventions"}),
    ("README.md", lambda p: p.write_text("a model card\n"), set()),  # not read by the build
]
LIBRARIES = sorted({name.removeprefix("library:") for name in DECLARED if name.startswith("library:")})
FILE_SECTIONS = ["calibration", "validation"]  # their token files


def expected_reruns(changed: set[str], recipe=None) -> set[str]:
    """The stages whose key reads one of ``changed``, for ``recipe`` (None: a recipe giving a ratio)."""
    return {stage.name for stage in STAGES
            if changed & set(stage.inputs_for(recipe) if recipe is not None else stage.inputs)}


def changed_keys(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if after[name] != before[name]}


def test_every_declared_input_is_exercised_below():
    exercised = set().union(*(c for _, c in RECIPE_CHANGES), *(c for *_, c in FILE_CHANGES),
                            {f"library:{lib}" for lib in LIBRARIES}, {f"files:{s}" for s in FILE_SECTIONS},
                            {f"stage:{s.name}" for s in STAGES}, {"measure:sensitivity"})  # the test below
    assert DECLARED <= exercised, DECLARED - exercised


def test_ranking_by_sensitivity_recalibrates_and_other_criteria_do_not(folder_build):
    """Only ``sensitivity`` is measured by calibration (for the recipe's action): switching to it reruns the
    calibration as well as the plan; switching between the other criteria re-plans only (the later stages' keys
    follow the files the plan writes)."""
    source = folder_build.recipe.source
    assert changed_keys(keys_of(folder_build), keys(source, ["pruning.criterion='magnitude'"])) == {"plan"}
    assert changed_keys(keys_of(folder_build), keys(source, ["pruning.criterion='sensitivity'"])) == \
        {"calibrate", "plan"}
    measured = load_recipe(source, ["pruning.criterion='sensitivity'"])
    assert "measure:sensitivity" in next(s for s in STAGES if s.name == "calibrate").inputs_for(measured)


@pytest.mark.parametrize("override, changed", RECIPE_CHANGES, ids=[o for o, _ in RECIPE_CHANGES])
def test_a_recipe_change_changes_exactly_the_keys_declaring_what_it_alters(folder_build, override, changed):
    assert changed_keys(keys_of(folder_build), keys(folder_build.recipe.source, [override])) == \
        expected_reruns(changed)


def test_the_shape_is_in_the_key_of_every_stage_that_runs_the_network_at_it(folder_build):
    """Calibration, export and validation run the network at the recipe's shape; plan and prune never do."""
    shaped = keys(folder_build.recipe.source, ["model.latent_height=12"])
    assert changed_keys(keys_of(folder_build), shaped) == {"calibrate", "export", "validate"}


@pytest.mark.parametrize("override, changed", RECIPE_CHANGES, ids=[o for o, _ in RECIPE_CHANGES])
def test_with_ratio_auto_the_plan_keys_on_what_its_search_reads_as_well(folder_build, override, changed):
    """ratio = "auto" samples the held-out runs with the model: the plan then reads [validation], the model's
    files and its shape, and a change to them re-plans (with a given ratio it does not, above)."""
    source = folder_build.recipe.source
    auto = load_recipe(source, [AUTO])
    assert changed_keys(keys(source, [AUTO]), keys(source, [AUTO, override])) == expected_reruns(changed, auto)
    assert "plan" in expected_reruns({"section:validation", "model:sampling", "shape:latent"}, auto)


@pytest.mark.parametrize("file, change, changed", FILE_CHANGES, ids=[f for f, *_ in FILE_CHANGES])
@pytest.mark.parametrize("overrides", [[], [AUTO]], ids=["ratio given", "ratio auto"])
def test_a_model_file_change_changes_exactly_the_keys_declaring_that_file_class(folder_recipe, file, change,
                                                                              changed, overrides):
    before = keys(folder_recipe, overrides)
    change(folder_recipe.parent / "model" / file)
    assert changed_keys(before, keys(folder_recipe, overrides)) == \
        expected_reruns(changed, load_recipe(folder_recipe, overrides))


@pytest.mark.parametrize("section", FILE_SECTIONS)
@pytest.mark.parametrize("overrides", [[], [AUTO]], ids=["ratio given", "ratio auto"])
def test_a_token_file_overwritten_in_place_changes_exactly_the_keys_reading_it(token_recipe, section, overrides):
    before = keys(token_recipe, overrides)
    np.save(token_recipe.parent / f"{section}.npy", np.random.default_rng(7).integers(0, 256, (1, 328)))
    assert changed_keys(before, keys(token_recipe, overrides)) == \
        expected_reruns({f"files:{section}"}, load_recipe(token_recipe, overrides))


@pytest.mark.parametrize("library", LIBRARIES)
def test_another_library_version_changes_exactly_the_keys_using_it(folder_build, monkeypatch, library):
    before = keys_of(folder_build)
    if library == BACKENDS:  # each backend reports its own versions
        monkeypatch.setattr(OnnxRuntimeBackend, "versions", lambda self: {"onnxruntime": "99.0"})
        after = keys_of(folder_build)
    else:
        after = keys_of(folder_build, versions={**folder_build.versions, library: "99.0"})
    assert changed_keys(before, after) == expected_reruns({f"library:{library}"})


@pytest.mark.parametrize("upstream", [stage.name for stage in STAGES])
def test_other_upstream_files_change_exactly_the_keys_of_the_stages_reading_them(folder_build, upstream):
    assert changed_keys(keys_of(folder_build), keys_of(folder_build, rewritten=upstream)) == \
        expected_reruns({f"stage:{upstream}"})


def test_stages_run_after_the_stages_they_read_and_match_the_manifest_order():
    names = [stage.name for stage in STAGES]
    assert tuple(names) == BUILD_STAGES
    for i, stage in enumerate(STAGES):
        assert set(stage.upstream) <= set(names[:i]), stage.name
