"""Hostile use of the engines: shapes a build never validated, backends switched on the command line or missing.

The runtime (``EngineRunner``, ``EngineDenoiser``) serves an engine only at the shapes its build validated: each
input's rank, its static sizes and each dynamic axis within the contract's ``dynamic_axes`` range; anything else is
one line naming the input, the axis and what was validated. ``--set engine.backend=...`` switches a recipe's backend
in one step (the old backend's keys ignored with a note), and a backend that cannot run here is one line with the
real reason, exit 2.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from f3export.cli import main
from f3export.dropin import EngineDenoiser
from f3export.errors import ShapeError
from f3export.recipe import load_recipe
from f3export.runtime import EngineRunner

from conftest import FAST_RECIPE, run

# A recipe written for TensorRT (two of its keys set) whose engines are validated over batches 1 to 3.
TENSORRT_ENGINE = '[engine]\nbackend = "tensorrt"\nprecision = "fp32"\nbuilder_optimization_level = 5\n' \
                  'profile_batch = [1, 2, 3]\n\n[output]'
ONNXRUNTIME_ENGINE = '[engine]\nbackends = ["onnxruntime"]\ndevice = "cpu"\noptimization_level = "all"\n\n[output]'


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    """The TensorRT recipe built with ONNX Runtime by one ``--set``: (the build's output, its folder)."""
    folder = tmp_path_factory.mktemp("switched")
    recipe = folder / "switched.toml"
    recipe.write_text(FAST_RECIPE.replace("{out}", str(folder / "artifacts")).replace("[output]", TENSORRT_ENGINE))
    result = run("build", recipe, "--set", "engine.backend=onnxruntime")
    return result, folder / "artifacts" / "switched"


def inputs(batch: int = 2, frames: int = 4, tokens: int = 77, text_batch: int | None = None) -> tuple:
    """The tiny Tune-A-Video denoiser's inputs (sample, timestep, text embeddings) at the given sizes."""
    return (np.zeros((batch, 4, frames, 8, 8), np.float32), np.float32(500),
            np.zeros((batch if text_batch is None else text_batch, tokens, 32), np.float32))


def refused(call, *args) -> str:
    with pytest.raises(ShapeError) as refusal:
        call(*args)
    return str(refusal.value)


# -- shapes ------------------------------------------------------------------------------------------------
def test_the_runtime_serves_every_batch_in_the_validated_range(switched):
    _, root = switched
    unet = EngineRunner(root)
    for batch in (1, 3):  # the range's ends, neither of them the export's batch (2)
        assert unet(*inputs(batch)).shape == (batch, 4, 4, 8, 8)


@pytest.mark.parametrize("batch", [0, 4])
def test_a_batch_outside_the_validated_range_is_refused_naming_the_input_axis_and_range(switched, batch):
    _, root = switched
    assert refused(EngineRunner(root), *inputs(batch)) == \
        f"{root}: input 'sample': axis 'batch' is {batch}, outside the range the build validated, [1, 3]"


def test_an_axis_validated_at_one_size_is_refused_at_any_other(built):
    _, root, _ = built
    assert refused(EngineRunner(root), *inputs(frames=6)) == \
        f"{root}: input 'sample': axis 'frames' is 6, outside the range the build validated, [4, 4]"


def test_a_static_axis_is_refused_at_any_other_size(built):
    _, root, _ = built
    assert refused(EngineRunner(root), *inputs(tokens=8)) == \
        f"{root}: input 'encoder_hidden_states': axis 1 is 8; the engine takes 77 only (shape [batch, 77, 32])"


def test_an_input_of_another_rank_is_refused(built):
    _, root, _ = built
    sample, timestep, text = inputs()
    assert refused(EngineRunner(root), sample[0], timestep, text) == \
        f"{root}: input 'sample' has shape [4, 4, 8, 8]; the engine takes 5 axes [batch, 4, frames, height, width]"


def test_inputs_that_disagree_on_an_axis_are_refused_though_each_lies_in_its_range(switched):
    _, root = switched
    assert refused(EngineRunner(root), *inputs(batch=2, text_batch=3)) == \
        (f"{root}: input 'encoder_hidden_states': axis 'batch' is 3, but input 'sample' has batch = 2 (an axis has "
         "one size in every input)")


def test_the_diffusers_denoiser_refuses_what_the_build_did_not_validate(built):
    _, root, _ = built
    unet = EngineDenoiser(root)
    assert unet(torch.zeros(2, 4, 4, 8, 8), 1, torch.zeros(2, 77, 32)).sample.shape == (2, 4, 4, 8, 8)
    assert refused(unet, torch.zeros(2, 4, 5, 8, 8), 1, torch.zeros(2, 77, 32)) == \
        f"{root}: input 'sample': axis 'frames' is 5, outside the range the build validated, [4, 4]"


# -- switching backends --------------------------------------------------------------------------------------
def test_a_backend_switched_on_the_command_line_builds_in_one_step_ignoring_the_old_backends_keys(switched):
    result, root = switched
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "is ignored" in line]
    assert notes == [
        "note: switched.toml: [engine].builder_optimization_level = 5 is ignored (read only by 'tensorrt'; --set "
        "engine.backend selects 'onnxruntime')",
        "note: switched.toml: [engine].precision = 'fp32' is ignored (read only by 'tensorrt'; --set engine.backend "
        "selects 'onnxruntime')"]
    manifest = json.loads((root / "manifest.json").read_text())
    engine = manifest["recipe"]["engine"]  # as built: the ignored keys back at their defaults
    assert (engine["backend"], engine["precision"], engine["builder_optimization_level"]) == ("onnxruntime", "fp16", 3)
    assert sorted(manifest["engines"]) == ["original.onnxruntime", "pruned.onnxruntime"]


def test_a_backend_on_the_command_line_replaces_the_files_backend_list(write_recipe, capsys):
    recipe = load_recipe(write_recipe(FAST_RECIPE.replace("[output]", ONNXRUNTIME_ENGINE)),
                         ["engine.backend=onnxruntime"])
    assert (recipe.engine.backend, recipe.engine.backends, recipe.engine.selected) == ("onnxruntime", [],
                                                                                       ["onnxruntime"])
    assert recipe.engine.optimization_level == "all"  # still read by the selected backend: kept
    assert "note: fast.toml: [engine].backends = ['onnxruntime'] is ignored (the command line chooses the backends)" \
        in capsys.readouterr().err


def test_a_key_of_an_unselected_backend_set_in_the_same_command_is_still_refused(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("[output]", TENSORRT_ENGINE))
    result = CliRunner().invoke(main, ["build", str(path), "--set", "engine.backend=onnxruntime",
                                       "--set", "engine.precision=bf16"])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.startswith("error: ")] == [
        "error: fast.toml: [engine].precision = 'bf16' is read only by 'tensorrt', which the recipe does not select "
        "(it selects 'onnxruntime')"]
    assert not (path.parent / "artifacts").exists()


TENSORRT_MISSING = importlib.util.find_spec("tensorrt") is None


@pytest.mark.skipif(not TENSORRT_MISSING, reason="the tensorrt package is installed here")
def test_tensorrt_without_its_package_is_exit_2_with_that_reason_not_a_key_error(write_recipe):
    """A recipe written for ONNX Runtime switched to TensorRT where tensorrt is not installed: the old backend's
    keys are notes, and the one error is the missing package."""
    path = write_recipe(FAST_RECIPE.replace("[output]", ONNXRUNTIME_ENGINE))
    result = CliRunner().invoke(main, ["build", str(path), "--set", "engine.backend=tensorrt"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors == ["error: [engine] backend 'tensorrt': tensorrt is not installed (pip install -e '.[tensorrt]' "
                      "in f3export's checkout, on a machine with an NVIDIA GPU)"]
    assert "Traceback" not in result.output
    assert not (path.parent / "artifacts").exists()
