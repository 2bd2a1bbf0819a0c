"""Recipes are validated before anything runs; mistakes are one line naming the key, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from f3export.errors import RecipeError
from f3export.recipe import load_recipe
from f3export.roots import RootsError

from conftest import FAST_RECIPE


def test_the_shipped_recipe_loads():
    recipe = load_recipe("recipes/tav.toml")
    assert recipe.name == "tav" and recipe.model.preset == "tiny" and recipe.pruning.ratio == 0.5


@pytest.mark.parametrize("edit, message", [
    (("ratio = 0.5", "ratio = 1.5"), r"\[pruning\]\.ratio = 1\.5 is out of range \[0\.0, 1\.0\]"),
    (("ratio = 0.5", "ratio = \"half\""), r"\[pruning\]\.ratio = 'half': expected a number or 'auto'"),
    (("ratio = 0.5", "ratoi = 0.5"), r"\[pruning\]: unknown key 'ratoi'"),
    (("[pruning]", "[prunning]"), r"unknown section \[prunning\]"),
    (("steps = 3\n\n[pruning]", "steps = -1\n\n[pruning]"), r"\[calibration\]\.steps = -1 is out of range"),
    (('prompts = ["a man is skiing"]', "prompts = []"), r"\[calibration\]\.prompts: must not be empty"),
    (('preset = "tiny"', 'preset = "huge"'), r"\[model\]\.preset = 'huge' is not one of"),
    (('preset = "tiny"', 'preset = "tiny"\npath = "."'), r"needs exactly one of 'preset' or 'path'"),
    (('preset = "tiny"', 'path = "no/such/folder"'), r"\[model\]\.path = 'no/such/folder': folder not found"),
    (('family = "tune-a-video"', 'family = "sora"'), r"\[model\]\.family = 'sora' is not one of"),
    (("[model]", "[model"), r"invalid TOML"),
    (("ratio = 0.5", "ratio = -0.1"), r"\[pruning\]\.ratio = -0\.1 is out of range"),
    (("ratio = 0.5", "ratio = true"), r"\[pruning\]\.ratio: expected a number, got bool True"),
    (("ratio = 0.5", 'criterion = "entropy"'), r"\[pruning\]\.criterion = 'entropy' is not one of"),
    (("ratio = 0.5", "min_heads_per_module = -1"), r"\[pruning\]\.min_heads_per_module = -1 is out of range"),
    (("ratio = 0.5", 'keep = "mid_block"'), r"\[pruning\]\.keep: expected a list, got str"),
    (("seeds = [0]", "seeds = [0.5]"), r"\[calibration\]\.seeds\[0\]: expected an integer, got float 0\.5"),
    (("seeds = [0]", 'seeds = ["zero"]'), r"\[calibration\]\.seeds\[0\]: expected an integer"),
    (('prompts = ["a man is skiing"]', 'prompts = [""]'), r"\[calibration\]\.prompts: must not be an empty string"),
    (("frames = 4", "frames = 0"), r"\[model\]\.frames = 0 is out of range \[1, 1024\]"),
    (("latent_height = 8", "latent_height = 4"), r"\[model\]\.latent_height = 4 is out of range"),
    (("latent_width = 8", 'latent_width = "8"'), r"\[model\]\.latent_width: expected an integer, got str"),
    (("[output]", "[export]\nopset = 11\n\n[output]"), r"\[export\]\.opset = 11 is out of range \[17, 23\]"),
    (("[output]", "[export]\ndynamic_axes = [\"time\"]\n\n[output]"), r"\[export\]\.dynamic_axes = 'time' is not one of"),
    (("[output]", "[engine]\nbackend = \"openvino\"\n\n[output]"), r"\[engine\]\.backend = 'openvino' is not one of"),
    (("[output]", "[engine]\nbackend = \"onnxruntime\"\nbackends = [\"onnxruntime\"]\n\n[output]"),
     r"give 'backend' or 'backends', not both"),
    (("steps = 3\nexport_samples", "steps = 3\nexport_samples = 0\nx"), r"\[validation\]: unknown key 'x'"),
    (("export_samples = 1", "export_samples = 0"), r"\[validation\]\.export_samples = 0 is out of range"),
    (('dir = "{out}"', 'dir = "{out}"\nname = "../escape"'),
     r"\[output\]\.name = '\.\./escape' is not a usable folder name \(it contains a path separator\)"),
    (("ratio = 0.5", "ratio = nan"), r"\[pruning\]\.ratio = nan is not a finite number"),
    (("[output]", "[engine]\nprecision = \"fp16\"\n\n[output]"), r"\[engine\]\.precision = 'fp16' is read only by"),
    (('family = "tune-a-video"', 'family = "tune-a-video"\nclass_name = "UNet3DConditionModel"'),
     r"\[model\]\.class_name applies only to family 'diffusers'"),
    (('[model]\nfamily = "tune-a-video"', '[model]'), r"\[model\]: missing required key 'family'"),
    (("[model]", "stray = 1\n[model]"), r"unknown section \[stray\]"),
])
def test_malformed_recipe_names_the_problem(write_recipe, edit, message):
    path = write_recipe(FAST_RECIPE.replace(*edit, 1))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_set_overrides_values_and_is_validated_too(write_recipe):
    path = write_recipe()
    recipe = load_recipe(path, ["pruning.ratio=0.25", "model.preset=tiny", "calibration.seeds=[1, 2]"])
    assert recipe.pruning.ratio == 0.25 and recipe.calibration.seeds == [1, 2]
    with pytest.raises(RecipeError, match=r"\[pruning\]\.scope = 'everything' is not one of"):
        load_recipe(path, ["pruning.scope=everything"])
    with pytest.raises(RecipeError, match=r"expected section\.key=value"):
        load_recipe(path, ["ratio=0.3"])


def test_cli_reports_a_bad_recipe_in_one_line_with_exit_code_2(write_recipe):
    path = write_recipe(FAST_RECIPE.replace("ratio = 0.5", "ratio = 1.5"))
    done = subprocess.run([sys.executable, "-m", "f3export", "build", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: fast.toml: [pruning].ratio = 1.5 is out of range [0.0, 1.0]"
    assert "Traceback" not in done.stderr + done.stdout


def test_paths_outside_the_allowed_roots_are_refused(write_recipe, tmp_path, monkeypatch):
    path = write_recipe()
    monkeypatch.setenv("F3EXPORT_ALLOWED_ROOTS", str(tmp_path / "models"))
    with pytest.raises(RootsError, match=r"\[output\]\.dir/name: .*/artifacts/fast is outside the allowed roots"):
        load_recipe(path)
    monkeypatch.setenv("F3EXPORT_ALLOWED_ROOTS", str(tmp_path))
    assert load_recipe(path).output.dir.startswith(str(tmp_path))
    (tmp_path / "link").symlink_to("/usr")  # inside the root by name, outside once resolved
    linked = write_recipe(FAST_RECIPE.replace('preset = "tiny"', f'path = "{tmp_path / "link"}"'), name="linked")
    with pytest.raises(RootsError, match=r"\[model\]\.path: .*link \(resolves to /usr\) is outside the allowed roots"):
        load_recipe(linked)
