"""The engine's contract is written where a runtime finds it, and engines are validated over their ranges."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from f3export.cli import main
from f3export.contract import read_contract
from f3export.validate import load_goldens

from conftest import FAST_RECIPE, run

SHAPES = [{"batch": 2, "frames": 4, "height": 8, "width": 8},   # the export shape
          {"batch": 2, "frames": 2, "height": 8, "width": 8},   # profile_frames min
          {"batch": 2, "frames": 6, "height": 8, "width": 8}]   # profile_frames max


@pytest.fixture(scope="module")
def ranged(tmp_path_factory):
    """Tiny Tune-A-Video with frames validated over [2, 6], its weights in external data files."""
    folder = tmp_path_factory.mktemp("ranged")
    recipe = folder / "ranged.toml"
    recipe.write_text(FAST_RECIPE.replace("{out}", str(folder / "artifacts"))
                      .replace("[output]", '[export]\nexternal_data = "always"\n\n'
                                           "[engine]\nprofile_frames = [2, 4, 6]\n\n[output]"))
    result = run("build", recipe)
    assert result.exit_code == 0, result.output
    root = folder / "artifacts" / "ranged"
    return root, json.loads((root / "manifest.json").read_text())


def onnx_files(root):
    files = sorted(root.glob("onnx/*.onnx")) + sorted(root.glob("engines/*.onnx"))
    assert [f.parent.name for f in files] == ["onnx", "onnx", "engines", "engines"]
    return files


def test_the_contract_in_the_manifest_is_the_one_in_every_onnx_and_engine_file(ranged):
    root, manifest = ranged
    contract = manifest["contract"]
    assert contract["inputs"] == [
        {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "frames", "height", "width"]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 77, 32]},
    ]
    assert contract["outputs"] == [
        {"name": "noise_pred", "dtype": "float32", "shape": ["batch", 4, "frames", "height", "width"]}]
    assert contract["dynamic_axes"] == {"batch": [2, 2], "frames": [2, 6], "height": [8, 8], "width": [8, 8]}
    for path in onnx_files(root):
        assert (path.parent / (path.name + ".data")).is_file()  # external data: read without loading it
        assert read_contract(path) == contract, path


def test_a_diffusion_contract_states_timestep_scheduler_guidance_and_output_channels(ranged):
    conventions = ranged[1]["contract"]["conventions"]
    assert conventions["timestep"]["dtype"] == "float32" and conventions["timestep"]["range"] == [0, 999]
    assert conventions["scheduler"]["class"] == "DDIMScheduler"
    config = conventions["scheduler"]["config"]
    assert (config["num_train_timesteps"], config["beta_schedule"], config["steps_offset"]) == \
        (1000, "scaled_linear", 1)
    assert config["timestep_spacing"] == "leading"  # the full config as used, defaults included
    assert conventions["guidance"]["batch_layout"] == ["unconditional", "conditional"]
    assert conventions["output"] == {**conventions["output"], "channels": 4, "noise_channels": [0, 4]}


def test_latte_says_which_of_its_output_channels_are_the_noise():
    from f3export.models import get_adapter

    adapter = get_adapter("latte")
    output = adapter.conventions(adapter.checkpoint.load_preset("tiny", seed=0))["output"]
    assert (output["channels"], output["noise_channels"]) == (8, [0, 4])
    assert "channels 4..7 are a learned variance" in output["meaning"]


def test_graph_inputs_and_outputs_name_only_the_declared_dynamic_axes(ranged):
    for path in onnx_files(ranged[0]):
        graph = onnx.load(str(path), load_external_data=False).graph
        for value in [*graph.input, *graph.output]:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims and all(d in ("batch", "frames", "height", "width") or (isinstance(d, int) and d > 0)
                                for d in dims), (path.name, value.name, dims)


# Reads the contract from the engine file alone and drives the engine at both ends of every range.
PLAIN_ONNXRUNTIME = """
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
contract = json.loads(session.get_modelmeta().custom_metadata_map["f3export.contract"])
results = []
for end in (0, 1):
    size = {axis: bounds[end] for axis, bounds in contract["dynamic_axes"].items()}
    shape = lambda tensor: [size.get(d, d) for d in tensor["shape"]]
    feeds = {t["name"]: np.random.default_rng(0).standard_normal(shape(t)).astype(t["dtype"])
             for t in contract["inputs"]}
    feeds["timestep"][:] = contract["conventions"]["timestep"]["range"][1]
    outputs = session.run([t["name"] for t in contract["outputs"]], feeds)
    results.append({"expected": [shape(t) for t in contract["outputs"]], "got": [list(o.shape) for o in outputs],
                    "finite": all(bool(np.isfinite(o).all()) for o in outputs)})
assert not any(name.startswith("f3export") for name in sys.modules)
print(json.dumps(results))
"""


def test_plain_onnxruntime_reads_the_contract_from_the_engine_file_and_runs_it(ranged):
    engine = ranged[0] / "engines" / "pruned.ort-cpu-extended.onnx"
    done = subprocess.run([sys.executable, "-c", PLAIN_ONNXRUNTIME, str(engine)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["expected"] for r in results] == [[[2, 4, 2, 8, 8]], [[2, 4, 6, 8, 8]]]
    assert all(r["got"] == r["expected"] and r["finite"] for r in results)


def test_every_engine_is_validated_at_the_export_shape_and_both_ends_of_each_range(ranged):
    root, manifest = ranged
    assert json.loads((root / "validation.json").read_text())["shapes"] == SHAPES
    frames = [inputs["sample"].shape[2] for inputs, _ in load_goldens(root / "goldens" / "pruned.npz")]
    assert frames == [4, 2, 6]  # export_samples = 1 at each shape; f3export check re-runs these
    result = run("check", root)
    assert result.exit_code == 0, result.output
    assert "gates passed" in result.output


def one_line_refusal(args):
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("family, override, message", [
    ("animatediff", "engine.profile_frames=[8, 8, 40]",
     "animatediff.toml: [engine].profile_frames = [8, 8, 40]: at the range's end, frames = 40, but the motion "
     "modules' positions cover at most motion_max_seq_length = 32 frames"),
    ("animatediff", "model.frames=33", "animatediff.toml: [model].frames = 33, but the motion modules' positions "
                                       "cover at most motion_max_seq_length = 32 frames"),
    ("latte", "model.frames=16", "latte.toml: [model].frames = 16, but this Latte model's temporal positions cover "
                                 "exactly video_length = 8 frames"),
    ("latte", "engine.profile_frames=[8, 8, 16]", "latte.toml: [engine].profile_frames = [8, 8, 16]: 'frames' is not "
                                                  "in [export].dynamic_axes, so the engine has no range of it"),
])
def test_frames_beyond_a_family_limit_are_refused_before_any_stage(tmp_path, family, override, message):
    """AnimateDiff's positional table holds 32 frames; Latte's temporal positions fix its frame count."""
    line = one_line_refusal(["build", f"recipes/{family}.toml", "--set", override, "--set", f"output.dir={tmp_path}"])
    assert line == f"error: {message}"
    assert not (tmp_path / family).exists()


def test_a_range_must_contain_the_export_shape(write_recipe):
    line = one_line_refusal(["build", str(write_recipe()), "--set", "engine.profile_frames=[6, 6, 8]"])
    assert line == "error: fast.toml: [engine].profile_frames = [6, 6, 8] does not contain the export shape's frames = 4"
