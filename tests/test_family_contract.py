"""The contract every family keeps, written once and run over all eight (diffusers' ModelTesterMixin, for pruning).

1. Pruning is exact: the pruned model computes what the original computes with the pruned heads masked (the
   family's default action: removed heads' output columns zeroed, frame-local heads' cross-frame scores at -inf).
2. Accounting is exact: torch loses the removed heads' parameters (plus the own norm of a module that loses
   all of them), and the ONNX graph loses exactly those too, plus what a family's graph folds away on top;
   frame-local heads keep every parameter.
3. The on-disk format round-trips: a saved pruned model reloads to the same function and head counts.
4. Calibration scores are finite and deterministic.

Family-specific behaviour (layouts, checkpoints, refusals) stays in that family's own test file.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from f3export.calibrate import calibrate
from f3export.export import export_onnx
from f3export.models import FAMILIES, get_adapter
from f3export.models.base import VideoShape
from f3export.prune import apply_plan, load_pruned, make_plan, mask_heads, parameter_count, save_pruned
from f3export.recipe import PruningSection, family_sections

from conftest import scores_for


def latte_adaln_rows(model, plan) -> int:
    """A fully removed Latte attention also leaves the shift and scale rows of its adaLN table dead (the
    gate row stays): graph cleanup drops them, 2 x width per removed module."""
    gone = [m for m, n in plan.head_counts().items() if n == 0]
    return sum(2 * model.get_submodule(m).to_out[0].out_features for m in gone)


def custom_diffusers(tmp_path_factory):
    """family "diffusers": a ModelScope network described by recipe keys alone, loaded from its folder."""
    folder = tmp_path_factory.mktemp("custom")
    get_adapter("modelscope").checkpoint.load_preset("tiny", seed=1).model.inner.save_pretrained(folder / "unet")
    adapter = get_adapter("diffusers", {"class_name": "UNet3DConditionModel",
                                        "temporal_modules": ["*temp_attentions.*.attn[12]"]})
    return adapter, adapter.checkpoint.load_folder(folder)


def preset(family):
    def load(_tmp_path_factory):
        adapter = get_adapter(family)
        return adapter, adapter.checkpoint.load_preset("tiny", seed=0)
    return load


# family -> (load, shape, ONNX parameters folded away beyond torch's removal). Latte's tiny preset is trained
# for 8 frames; CogVideo's tiny layout holds 5 frames of 8 x 8 tokens.
FAMILY_CASES = {
    "tune-a-video": (preset("tune-a-video"), VideoShape(4, 8, 8), None),
    "modelscope": (preset("modelscope"), VideoShape(4, 8, 8), None),
    "animatediff": (preset("animatediff"), VideoShape(4, 8, 8), None),
    "latte": (preset("latte"), VideoShape(8, 8, 8), latte_adaln_rows),
    "cogvideo": (preset("cogvideo"), VideoShape(5, 8, 8), None),
    "diffusers": (custom_diffusers, VideoShape(4, 8, 8), None),
    "cogvideox": (preset("cogvideox"), VideoShape(3, 8, 8), None),
    "wan": (preset("wan"), VideoShape(3, 8, 8), None),
}


def default_plan(adapter, scores, ratio):
    """The plan of a recipe that sets only the ratio: the family's default action."""
    return make_plan(scores, PruningSection(ratio=ratio, action=adapter.structure.actions[0]))


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def case(request, tmp_path_factory):
    load, shape, onnx_folds = FAMILY_CASES[request.param]
    adapter, bundle = load(tmp_path_factory)
    spec = adapter.export_spec(bundle.model, shape, batch=2, dynamic=["batch"], seed=3)
    original_onnx = export_onnx(bundle.model, spec, tmp_path_factory.mktemp("onnx") / "original.onnx", 17, "auto")
    return adapter, bundle, shape, spec, original_onnx, onnx_folds


def test_every_family_is_covered():
    assert set(FAMILY_CASES) == set(FAMILIES)


def expected_torch_removal(model, sites, plan) -> int:
    """Per removed head: its share of the module's head-owned parameters (all but the constant remainder a
    fully pruned module leaves); per fully removed module: also its own norm."""
    total = 0
    for site in sites:
        gone = plan.removed.get(site.attention, []) if plan.action == "remove" else []
        if not gone:
            continue
        heads = site.heads_of(model)
        owned = parameter_count(model.get_submodule(site.attention)) - parameter_count(heads.removed())
        assert owned % heads.heads == 0
        total += len(gone) * owned // heads.heads
        if len(gone) == heads.heads and site.own_norm is not None:
            total += parameter_count(model.get_submodule(site.own_norm))
    return total


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_pruned_equals_masked_and_onnx_shrinks_by_exactly_the_removed_parameters(case, tmp_path, ratio):
    adapter, bundle, _, spec, original_onnx, onnx_folds = case
    model = bundle.model
    plan = default_plan(adapter, scores_for(model, adapter=adapter), ratio)
    assert plan.removed_heads == round(ratio * plan.total_heads)
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(pruned, adapter.structure.temporal_sites(pruned), plan.kept_heads, plan.local_heads)
    mask_heads(masked, adapter.structure.temporal_sites(masked), plan.kept_heads, plan.local_heads)
    with torch.no_grad():
        out_pruned, out_masked, out_original = (m(**spec.inputs) for m in (pruned, masked, model))
    assert torch.allclose(out_pruned, out_masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_pruned, out_original) == (ratio == 0)  # pruning did change the function

    removed = parameter_count(model) - parameter_count(pruned)
    assert removed == expected_torch_removal(model, adapter.structure.temporal_sites(model), plan)
    assert (removed > 0) == (ratio > 0 and plan.action == "remove")
    if ratio == 0:
        return  # nothing removed: the model is the original (asserted above), so is its graph
    info = export_onnx(pruned, spec, tmp_path / "pruned.onnx", 17, "auto")
    folded = onnx_folds(model, plan) if onnx_folds else 0
    assert original_onnx.parameters - info.parameters == removed + folded


def test_a_pruned_model_round_trips_through_the_on_disk_format(case, tmp_path):
    adapter, bundle, _, spec, _, _ = case
    pruned = copy.deepcopy(bundle.model)
    plan = default_plan(adapter, scores_for(pruned, adapter=adapter, seed=4), 0.6)
    assert 0 < plan.removed_heads < plan.total_heads
    apply_plan(pruned, adapter.structure.temporal_sites(pruned), plan.kept_heads, plan.local_heads)
    save_pruned(adapter, bundle.config, pruned, plan.kept_heads, tmp_path / "pruned", plan.local_heads)
    loaded_adapter, config, reloaded = load_pruned(tmp_path / "pruned")
    assert (loaded_adapter.family, loaded_adapter.options(), config) == (adapter.family, adapter.options(),
                                                                         bundle.config)
    assert {s.attention: getattr(reloaded.get_submodule(s.attention), "heads", 0)
            for s in adapter.structure.temporal_sites(bundle.model)} == plan.head_counts()
    with torch.no_grad():
        assert torch.equal(reloaded(**spec.inputs), pruned(**spec.inputs))


def test_calibration_scores_are_finite_and_deterministic(case):
    adapter, bundle, shape, _, _, _ = case
    keys = {"prompts": ["a man is skiing"], "seeds": [0], "steps": 2}
    section_type = family_sections(adapter.family)["calibration"]  # with the family's own keys
    section = section_type(**{k: v for k, v in keys.items() if k in section_type.__dataclass_fields__})
    first, second = (calibrate(adapter, bundle, shape, section).to_json() for _ in range(2))
    assert first == second
    sites = adapter.structure.temporal_sites(bundle.model)
    assert list(first["modules"]) == [s.attention for s in sites]
    for site in sites:
        module = first["modules"][site.attention]
        assert module["heads"] == site.heads_of(bundle.model).heads
        assert set(module["scores"]) == set(first["criteria"])
        for criterion, values in module["scores"].items():
            assert len(values) == module["heads"] and all(math.isfinite(v) for v in values), criterion
        assert all(v > 0 for v in module["scores"]["contribution"] + module["scores"]["magnitude"])
        assert all(0 <= v <= 1 for v in module["scores"]["mixing"])
