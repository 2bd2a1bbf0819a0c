"""ModelScope, AnimateDiff, Latte and recipe-described diffusers models go through the same pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from f3export.cli import main
from f3export.models import get_adapter
from f3export.models.base import VideoShape

FAMILIES = ("modelscope", "animatediff", "latte")
SHAPE = VideoShape(frames=8, latent_height=8, latent_width=8)  # Latte's tiny preset is trained for 8 frames


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    adapter = get_adapter(request.param)
    bundle = adapter.checkpoint.load_preset("tiny", seed=0)
    spec = adapter.export_spec(bundle.model, SHAPE, batch=2, dynamic=["batch"], seed=3)
    return adapter, bundle.model, spec


def test_temporal_sites_are_the_familys_temporal_attention(family):
    adapter, model, _ = family
    names = [s.attention for s in adapter.structure.temporal_sites(model)]
    expected = {"modelscope": ["unet.transformer_in.transformer_blocks.0.attn1",
                               "unet.transformer_in.transformer_blocks.0.attn2"],
                "animatediff": ["unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1",
                                "unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn2"],
                "latte": ["transformer.temporal_transformer_blocks.0.attn1",
                          "transformer.temporal_transformer_blocks.1.attn1"]}[adapter.family]
    assert names[:2] == expected
    assert len(names) == {"modelscope": 10, "animatediff": 14, "latte": 2}[adapter.family]
    sites = adapter.structure.temporal_sites(model)
    assert all(s.norm is not None and model.get_submodule(s.norm) is not None for s in sites)


def test_loads_a_local_diffusers_folder(family, tmp_path):
    adapter, model, spec = family
    model.inner.save_pretrained(tmp_path / model.component)
    bundle = adapter.checkpoint.load_folder(tmp_path)
    with torch.no_grad():
        assert torch.equal(bundle.model(**spec.inputs), model(**spec.inputs))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


CUSTOM_RECIPE = """
[model]
family = "diffusers"
class_name = "UNet3DConditionModel"
temporal_modules = ["*temp_attentions.*.attn[12]"]
path = "{model}"
frames = 4
latent_height = 8
latent_width = 8

[calibration]
steps = 2

[pruning]
ratio = 0.5

[validation]
steps = 2
export_samples = 1
pruning_min_step_cosine = 0.5
pruning_min_latent_psnr = 5.0

[output]
dir = "{out}"
"""


def test_a_diffusers_model_is_pruned_from_recipe_keys_alone(tmp_path):
    modelscope = get_adapter("modelscope").checkpoint.load_preset("tiny", seed=1).model
    modelscope.inner.save_pretrained(tmp_path / "model" / "unet")
    recipe = tmp_path / "custom.toml"
    recipe.write_text(CUSTOM_RECIPE.replace("{model}", str(tmp_path / "model"))
                      .replace("{out}", str(tmp_path / "artifacts")))
    result = run("build", recipe)
    assert result.exit_code == 0, result.output
    root = tmp_path / "artifacts" / "custom"
    plan = json.loads((root / "plan.json").read_text())
    assert all("temp_attentions" in m for m in plan["heads"])  # transformer_in left alone by the pattern
    assert plan["summary"]["total_heads"] == 40 and plan["summary"]["removed_heads"] == 20
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["parameters"]["onnx_removed_equals_torch_removed"] is True
    pruned_config = json.loads((root / "pruned" / "config.json").read_text())
    assert pruned_config["adapter_options"]["class_name"] == "UNet3DConditionModel"


def test_inspect_lists_temporal_modules_before_pruning():
    result = run("inspect", "recipes/latte.toml")
    assert result.exit_code == 0, result.output
    assert "transformer.temporal_transformer_blocks.0.attn1" in result.output
    assert "2 modules, 16 heads" in result.output


@pytest.mark.parametrize("override, message", [
    ("model.frames=6", "[model].frames = 6, but this Latte model's temporal positions cover exactly"),
    ('export.dynamic_axes=["batch","frames"]', "latte models cannot export 'frames' as dynamic"),
])
def test_latte_shapes_the_checkpoint_cannot_run_are_refused(tmp_path, override, message):
    result = CliRunner().invoke(main, ["build", "recipes/latte.toml", "--set", override,
                                       "--set", f"output.dir={tmp_path}"])
    assert result.exit_code == 2
    assert message in result.output


def test_custom_family_requires_its_keys(write_recipe):
    path = write_recipe(CUSTOM_RECIPE.replace('class_name = "UNet3DConditionModel"\n', "").replace(
        "{model}", "."))
    result = run("build", path)
    assert result.exit_code == 2
    assert "family 'diffusers' needs 'class_name' and 'temporal_modules'" in result.output
