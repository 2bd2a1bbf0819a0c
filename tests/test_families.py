"""ModelScope, AnimateDiff, Latte and recipe-described diffusers models go through the same pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from f3export.cli import main
from f3export.export import export_onnx
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.prune import apply_plan, make_plan, mask_heads, parameter_count
from f3export.recipe import PruningSection

from test_prune import scores_for

FAMILIES = ("modelscope", "animatediff", "latte")
SHAPE = VideoShape(frames=8, latent_height=8, latent_width=8)  # Latte's tiny preset is trained for 8 frames


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    adapter = get_adapter(request.param)
    bundle = adapter.load_preset("tiny", seed=0)
    spec = adapter.export_spec(bundle.model, SHAPE, batch=2, dynamic=["batch"], seed=3)
    return adapter, bundle.model, spec


@pytest.fixture(scope="module")
def original_onnx(family, tmp_path_factory):
    adapter, model, spec = family
    return export_onnx(model, spec, tmp_path_factory.mktemp("onnx") / "original.onnx", 17, "auto")


def test_temporal_sites_are_the_familys_temporal_attention(family):
    adapter, model, _ = family
    names = [s.attention for s in adapter.temporal_sites(model)]
    expected = {"modelscope": ["unet.transformer_in.transformer_blocks.0.attn1",
                               "unet.transformer_in.transformer_blocks.0.attn2"],
                "animatediff": ["unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1",
                                "unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn2"],
                "latte": ["transformer.temporal_transformer_blocks.0.attn1",
                          "transformer.temporal_transformer_blocks.1.attn1"]}[adapter.family]
    assert names[:2] == expected
    assert len(names) == {"modelscope": 10, "animatediff": 14, "latte": 2}[adapter.family]
    assert all(s.norm is not None and model.get_submodule(s.norm) is not None for s in adapter.temporal_sites(model))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_pruned_equals_masked_and_onnx_shrinks_by_the_removed_parameters(family, original_onnx, tmp_path, ratio):
    adapter, model, spec = family
    plan = make_plan(scores_for(model, adapter=adapter), PruningSection(ratio=ratio))
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(pruned, adapter.temporal_sites(pruned), plan)
    mask_heads(masked, adapter.temporal_sites(masked), plan)
    with torch.no_grad():
        assert torch.allclose(pruned(**spec.inputs), masked(**spec.inputs), atol=1e-5, rtol=1e-5)
    removed = parameter_count(model) - parameter_count(pruned)
    assert (removed > 0) == (ratio > 0)
    info = export_onnx(pruned, spec, tmp_path / "pruned.onnx", 17, "auto")
    expected = removed
    if adapter.family == "latte":
        # A fully removed Latte attention also leaves the shift and scale rows of its adaLN table dead
        # (the gate row stays): graph cleanup drops them, 2 x width per removed module.
        gone = [m for m, n in plan.head_counts().items() if n == 0]
        expected += sum(2 * model.get_submodule(m).to_out[0].out_features for m in gone)
    assert original_onnx.parameters - info.parameters == expected


def test_loads_a_local_diffusers_folder(family, tmp_path):
    adapter, model, spec = family
    model.inner.save_pretrained(tmp_path / model.component)
    bundle = adapter.load_folder(tmp_path)
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
    modelscope = get_adapter("modelscope").load_preset("tiny", seed=1).model
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
