"""Output-aware pruning: the ``sensitivity`` criterion, bias compensation and the attention-by-distance profile.

Each is checked against its definition computed the slow way: one head at a time through the masked model
(sensitivity), the attention module's output with and without the pruned heads (compensation), the attention
probabilities themselves (distance profile).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from f3export.calibrate import TemporalStatsRecorder, calibrate
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.errors import CheckpointError
from f3export.prune import compensate, compensation_shifts, make_plan, mask_heads, pruned_copy
from f3export.recipe import PruningSection, family_sections
from f3export.sensitivity import OutputMeasure, SensitivityProbe

from conftest import SMALL_SHAPE, TAV, joint_inputs as inputs, relative_l2, scores_for

ACTIONS = [("remove", 0), ("frame-local", 0), ("temporal-window", 1)]


@pytest.fixture(scope="module")
def joint(joint_family):
    return joint_family


def site_outputs(model, site, x) -> torch.Tensor:
    """What the attention at ``site`` returns for the model's input ``x``, every token (text too) in one tensor."""
    seen = []

    def hook(module, args, kwargs, out):
        seen.append(torch.cat([o.flatten(0, -2) for o in (out if isinstance(out, tuple) else (out,))]))
    handle = model.get_submodule(site.attention).register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("action, window", ACTIONS)
def test_compensation_means_are_the_mean_of_what_the_pruned_heads_no_longer_write(joint, action, window):
    """At the first attention (its input the same in both models): the shift ``compensate`` folds into the
    output bias is the mean over every token of the original's output minus the pruned one's."""
    adapter, bundle = joint
    model = bundle.model
    site = adapter.structure.temporal_sites(model)[0]
    x = inputs(adapter, model, 4)
    recorder = TemporalStatsRecorder(model, [site], steps=1, frames=4)
    with torch.no_grad(), recorder.attached():
        model(**x)
    writes = recorder.run.writes[site.attention]
    means = {part: (writes[part] / writes["write_queries"]).float() for part in ("written", "window_loss")}
    plan = make_plan(scores_for(model, adapter=adapter),
                     PruningSection(ratio=0.5, action=action, window=max(window, 1), compensate=True))
    masked = copy.deepcopy(model)
    mask_heads(masked, [site], plan.kept_heads, plan.local_heads, plan.window)
    lost = (site_outputs(model, site, x) - site_outputs(masked, site, x)).mean(dim=0)
    shift = compensation_shifts(plan, {module: means for module in plan.removed})[site.attention]
    assert plan.removed.get(site.attention) and lost.norm() > 1e-3
    assert relative_l2(shift, lost) < 1e-4


@pytest.mark.parametrize("action, window", ACTIONS)
def test_compensated_pruning_equals_the_masked_original_plus_that_constant(joint, action, window):
    adapter, bundle = joint
    section_type = family_sections(adapter.family)["calibration"]
    scores = calibrate(adapter, bundle, VideoShape(3, 8, 8), section_type(prompts=["a"], seeds=[0], steps=2))
    plan = make_plan(scores, PruningSection(ratio=0.5, action=action, window=max(window, 1), compensate=True))
    pruned = pruned_copy(adapter, bundle.model, plan, scores.compensation)
    plain = pruned_copy(adapter, bundle.model, dataclasses.replace(plan, compensate=False))
    reference = copy.deepcopy(bundle.model)
    sites = adapter.structure.temporal_sites(reference)
    mask_heads(reference, sites, plan.kept_heads, plan.local_heads, plan.window)
    compensate(reference, sites, compensation_shifts(plan, scores.compensation))
    with torch.no_grad():
        for frames in (2, 3):
            x = inputs(adapter, bundle.model, frames)
            assert relative_l2(pruned(**x), reference(**x)) < 1e-5, frames
            assert relative_l2(pruned(**x), plain(**x)) > 1e-4, frames  # the constant did something


def test_compensated_removal_on_a_temporal_only_attention_equals_masked_plus_constant(tiny_bundle):
    scores = calibrate(TAV, tiny_bundle, SMALL_SHAPE, family_sections("tune-a-video")["calibration"](
        prompts=["a"], seeds=[0], steps=2))
    plan = make_plan(scores, PruningSection(ratio=1.0, compensate=True))  # every module removed: bias alone
    pruned = pruned_copy(TAV, tiny_bundle.model, plan, scores.compensation)
    reference = copy.deepcopy(tiny_bundle.model)
    sites = TAV.structure.temporal_sites(reference)
    mask_heads(reference, sites, plan.kept_heads)
    compensate(reference, sites, compensation_shifts(plan, scores.compensation))
    x = TAV.export_spec(tiny_bundle.model, SMALL_SHAPE, batch=2, dynamic=[], seed=7).inputs
    with torch.no_grad():
        assert relative_l2(pruned(**x), reference(**x)) < 1e-5


def direct_sensitivity(adapter, model, x, action, window) -> dict[str, list[float]]:
    """One masked model per head: ||y_h - y|| / ||y||."""
    with torch.no_grad():
        y = model(**x)
    result = {}
    for site in adapter.structure.temporal_sites(model):
        heads = site.heads_of(model).heads
        changes = []
        for head in range(heads):
            masked = copy.deepcopy(model)
            kept = {site.attention: [h for h in range(heads) if h != head]} if action == "remove" else {}
            local = {site.attention: [head]} if action != "remove" else {}
            mask_heads(masked, adapter.structure.temporal_sites(masked), kept, local, window)
            with torch.no_grad():
                changes.append(((masked(**x) - y).norm() / y.norm()).item())
        result[site.attention] = changes
    return result


@pytest.mark.parametrize("action, window", ACTIONS)
def test_sensitivity_batched_over_heads_equals_one_masked_model_per_head(joint, action, window):
    adapter, bundle = joint
    model = bundle.model
    x = inputs(adapter, model, 3)
    sites = adapter.structure.temporal_sites(model)
    probe = SensitivityProbe(model, model, sites, OutputMeasure(action, window, per_pass=3), lambda c: None,
                             lambda: torch.no_grad())
    with torch.no_grad():
        measured = probe.changes(model(**x), (), x)
    expected = direct_sensitivity(adapter, model, x, action, window)
    for site in sites:
        assert torch.allclose(measured[site.attention].float(), torch.tensor(expected[site.attention]),
                              rtol=1e-4, atol=1e-6), site.attention
        assert measured[site.attention].min() > 1e-4  # every head matters here


def test_sensitivity_of_temporal_attention_heads_on_a_unet(tiny_bundle):
    model = tiny_bundle.model
    x = TAV.export_spec(model, SMALL_SHAPE, batch=2, dynamic=[], seed=7).inputs
    sites = TAV.structure.temporal_sites(model)[:2]
    probe = SensitivityProbe(model, model, sites, OutputMeasure("remove", per_pass=5), lambda c: None,
                             lambda: torch.no_grad())
    with torch.no_grad():
        measured = probe.changes(model(**x), (), x)
    expected = direct_sensitivity(TAV, model, x, "remove", 0)
    for site in sites:
        assert torch.allclose(measured[site.attention].float(), torch.tensor(expected[site.attention]),
                              rtol=1e-4, atol=1e-7)


def test_calibration_measures_sensitivity_per_step_and_the_plan_ranks_by_it(joint):
    adapter, bundle = joint
    section = family_sections(adapter.family)["calibration"](prompts=["a"], seeds=[0], steps=2)
    measure = OutputMeasure("temporal-window", 1, per_pass=4)
    scores = calibrate(adapter, bundle, VideoShape(3, 8, 8), section, measure=measure)
    assert scores.sensitivity_of == {"action": "temporal-window", "window": 1}
    for module in scores.modules.values():
        per_step = torch.tensor(module.per_step["sensitivity"])
        assert per_step.shape == (2, module.heads) and (per_step > 0).all()
        assert torch.allclose(per_step.mean(0), torch.tensor(module.scores["sensitivity"]).float(), rtol=1e-5)
    plan = make_plan(scores, PruningSection(ratio=0.25, criterion="sensitivity", action="temporal-window"))
    lowest = sorted((s, m, h) for m, module in scores.modules.items()
                    for h, s in enumerate(module.scores["sensitivity"]))[:2]
    assert {(m, h) for _, m, h in lowest} == {(m, h) for m, heads in plan.removed.items() for h in heads}


def test_the_distance_profile_splits_every_heads_attention_by_frame_distance(joint, tiny_bundle):
    adapter, bundle = joint
    section = family_sections(adapter.family)["calibration"](prompts=["a"], seeds=[0], steps=1)
    scores = calibrate(adapter, bundle, VideoShape(4, 8, 8), section)
    for module in scores.modules.values():
        mass = torch.tensor(module.distance_mass)  # [heads, frames]: mass on video keys d frames away
        assert mass.shape == (module.heads, 4) and (mass > 0).all()
        video = mass.sum(dim=1)
        # the keys of other frames: the mixing criterion
        assert torch.allclose(mass[:, 1:].sum(dim=1), torch.tensor(module.scores["mixing"]), rtol=1e-5)
        if adapter.family == "wan":  # no text in the sequence: every key is a video key
            assert torch.allclose(video, torch.ones_like(video), atol=1e-5)
        else:
            assert (video < 1).all()
    temporal = calibrate(TAV, tiny_bundle, SMALL_SHAPE, family_sections("tune-a-video")["calibration"](
        prompts=["a"], seeds=[0], steps=1))
    for module in temporal.modules.values():
        mass = torch.tensor(module.distance_mass)
        assert torch.allclose(mass.sum(dim=1), torch.ones(module.heads, dtype=mass.dtype), atol=1e-5)


def test_windowed_heads_lose_less_the_wider_the_window(joint):
    adapter, bundle = joint
    section = family_sections(adapter.family)["calibration"](prompts=["a"], seeds=[0], steps=1)
    scores = calibrate(adapter, bundle, VideoShape(4, 8, 8), section)
    for parts in scores.compensation.values():
        loss = parts["window_loss"]  # [heads, frames, C]
        assert loss.shape[1] == 4 and loss[:, 3].abs().max() < 1e-6  # a window over the whole clip loses nothing
        assert (loss[:, 0].norm(dim=-1) > 1e-4).all()


def test_a_window_needs_the_temporal_window_action_and_compensation_a_family_that_measures_it(write_recipe):
    from click.testing import CliRunner

    from f3export.cli import main

    path = write_recipe('[model]\nfamily = "cogvideox"\npreset = "tiny"\n[pruning]\naction = "frame-local"\n'
                        'window = 2\n', name="window")
    result = CliRunner().invoke(main, ["build", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: window.toml: [pruning].window is read only by action = "
                                     "'temporal-window' (the recipe's action is 'frame-local')")
    plan = make_plan(scores_for(TAV.checkpoint.load_preset("tiny", seed=0).model),
                     PruningSection(ratio=0.5, compensate=True))
    with pytest.raises(CheckpointError, match="measured no compensation means"):
        compensation_shifts(plan, None)


def test_the_task_drop_gate_limits_how_much_the_task_metric_may_fall():
    from f3export.validate import PruningFidelity, pruning_gates

    section = family_sections("cogvideox")["validation"](task="moving-shapes", pruning_max_task_drop=0.1,
                                                         pruning_min_step_cosine=None, pruning_min_latent_psnr=None)
    adapter = get_adapter("cogvideox")
    for pruned, passed in ((0.75, True), (0.625, False)):
        result = PruningFidelity({}, [], {"original": {"direction_accuracy": 0.8125, "smoothness": 0.8},
                                          "pruned": {"direction_accuracy": pruned, "smoothness": 3.0}},
                                 {"direction_accuracy": 0.25})
        (gate,) = pruning_gates(adapter, result, section)
        assert gate.metric == "pruning.task_direction_accuracy_drop" and gate.passed == passed
        assert gate.value == pytest.approx(0.8125 - pruned)
