"""Head statistics are what DESIGN.md defines, measured on the real forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from f3export.calibrate import calibrate
from f3export.criteria import CRITERIA, TokenScorer, WeightScorer, contribution, magnitude
from f3export.models.attention import DiffusersAttentionHeads
from f3export.prune import make_plan
from f3export.recipe import PruningSection, family_sections, load_recipe

from conftest import FAST_RECIPE, SMALL_SHAPE, TAV

CalibrationSection = family_sections(TAV.family)["calibration"]  # with the family's steps and guidance_scale


@pytest.fixture
def temporal_attention(tiny_model):
    return tiny_model.down_blocks[0].attentions[0].transformer_blocks[0].attn_temp


def test_contribution_is_each_heads_own_output_norm_over_the_residual_norm(temporal_attention):
    x = torch.randn(5, 6, temporal_attention.to_q.in_features, generator=torch.Generator().manual_seed(0))
    residual_norm = torch.rand(5, 6) + 0.5
    sums, tokens, _ = DiffusersAttentionHeads(temporal_attention).statistics(x, residual_norm)
    contribution = sums["contribution"]
    bias = temporal_attention.to_out[0].bias
    for head in range(temporal_attention.heads):
        only_this_head = copy.deepcopy(temporal_attention)
        DiffusersAttentionHeads(only_this_head).mask([h for h in range(8) if h != head])
        with torch.no_grad():
            y = only_this_head(x) - bias
        expected = (y.norm(dim=-1) / residual_norm).sum()
        assert contribution[head].item() == pytest.approx(expected.item(), rel=1e-4)
    assert tokens == 30


def test_mixing_of_uniform_attention_is_one_minus_one_over_frames(temporal_attention):
    with torch.no_grad():
        temporal_attention.to_q.weight.zero_()  # equal logits: every frame attends to all F equally
    x = torch.randn(3, 4, temporal_attention.to_q.in_features)
    sums, tokens, _ = DiffusersAttentionHeads(temporal_attention).statistics(x, torch.ones(3, 4))
    assert torch.allclose(sums["mixing"] / tokens, torch.full((8,), 1 - 1 / 4, dtype=torch.float64))


def test_magnitude_is_the_norm_of_each_heads_weights(temporal_attention):
    d = temporal_attention.inner_dim // 8
    head = 3
    rows = slice(head * d, (head + 1) * d)
    expected = sum(p.weight[rows].pow(2).sum() for p in (temporal_attention.to_q, temporal_attention.to_k,
                                                           temporal_attention.to_v))
    expected = (expected + temporal_attention.to_out[0].weight[:, rows].pow(2).sum()).sqrt()
    magnitude = CRITERIA["magnitude"].score(DiffusersAttentionHeads(temporal_attention).projections())
    assert magnitude[head].item() == pytest.approx(expected.item(), rel=1e-6)


def test_calibration_scores_every_head_overall_and_per_step(tiny_bundle):
    section = CalibrationSection(prompts=["a", "b"], seeds=[0], steps=3)
    scores = calibrate(TAV, tiny_bundle, SMALL_SHAPE, section)
    assert len(scores.modules) == 7 and scores.samples == 2 and len(scores.timesteps) == 3
    for module in scores.modules.values():
        assert set(module.scores) == {"contribution", "mixing", "temporal_contribution", "magnitude", "random"}
        assert all(len(v) == 8 for v in module.scores.values())
        assert len(module.per_step["contribution"]) == 3
        per_step_mean = torch.tensor(module.per_step["contribution"]).mean(0)
        assert torch.allclose(per_step_mean, torch.tensor(module.scores["contribution"]), rtol=1e-5)
        assert all(0.0 < m < 1.0 for m in module.scores["mixing"])
        assert all(c > 0.0 for c in module.scores["contribution"])
        # the cross-frame part of what a head writes: every key but the query's own frame
        assert all(0.0 < t < c for t, c in zip(module.scores["temporal_contribution"], module.scores["contribution"]))


def test_a_registered_scorer_is_a_recipe_criterion_and_a_scores_column(monkeypatch, tiny_bundle, write_recipe):
    monkeypatch.setitem(CRITERIA, "contribution_again", TokenScorer(contribution))
    monkeypatch.setitem(CRITERIA, "magnitude_squared", WeightScorer(lambda projections: magnitude(projections) ** 2))
    recipe = load_recipe(write_recipe(FAST_RECIPE.replace("ratio = 0.5", 'ratio = 0.5\ncriterion = "contribution_again"')))
    assert recipe.pruning.criterion == "contribution_again"
    scores = calibrate(TAV, tiny_bundle, SMALL_SHAPE, recipe.calibration)
    assert scores.to_json()["criteria"] == ["contribution", "mixing", "temporal_contribution", "magnitude", "random",
                                            "contribution_again", "magnitude_squared"]
    assert all("sensitivity" not in m.scores for m in scores.modules.values())  # measured only when ranked by
    for module in scores.modules.values():
        assert module.scores["contribution_again"] == module.scores["contribution"]
        assert module.per_step["contribution_again"] == module.per_step["contribution"]
        assert module.scores["magnitude_squared"] == pytest.approx([m * m for m in module.scores["magnitude"]])
        assert "magnitude_squared" not in module.per_step  # data-free: no steps
    assert make_plan(scores, recipe.pruning).removed == make_plan(scores, PruningSection()).removed


def test_the_random_baseline_is_seeded_by_the_module_and_uniform(tiny_model):
    sites = TAV.structure.temporal_sites(tiny_model)
    first, second = (CRITERIA["random"].score(site.heads_of(tiny_model).projections()) for site in sites[:2])
    again = CRITERIA["random"].score(sites[0].heads_of(tiny_model).projections())
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert first.shape == (8,) and 0.0 <= first.min() and first.max() < 1.0

