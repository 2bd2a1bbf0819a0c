"""Behaviours that realistic bugs broke without any test failing (issue 13, hand-made mutation testing).

Each test names the behaviour; its comment names the mutant it kills.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import f3export.export as export_module
from f3export.calibrate import calibrate
from f3export.errors import RecipeError
from f3export.export import export_onnx
from f3export.models.base import VideoShape
from f3export.prune import apply_plan, make_plan, mask_heads
from f3export.recipe import PruningSection, family_sections, load_recipe
from f3export.validate import Comparison, pruning_fidelity, pruning_gates

from conftest import FAST_RECIPE, SMALL_SHAPE, TAV, rebuild, run, scores_for

# With the family's own keys (steps, guidance_scale, its gates' limits).
CalibrationSection, ValidationSection = (family_sections(TAV.family)[s] for s in ("calibration", "validation"))


# -- planning -----------------------------------------------------------------------------------------------
# Kills: ratio x heads truncated (int(...)) or banker's-rounded (round(...)) instead of rounded half up.
@pytest.mark.parametrize("scope, ratio, removed", [
    ("global", 0.3, 17),      # 0.3 x 56 = 16.8
    ("module", 0.45, 7 * 4),  # 0.45 x 8 = 3.6 per module
    ("module", 0.5625, 7 * 5),  # 0.5625 x 8 = 4.5 per module: half up
])
def test_the_ratio_of_heads_is_rounded_half_up_not_truncated(tiny_model, scope, ratio, removed):
    plan = make_plan(scores_for(tiny_model), PruningSection(scope=scope, ratio=ratio))
    assert plan.removed_heads == removed


# Kills: `keep` and `min_heads_per_module` honoured by scope = "global" only.
def test_module_scope_honours_keep_and_min_heads_per_module(tiny_model):
    plan = make_plan(scores_for(tiny_model), PruningSection(scope="module", ratio=1.0, min_heads_per_module=3,
                                                            keep=["mid_block.*"]))
    counts = plan.head_counts()
    assert {n for m, n in counts.items() if not m.startswith("mid_block")} == {3}
    assert [n for m, n in counts.items() if m.startswith("mid_block")] == [8]


# -- head slicing ---------------------------------------------------------------------------------------------
# Kills: the bias branch of head slicing (q/k/v rows) dropped or slicing the wrong rows; no family's diffusers
# attention has q/k/v biases, so without this test the branch never runs for Tune-A-Video.
def test_pruning_keeps_the_bias_rows_of_biased_q_k_v_projections(tiny_model, small_inputs):
    generator = torch.Generator().manual_seed(5)
    for site in TAV.structure.temporal_sites(tiny_model):
        attn = tiny_model.get_submodule(site.attention)
        for name in ("to_q", "to_k", "to_v"):
            old = getattr(attn, name)
            biased = nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                biased.weight.copy_(old.weight)
                biased.bias.copy_(torch.randn(old.out_features, generator=generator))
            setattr(attn, name, biased)
    plan = make_plan(scores_for(tiny_model, seed=2), PruningSection(ratio=0.5))
    pruned, masked = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    apply_plan(pruned, TAV.structure.temporal_sites(pruned), plan.kept_heads)
    mask_heads(masked, TAV.structure.temporal_sites(masked), plan.kept_heads)
    with torch.no_grad():
        assert torch.allclose(pruned(**small_inputs), masked(**small_inputs), atol=1e-5, rtol=1e-5)


# -- Tune-A-Video's sparse-causal attention -------------------------------------------------------------------
# Kills: the `previous` frame index not clamped at frame 0 (index -1 wraps to the last frame).
def test_frame_0_of_sparse_causal_attention_reads_only_itself(tiny_model):
    attn = tiny_model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    frames, tokens, width = 5, 6, attn.to_q.in_features
    x = torch.randn(frames, tokens, width, generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[frames - 1] += 1.0  # the last frame is read by itself only
    with torch.no_grad():
        before, after = attn(x, video_length=frames), attn(changed, video_length=frames)
    moved = [(after[f] - before[f]).abs().max().item() > 1e-6 for f in range(frames)]
    assert moved == [False, False, False, False, True]


# -- calibration ----------------------------------------------------------------------------------------------
# Kills: the residual norm taken after the temporal norm (its pre-hook keyed by the wrong name, so the
# attention's own, normalised, input is used). Scaling the norm's gain by s (q and k scaled back by 1/s)
# scales each head's output by s; divided by the residual stream before the norm, contribution scales by s.
def test_contribution_divides_by_the_residual_stream_before_the_temporal_norm(tiny_bundle):
    section = CalibrationSection(prompts=["a man is skiing"], seeds=[0], steps=1)
    first = TAV.structure.temporal_sites(tiny_bundle.model)[0]  # nothing upstream of it changes
    scaled = copy.deepcopy(tiny_bundle)
    with torch.no_grad():
        norm, attn = scaled.model.get_submodule(first.norm), scaled.model.get_submodule(first.attention)
        norm.bias.zero_()
        norm.weight.mul_(2.0)
        attn.to_q.weight.mul_(0.5)
        attn.to_k.weight.mul_(0.5)
    reference = copy.deepcopy(tiny_bundle)
    with torch.no_grad():
        reference.model.get_submodule(first.norm).bias.zero_()
    base, doubled = (calibrate(TAV, b, SMALL_SHAPE, section).modules[first.attention].scores["contribution"]
                     for b in (reference, scaled))
    assert doubled == pytest.approx([2 * c for c in base], rel=1e-4)


# Kills: mixing computed as 1 - max_g A[f, g] instead of 1 - A[f, f] (equal for uniform attention, which is
# all the older test used). Here every frame attends almost only to frame 0.
def test_mixing_is_the_mass_off_the_diagonal_not_one_minus_the_largest_probability(tiny_model):
    site = TAV.structure.temporal_sites(tiny_model)[0]
    attn = tiny_model.get_submodule(site.attention)
    width = attn.to_q.in_features
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(width) * 8.0)
        attn.to_k.weight.copy_(torch.eye(width) * 8.0)
    direction = torch.ones(width) / math.sqrt(width)
    x = direction.repeat(3, 4, 1)  # [sequences, frames, channels]
    x[:, 0] *= 3.0  # frame 0's key dominates every query
    heads = site.heads_of(tiny_model)
    statistics, tokens, _ = heads.statistics(x, x.norm(dim=-1))
    scale = attn.scale
    q = k = (x @ attn.to_q.weight.t()).reshape(3, 4, heads.heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    expected = (1 - probs.diagonal(dim1=-2, dim2=-1)).sum(dim=(0, 2)) / tokens
    assert expected.min() > 0.7  # frames 1..3 sit almost entirely off the diagonal
    assert (statistics["mixing"] / tokens).tolist() == pytest.approx(expected.tolist(), rel=1e-5)


# Kills: per-step sums overwritten (=) instead of accumulated (+=) across runs and calls.
def test_per_step_statistics_accumulate_over_every_run(tiny_bundle):
    def per_step(prompts):
        section = CalibrationSection(prompts=prompts, seeds=[0], steps=2)
        return calibrate(TAV, tiny_bundle, SMALL_SHAPE, section).modules

    together, alone = per_step(["a", "b"]), [per_step(["a"]), per_step(["b"])]
    for name, module in together.items():
        for criterion in ("contribution", "mixing"):
            mean = (np.array(alone[0][name].per_step[criterion]) + np.array(alone[1][name].per_step[criterion])) / 2
            assert np.allclose(module.per_step[criterion], mean, rtol=1e-6), (name, criterion)
            assert np.allclose(module.scores[criterion], mean.mean(axis=0), rtol=1e-6), (name, criterion)


# -- export ---------------------------------------------------------------------------------------------------
# Kills: the "height" and "width" dynamic-axis names swapped (invisible at square latents).
def test_non_square_latents_name_height_and_width_on_their_own_axes(tiny_model, tmp_path):
    shape = VideoShape(frames=2, latent_height=8, latent_width=16)
    spec = TAV.export_spec(tiny_model, shape, batch=1, dynamic=["batch", "frames", "height", "width"])
    export_onnx(tiny_model, spec, tmp_path / "model.onnx", 17, "auto")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    for value in (graph.input[0], graph.output[0]):
        assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == \
            ["batch", 4, "frames", "height", "width"], value.name


# Kills: the external-data threshold changed (2**32, a typo in the 0.9 margin, >= for >).
def test_the_external_data_threshold_is_nine_tenths_of_the_protobuf_limit(tiny_model, small_inputs, tmp_path,
                                                                           monkeypatch):
    assert export_module.PROTOBUF_LIMIT == onnx.checker.MAXIMUM_PROTOBUF + 1  # 2 GiB: protobuf's largest is 2**31 - 1
    spec = TAV.export_spec(tiny_model, SMALL_SHAPE, batch=2, dynamic=[])
    weight_bytes = sum(t.numel() * t.element_size() for t in tiny_model.state_dict().values())  # all read
    # The same rule at a scale a tiny model reaches: external exactly when the weights exceed 0.9 x limit.
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", weight_bytes / 0.9)
    assert not export_onnx(tiny_model, spec, tmp_path / "at.onnx", 17, "auto").external_data
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", (weight_bytes - 1) / 0.9)
    assert export_onnx(tiny_model, spec, tmp_path / "over.onnx", 17, "auto").external_data


# -- validation -----------------------------------------------------------------------------------------------
# Kills: relative L2 without the square root (||a - r||^2 / ||r||^2).
def test_relative_l2_is_the_ratio_of_norms():
    reference = np.array([3.0, 4.0])  # norm 5
    comparison = Comparison.of(reference + np.array([0.3, 0.4]), reference)  # difference of norm 0.5
    assert comparison.rel_l2 == pytest.approx(0.1, rel=1e-12)
    assert comparison.max_abs == pytest.approx(0.4) and comparison.cosine == pytest.approx(1.0)


class NanAtTheLastStep(nn.Module):
    """A pruned model that overflows late in the trajectory (as fp16 can): NaN once the timestep is small."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, sample, timestep, encoder_hidden_states):
        out = self.inner(sample, timestep, encoder_hidden_states)
        return out * math.nan if float(timestep[0]) < 100 else out


# Kills: the fidelity summary skipping NaN (np.nanmin / nanmean), which would pass a model that breaks at one step.
def test_a_nan_at_one_step_makes_the_fidelity_minimum_nan_and_fails_its_gate(tiny_bundle):
    section = ValidationSection(prompts=["a dog is running"], seeds=[1000], steps=3, pruning_min_step_cosine=0.5,
                                pruning_min_latent_psnr=5.0)
    fidelity = pruning_fidelity(TAV, tiny_bundle, NanAtTheLastStep(tiny_bundle.model), SMALL_SHAPE, section)
    cosines = fidelity.per_run[0]["step_cosine"]
    assert [math.isnan(c) for c in cosines] == [False, False, True]
    assert math.isnan(fidelity.summary["step_cosine_min"]) and math.isnan(fidelity.summary["step_cosine_mean"])
    gate = next(g for g in pruning_gates(TAV, fidelity, section) if g.metric == "pruning.step_cosine_min")
    assert not gate.passed


# -- recipe ranges --------------------------------------------------------------------------------------------
# Kills: a range check off by one at its boundary (< for <=), in the key bounds and in the profile ranges.
@pytest.mark.parametrize("override, accepted", [
    ("pruning.ratio=0.0", True), ("pruning.ratio=1.0", True), ("pruning.ratio=1.0001", False),
    ("export.opset=17", True), ("export.opset=23", True), ("export.opset=16", False), ("export.opset=24", False),
    ("model.frames=1", True), ("model.frames=1024", True), ("model.frames=0", False), ("model.frames=1025", False),
    ("engine.profile_frames=[4, 4, 6]", True), ("engine.profile_frames=[2, 4, 4]", True),
    ("engine.profile_frames=[5, 5, 6]", False), ("engine.profile_frames=[2, 3, 3]", False),
])
def test_range_bounds_are_inclusive(write_recipe, override, accepted):
    path = write_recipe()
    if accepted:
        load_recipe(path, [override])
    else:
        with pytest.raises(RecipeError) as refused:
            load_recipe(path, [override])
        assert override.split("=")[0].split(".")[1] in str(refused.value)


# -- cache keys and check -------------------------------------------------------------------------------------
# Kills: a stage key that drops the shape (calibration would reuse scores measured at another shape).
def test_a_changed_shape_reruns_every_stage_that_runs_the_model(rebuildable):
    path, root = rebuildable
    before, after = rebuild(path, root, "--set", "model.latent_width=16")
    for stage in ("calibrate", "export", "validate"):
        assert after[stage]["key"] != before[stage]["key"], stage
    assert json.loads((root / "validation.json").read_text())["shapes"][0]["width"] == 16


# Kills: `check` skipping the hash of one class of file (the goldens): a golden re-saved with outputs moved
# by a tolerable 1e-9 still passes the export gates, so only its hash can tell.
def test_check_refuses_goldens_changed_after_the_build(rebuildable):
    _, root = rebuildable
    golden = root / "goldens" / "pruned.npz"
    with np.load(golden) as data:
        arrays = {k: data[k] + 1e-9 if "/expected/" in k else data[k] for k in data.files}
    with open(golden, "wb") as handle:
        np.savez(handle, **arrays)
    result = run("check", root)
    assert result.exit_code == 1
    assert "goldens/pruned.npz" in result.output


# -- survivors of the mutmut sample (benchmarks/mutation.md), killed --------------------------------------
# Kills: scores.json dropping the family's note, or reading it back under another key.
def test_scores_keep_their_note_through_json():
    from f3export.calibrate import ModuleScores, Scores

    scores = Scores({"m": ModuleScores(2, 4, {"contribution": [1.0, 2.0]})}, [999], 1, note="frames 1 on")
    assert scores.to_json()["note"] == "frames 1 on"
    assert Scores.from_json(json.loads(json.dumps(scores.to_json()))).note == "frames 1 on"


# Kills: plan.json's modules_removed listing the modules that keep heads instead of those that lost all.
def test_the_plan_summary_lists_exactly_the_modules_that_lost_every_head(tiny_model):
    plan = make_plan(scores_for(tiny_model), PruningSection(scope="module", ratio=1.0, keep=["mid_block.*"]))
    removed = plan.to_json()["summary"]["modules_removed"]
    assert removed == sorted(m for m in plan.kept_heads if not m.startswith("mid_block"))
    assert make_plan(scores_for(tiny_model), PruningSection(ratio=0.0)).to_json()["summary"]["modules_removed"] == []


# Kills: a gate's verdict or kind written otherwise in validation.json (check reads them from there).
def test_validation_json_records_each_gates_verdict(built):
    _, root, _ = built
    gates = json.loads((root / "validation.json").read_text())["gates"]
    assert gates and all(set(g) == {"metric", "value", "limit", "kind", "passed"} and g["passed"] is True
                         for g in gates)
    assert {g["kind"] for g in gates if g["metric"].startswith("pruning.")} == {"min"}  # fidelity floors


# Kills: the type name of a boolean key in its error message.
def test_a_boolean_key_given_a_string_says_true_or_false(write_recipe):
    recipe = FAST_RECIPE.replace("[pruning]", '[engine]\nbackend = "tensorrt"\nfp32_norms = "yes"\n\n[pruning]')
    with pytest.raises(RecipeError, match=r"\[engine\]\.fp32_norms: expected true or false, got str 'yes'"):
        load_recipe(write_recipe(recipe))


# Kills: an all-pruned attention without an output bias (bias=None) given one, or its output never computed.
def test_an_attention_pruned_away_without_an_output_bias_writes_nothing():
    from f3export.models.attention import RemovedAttention

    hidden = torch.randn(2, 5, 16)
    unbiased, biased = RemovedAttention(16, None), RemovedAttention(16, torch.arange(16.0))
    assert unbiased.bias is None and len(list(unbiased.parameters())) == 0
    assert torch.equal(unbiased(hidden), torch.zeros(2, 5, 16)) and torch.equal(unbiased.add_to(hidden), hidden)
    assert torch.equal(biased(hidden), torch.arange(16.0).expand(2, 5, 16))


# Kills: save_pruned no longer creating missing parent folders.
def test_a_pruned_model_saves_into_a_folder_not_made_yet(tmp_path, tiny_bundle):
    from f3export.prune import load_pruned, save_pruned

    folder = tmp_path / "not" / "made" / "pruned"
    save_pruned(TAV, tiny_bundle.config, tiny_bundle.model, {}, folder)
    assert load_pruned(folder)[2] is not None


# Kills: the adapter options of a recipe-described family dropped when a pruned model is reloaded; a
# missing key or an unknown module in the pruned config accepted or reported without its name.
def test_a_pruned_model_reloads_with_its_adapter_options_and_refuses_what_it_does_not_know(tmp_path):
    from f3export.errors import CheckpointError
    from f3export.models import get_adapter
    from f3export.prune import PRUNED_CONFIG, load_pruned, save_pruned

    options = {"class_name": "UNet3DConditionModel", "temporal_modules": ["*temp_attentions.*.attn[12]"],
               "text_per_frame": False}
    custom = get_adapter("diffusers", options)
    bundle = get_adapter("modelscope").checkpoint.load_preset("tiny", seed=1)
    save_pruned(custom, bundle.config, bundle.model, {}, tmp_path)
    adapter, _, _ = load_pruned(tmp_path)
    assert adapter.options() == options
    config = json.loads((tmp_path / PRUNED_CONFIG).read_text())
    (tmp_path / PRUNED_CONFIG).write_text(json.dumps({k: v for k, v in config.items() if k != "config"}))
    with pytest.raises(CheckpointError, match=r"/config\.json: missing or unknown 'config'$"):
        load_pruned(tmp_path)
    (tmp_path / PRUNED_CONFIG).write_text(json.dumps({**config, "kept_heads": {"unet.nowhere.attn1": [0]}}))
    with pytest.raises(CheckpointError, match=r"unknown temporal module 'unet.nowhere.attn1'"):
        load_pruned(tmp_path)


# Kills: fp32 engines gated with the fp16 tolerances (the precision compared in another case, or the cosine
# limit taken from the fp16 key).
def test_an_fp32_engine_is_gated_with_the_fp32_tolerances(built):
    _, root, _ = built
    gates = {g["metric"]: g["limit"] for g in json.loads((root / "validation.json").read_text())["gates"]}
    assert gates["export.pruned.onnxruntime.rel_l2"] == 1e-4 and gates["export.pruned.onnxruntime.cosine"] == 0.9999


# Kills: head slicing giving a bias-free output projection a (randomly initialised) bias.
def test_slicing_a_bias_free_projection_keeps_it_bias_free():
    from f3export.models.attention import keep_columns, keep_rows

    linear = nn.Linear(8, 6, bias=False)
    index = torch.tensor([0, 2, 5])
    columns, rows = keep_columns(linear, index), keep_rows(linear, index)
    assert columns.bias is None and rows.bias is None
    x = torch.randn(3, 8)
    assert torch.equal(columns(x[:, index]), x[:, index] @ linear.weight[:, index].T)


# Kills: a pruned diffusers attention whose inner_dim no longer says heads x head_dim.
def test_a_pruned_diffusers_attention_records_its_new_inner_width(tiny_model):
    site = TAV.structure.temporal_sites(tiny_model)[0]
    heads = site.heads_of(tiny_model)
    width = heads.head_dim
    heads.keep([1, 4, 6])
    attn = tiny_model.get_submodule(site.attention)
    assert attn.heads == 3 and attn.inner_dim == attn.inner_kv_dim == 3 * width


# Kills: calibration reading hidden_states only when passed positionally, needing a residual-stream norm from
# a norm hook a site without a norm never has, or recording before the first step into no step in particular.
def test_calibration_hooks_read_keyword_inputs_and_sites_without_a_norm(tiny_model):
    from f3export.calibrate import TemporalStatsRecorder
    from f3export.models.structure import TemporalSite

    site = TAV.structure.temporal_sites(tiny_model)[0]
    bare = TemporalSite(site.attention)  # no norm: the attention's own input stands for the residual stream
    attn = tiny_model.get_submodule(site.attention)
    hidden = torch.randn(4, 3, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    recorded = []
    for call in (lambda: attn(hidden), lambda: attn(hidden_states=hidden)):
        recorder = TemporalStatsRecorder(tiny_model, [bare], steps=2, frames=3)
        with torch.no_grad(), recorder.attached():
            call()  # before any step is announced: the first step's
        recorded.append(recorder.sums[site.attention]["contribution"])
    assert recorded[0][0].abs().sum() > 0 and recorded[0][1].abs().sum() == 0
    assert torch.equal(recorded[0], recorded[1])


# Kills: an integer given for a number key not converted (or converted to infinity at the largest float);
# a profile triple of the wrong length crashing instead of being named.
def test_number_keys_take_integers_up_to_the_largest_float(write_recipe):
    import sys

    recipe = load_recipe(write_recipe(FAST_RECIPE.replace("ratio = 0.5", "ratio = 1")))
    assert recipe.pruning.ratio == 1.0 and type(recipe.pruning.ratio) is float
    largest = int(sys.float_info.max)
    text = FAST_RECIPE.replace("[validation]", f"[validation]\nexport_max_rel_l2 = {largest}")
    recipe = load_recipe(write_recipe(text))
    assert recipe.validation.export_max_rel_l2 == sys.float_info.max


def test_a_profile_that_is_not_a_triple_is_named(write_recipe):
    recipe = FAST_RECIPE.replace("[pruning]", "[engine]\nprofile_frames = [2, 4]\n\n[pruning]")
    with pytest.raises(RecipeError, match=r"profile_frames = \[2, 4\]: expected \[min, opt, max\]"):
        load_recipe(write_recipe(recipe))


# Kills: a comparison with non-finite values not counting them, or not reporting the worst agreement.
def test_a_comparison_with_a_nan_counts_it_and_is_the_worst_possible():
    result = Comparison.of(np.array([1.0, np.nan, np.inf]), np.array([1.0, 2.0, 3.0]))
    assert result == Comparison(math.inf, math.inf, -1.0, 2)
