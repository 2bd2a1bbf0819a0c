"""``f3export generate`` under attack: what it runs (a build's manifest and engines, its options) is untrusted, and
each refusal is one line with exit 2, never a NaN video, never a file written into the build it reads.

The attacker's build is a copy of a finished one whose contract is edited consistently, in ``manifest.json`` and
in the contract each engine embeds (with the engine hashes the manifest records), so that the edit reaches the
sampler rather than the runtime's manifest-vs-engine comparison; an edit of the manifest alone is that
comparison's to refuse."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import TAV, run
from f3export.contract import write_contract
from f3export.generate import EnginePipeline


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0].removeprefix("error: ")


@pytest.fixture
def copy(built, tmp_path) -> Path:
    _, root, _ = built
    return Path(shutil.copytree(root, tmp_path / "build"))


def forge(root: Path, edit) -> None:
    """Edit the contract as a forger would: ``edit(contract)`` in the manifest and in every engine's own copy, the
    engines' recorded hashes updated."""
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest["contract"])
    for entry in manifest["engines"].values():
        model = onnx.load(str(root / entry["path"]))
        write_contract(model, manifest["contract"])
        onnx.save(model, str(root / entry["path"]))
        digest = hashlib.sha256((root / entry["path"]).read_bytes()).hexdigest()
        manifest["stages"]["engine"]["files"][entry["path"]] = digest
    (root / "manifest.json").write_text(json.dumps(manifest))


def scheduler_config(**changes):
    return lambda contract: contract["conventions"]["scheduler"]["config"].update(changes)


def generate(root: Path, out: Path, *options):
    return run("generate", root, "--prompt", "a dog", "--out", out, "--steps", "2", *options)


@pytest.mark.parametrize("changes, reason", [
    ({"beta_start": float("nan")}, "beta_start = nan is not a number in (0, 1)"),
    ({"beta_end": 1.0}, "beta_end = 1.0 is not a number in (0, 1)"),
    ({"trained_betas": [0.5] * 999 + [-0.1]}, "trained_betas[999] = -0.1 is not a number in (0, 1)"),
    ({"num_train_timesteps": 0}, "num_train_timesteps = 0 is not a positive integer"),
    ({"steps_offset": 1000}, "steps_offset = 1000 is not an integer in [0, num_train_timesteps = 1000)"),
])
def test_a_forged_scheduler_config_out_of_range_is_refused_in_one_line_and_writes_nothing(copy, tmp_path, changes,
                                                                                            reason):
    forge(copy, scheduler_config(**changes))
    out = tmp_path / "clip.gif"
    error = one_line_error(generate(copy, out))
    assert error.startswith(f"scheduler DDIMScheduler config: {reason} (")
    assert not out.exists()


def test_more_steps_than_the_schedule_has_training_timesteps_are_refused(copy, tmp_path):
    forge(copy, scheduler_config(num_train_timesteps=10))
    error = one_line_error(generate(copy, tmp_path / "clip.gif", "--steps", "11"))
    assert error == "--steps 11: the scheduler steps 1 to its num_train_timesteps = 10"


def test_a_steps_offset_that_would_start_past_the_last_training_timestep_is_refused(copy, tmp_path):
    forge(copy, scheduler_config(num_train_timesteps=10))  # steps_offset = 1: 10 steps would start at 10
    error = one_line_error(generate(copy, tmp_path / "clip.gif", "--steps", "10"))
    assert error == ("scheduler DDIMScheduler config: steps_offset = 1 at 10 steps starts at timestep 10, past the "
                     "last of num_train_timesteps = 10")


def test_a_scheduler_the_engines_only_sampler_lacks_is_refused_with_that_reason_first(copy, tmp_path):
    forge(copy, lambda contract: contract["conventions"]["scheduler"].update({"class": "PNDMScheduler"}))
    error = one_line_error(generate(copy, tmp_path / "clip.gif"))
    assert error.startswith("scheduler PNDMScheduler: not implemented by the engines-only sampler (it implements ")


def test_a_manifest_edited_alone_is_refused_as_differing_from_its_engines(copy, tmp_path):
    manifest = json.loads((copy / "manifest.json").read_text())
    scheduler_config(beta_start=float("nan"))(manifest["contract"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    error = one_line_error(generate(copy, tmp_path / "clip.gif"), code=1)
    assert "contract.conventions.scheduler.config.beta_start differs from the contract embedded in" in error


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_numpy_cannot_take_is_refused(built, tmp_path, seed):
    _, root, _ = built
    result = generate(root, tmp_path / "clip.gif", "--seed", seed)
    assert result.exit_code == 2
    assert f"Invalid value for '--seed': {seed} is not in the range 0<=x<=18446744073709551615." in result.output


def test_frames_outside_the_range_the_build_validated_are_refused(built, tmp_path):
    _, root, _ = built
    error = one_line_error(generate(root, tmp_path / "clip.gif", "--frames", "5"))
    assert error == "--frames 5: this build validated its engines at 4 to 4 frames"


def test_a_guidance_that_overflows_to_a_nan_video_is_refused_and_writes_nothing(built, tmp_path):
    _, root, _ = built
    out = tmp_path / "clip.gif"
    result = generate(root, out, "--guidance-scale", "1e300")  # finite, but not in float32
    assert result.exit_code == 2
    error = result.output.strip().splitlines()[-1]  # after the sampling's progress
    assert error.startswith("error: the pruned engine's final latents hold ") and error.endswith(": no video written")
    assert not out.exists()


def test_a_guidance_scale_that_is_not_a_number_is_refused(built, tmp_path):
    _, root, _ = built
    error = one_line_error(generate(root, tmp_path / "clip.gif", "--guidance-scale", "nan"))
    assert error == "--guidance-scale nan: not a finite number >= 0"


def test_an_output_inside_the_build_folder_is_refused(copy):
    before = sorted(p.name for p in copy.iterdir())
    error = one_line_error(generate(copy, copy / "clip.gif"))
    assert error.startswith(f"--out {copy / 'clip.gif'}: inside the build folder {copy}")
    assert sorted(p.name for p in copy.iterdir()) == before


def test_an_output_reaching_the_build_folder_through_a_symlinked_folder_is_refused(copy, tmp_path):
    (tmp_path / "elsewhere").symlink_to(copy / "engines", target_is_directory=True)
    out = tmp_path / "elsewhere" / "clip.gif"
    error = one_line_error(generate(copy, out))
    assert error.startswith(f"--out {out}: inside the build folder {copy}")
    assert not (copy / "engines" / "clip.gif").exists()


# -- the committed recipes whose model folders have a text encoder ---------------------------------------------
REPO = Path(__file__).resolve().parent.parent
SHAPES = ['calibration.prompts=["a red square moves left slowly"]', 'validation.prompts=["a red circle moves down"]']
TEXT_ENCODER_RECIPES = {  # each shrunk to one calibration run and one held-out run of 2 steps
    "tav-shapes": [*SHAPES, 'calibration.source_videos=["zoo/sources/green-circle-left-slowly.gif"]',
                   'validation.source_videos=["zoo/sources/green-square-down.gif"]'],
    "latte-shapes": SHAPES,
    "cogvideox-shapes": SHAPES,
    "cogvideox-2b-shapes": [*SHAPES, 'pruning.criterion="temporal_contribution"'],
    "cogvideox-pipeline": ['calibration.prompts=["a man is skiing"]'],
    "wan-pipeline": ['calibration.prompts=["a man is skiing"]'],
}
SMALL = ["calibration.steps=2", "validation.steps=2", "validation.seeds=[1000]", "validation.export_samples=1",
         "pruning.ratio=0.1"]


@pytest.fixture(scope="module")
def text_encoder_builds(tmp_path_factory):
    """Each recipe's build (shrunk as above), into one folder; built on first use."""
    folder, made = tmp_path_factory.mktemp("recipes"), {}

    def build(name: str) -> Path:
        if name not in made:
            overrides = [*SMALL, *TEXT_ENCODER_RECIPES[name], f'output.dir="{folder}"']
            result = run("build", REPO / "recipes" / f"{name}.toml",
                         *[arg for o in overrides for arg in ("--set", o)])
            assert result.exit_code == 0, result.output
            made[name] = folder / name
        return made[name]

    return build


@pytest.fixture
def in_repository(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes' relative paths (zoo/...) are the repository's


@pytest.mark.usefixtures("in_repository")
@pytest.mark.parametrize("name", TEXT_ENCODER_RECIPES)
def test_generate_writes_a_clip_for_each_committed_recipe_with_a_text_encoder(text_encoder_builds, tmp_path, name):
    root = text_encoder_builds(name)
    out = tmp_path / "clip.gif"
    result = run("generate", root, "--prompt", "a green square moves up", "--out", out, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


@pytest.mark.usefixtures("in_repository")
def test_generate_embeds_a_prompt_as_the_build_validated_it(text_encoder_builds):
    """The text encoder engine on the exported tokenizer's ids equals the PyTorch encoder on the build's."""
    root = text_encoder_builds("tav-shapes")
    prompt = "a green square moves up slowly"
    expected = TAV.checkpoint.load_folder(REPO / "zoo" / "tav-shapes").encode_text([prompt]).numpy()
    actual = EnginePipeline(root).embed(prompt)
    assert actual.shape == expected.shape == (1, 8, 32)  # padded to the encoder's 8 positions, as the build's
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-6  # fp32 rounding, same tokens
