"""``[pruning] ratio = "auto"``: the build picks the largest prefix of the calibrated ranking whose held-out
fidelity passes every pruning gate, records how, and the engine it builds passes those gates."""

from __future__ import annotations

import json

from conftest import FAST_RECIPE, run

AUTO = FAST_RECIPE.replace("ratio = 0.5", 'ratio = "auto"')


def build_auto(write_recipe, tmp_path, **gates) -> dict:
    recipe = AUTO
    for key, limit in gates.items():
        recipe = recipe.replace(f"{key} = ", f"{key} = {limit}\n# was ")
    result = run("build", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "artifacts" / "fast" / "plan.json").read_text())


def test_auto_chooses_the_largest_passing_prefix_and_the_build_validates_it(write_recipe, tmp_path):
    plan = build_auto(write_recipe, tmp_path, pruning_min_latent_psnr=40.0)
    search, total = plan["search"], plan["summary"]["total_heads"]
    chosen, following = search["chosen"], search["next"]
    assert search["budget"] == {"pruning_min_step_cosine": 0.5, "pruning_min_latent_psnr": 40.0}
    # A binary search over the number of heads removed: it ends on two neighbours, the first passing...
    assert 0 < chosen["removed_heads"] < total and following["removed_heads"] == chosen["removed_heads"] + 1
    assert chosen["passed"] and not following["passed"]
    assert chosen["gates"]["pruning.latent_psnr_min"] >= 40.0 > following["gates"]["pruning.latent_psnr_min"]
    # ... in about log2(N) + 1 candidates, every one on the side of the boundary its verdict says.
    assert len(search["tried"]) <= total.bit_length() + 1
    assert all(t["passed"] == (t["removed_heads"] <= chosen["removed_heads"]) for t in search["tried"])
    # The plan applies the chosen prefix: its ratio, its heads.
    assert plan["ratio"] == chosen["ratio"] == chosen["removed_heads"] / total
    assert plan["summary"]["removed_heads"] == chosen["removed_heads"]
    # Validation samples the same held-out runs from the same noise: it measures what the search measured.
    validation = json.loads((tmp_path / "artifacts" / "fast" / "validation.json").read_text())
    assert validation["passed"]
    measured = {g["metric"]: g["value"] for g in validation["gates"]}
    for metric, value in chosen["gates"].items():
        assert abs(measured[metric] - value) <= 1e-6 * abs(value)
    report = (tmp_path / "artifacts" / "fast" / "report.md").read_text()
    assert "## Ratio chosen for you" in report and f"({chosen['removed_heads']} heads pruned)" in report


def test_a_budget_every_prefix_meets_removes_every_head(write_recipe, tmp_path):
    plan = build_auto(write_recipe, tmp_path, pruning_min_latent_psnr=0.0, pruning_min_step_cosine=-1.0)
    assert plan["ratio"] == 1.0 and plan["summary"]["removed_heads"] == plan["summary"]["total_heads"]
    assert plan["search"]["next"] is None and plan["search"]["chosen"]["passed"]

