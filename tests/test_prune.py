"""Physical pruning removes exactly the planned heads and nothing else."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffusers.models.attention_processor import Attention

from f3export.errors import CheckpointError
from f3export.models.attention import RemovedAttention
from f3export.models.structure import TemporalSite
from f3export.prune import (PRUNED_CONFIG, PruningPlan, apply_plan, load_pruned, make_plan, mask_heads,
                            parameter_count, save_pruned)
from f3export.recipe import PruningSection

from conftest import TAV, scores_for


def expected_removed_parameters(model, plan: PruningPlan) -> int:
    total = 0
    for module, heads in plan.removed.items():
        attn = model.get_submodule(module)
        width, head_dim = attn.to_out[0].out_features, attn.inner_dim // attn.heads
        total += len(heads) * 4 * width * head_dim  # q, k, v rows and output columns
        if len(heads) == attn.heads:
            total += 2 * width  # the norm goes with the module; the output bias stays
    return total


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_pruned_model_equals_original_with_heads_masked(tiny_model, small_inputs, ratio):
    plan = make_plan(scores_for(tiny_model), PruningSection(ratio=ratio))
    assert plan.removed_heads == round(ratio * 56)
    pruned, masked = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    apply_plan(pruned, TAV.structure.temporal_sites(pruned), plan.kept_heads)
    mask_heads(masked, TAV.structure.temporal_sites(masked), plan.kept_heads)
    with torch.no_grad():
        out_pruned, out_masked, out_original = (m(**small_inputs) for m in (pruned, masked, tiny_model))
    assert torch.allclose(out_pruned, out_masked, atol=1e-5, rtol=1e-5)
    assert parameter_count(tiny_model) - parameter_count(pruned) == expected_removed_parameters(tiny_model, plan)
    if ratio > 0:
        assert not torch.allclose(out_pruned, out_original, atol=1e-3)  # pruning did change the function


def test_module_losing_all_heads_keeps_only_its_output_bias(tiny_model):
    module = TAV.structure.temporal_sites(tiny_model)[0]
    bias = tiny_model.get_submodule(module.attention).to_out[0].bias.detach().clone()
    apply_plan(tiny_model, [module], {module.attention: []})
    removed = tiny_model.get_submodule(module.attention)
    assert isinstance(removed, RemovedAttention)
    assert torch.equal(removed.bias, bias)
    assert isinstance(tiny_model.get_submodule(module.norm), torch.nn.Identity)


def test_global_ranking_removes_lowest_scores_across_modules(tiny_model):
    scores = scores_for(tiny_model)
    plan = make_plan(scores, PruningSection(ratio=0.25))
    removed = [scores.modules[m].scores["contribution"][h] for m, hs in plan.removed.items() for h in hs]
    kept = [scores.modules[m].scores["contribution"][h] for m, hs in plan.kept_heads.items() for h in hs]
    assert len(removed) == 14 and max(removed) < min(kept)


def test_module_scope_removes_the_ratio_from_every_module(tiny_model):
    plan = make_plan(scores_for(tiny_model), PruningSection(scope="module", ratio=0.25))
    assert {m: len(h) for m, h in plan.removed.items()} == {m: 2 for m in plan.heads}


def test_min_heads_and_keep_limit_what_goes(tiny_model):
    plan = make_plan(scores_for(tiny_model), PruningSection(ratio=1.0, min_heads_per_module=3, keep=["mid_block.*"]))
    counts = plan.head_counts()
    assert all(n == 3 for m, n in counts.items() if not m.startswith("mid_block"))
    assert [n for m, n in counts.items() if m.startswith("mid_block")] == [8]
    assert plan.removed_heads == 6 * 5


def test_saved_pruned_model_reloads_with_its_head_counts(tmp_path, tiny_bundle, tiny_model, small_inputs):
    plan = make_plan(scores_for(tiny_model, seed=4), PruningSection(ratio=0.6))
    apply_plan(tiny_model, TAV.structure.temporal_sites(tiny_model), plan.kept_heads)
    save_pruned(TAV, tiny_bundle.config, tiny_model, plan.kept_heads, tmp_path)
    adapter, _, reloaded = load_pruned(tmp_path)
    assert adapter.family == TAV.family
    assert {s.attention: getattr(reloaded.get_submodule(s.attention), "heads", 0)
            for s in TAV.structure.temporal_sites(reloaded)} == plan.head_counts()
    with torch.no_grad():
        assert torch.equal(reloaded(**small_inputs), tiny_model(**small_inputs))


def test_a_reload_rebuilds_exactly_the_recorded_kept_heads_not_the_first_ones(tmp_path, tiny_bundle, tiny_model,
                                                                                small_inputs):
    sites = TAV.structure.temporal_sites(tiny_model)
    kept = {sites[0].attention: [1, 4, 6], sites[1].attention: [], sites[2].attention: [0, 7]}
    masked = copy.deepcopy(tiny_model)
    mask_heads(masked, TAV.structure.temporal_sites(masked), kept)
    apply_plan(tiny_model, sites, kept)
    save_pruned(TAV, tiny_bundle.config, tiny_model, kept, tmp_path)
    assert json.loads((tmp_path / PRUNED_CONFIG).read_text())["kept_heads"] == kept
    _, _, reloaded = load_pruned(tmp_path)
    assert [getattr(reloaded.get_submodule(s.attention), "heads", 0) for s in sites[:4]] == [3, 0, 2, 8]
    with torch.no_grad():
        out_reloaded, out_masked = reloaded(**small_inputs), masked(**small_inputs)
        assert torch.equal(out_reloaded, tiny_model(**small_inputs))
    assert torch.allclose(out_reloaded, out_masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("indices", [[8], [2, 1], [1, 1], ["0"]])
def test_a_pruned_config_whose_kept_heads_are_not_head_indices_is_refused_in_one_line(tmp_path, tiny_bundle,
                                                                                     tiny_model, indices):
    module = TAV.structure.temporal_sites(tiny_model)[0].attention
    save_pruned(TAV, tiny_bundle.config, tiny_model, {}, tmp_path)
    config = json.loads((tmp_path / PRUNED_CONFIG).read_text())
    (tmp_path / PRUNED_CONFIG).write_text(json.dumps({**config, "kept_heads": {module: indices}}))
    with pytest.raises(CheckpointError) as refused:
        load_pruned(tmp_path)
    assert str(refused.value) == (f"{tmp_path / PRUNED_CONFIG}: kept_heads[{module!r}] = {indices!r} is not an "
                                  "ascending list of distinct head indices in [0, 7]")


@pytest.mark.parametrize("options, problem", [
    ({"kv_heads": 2}, "grouped-query attention (2 key/value heads for 8 query heads)"),
    ({"added_kv_proj_dim": 16}, "attention with added key/value projections"),
])
def test_attention_head_pruning_cannot_serve_is_refused_in_one_line_naming_the_module(options, problem):
    model = torch.nn.Module()
    model.temporal = Attention(query_dim=64, heads=8, dim_head=8, **options)
    with pytest.raises(CheckpointError) as refused:
        TemporalSite("temporal").heads_of(model)
    assert str(refused.value) == f"temporal: {problem} is not supported by head pruning"
