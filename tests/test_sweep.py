"""`f3export sweep`: every criterion at every ratio from one calibration, fidelity and speed side by side."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from f3export.cli import main


def test_a_sweep_compares_criteria_at_each_ratio_from_one_calibration(rebuildable):
    _, root = rebuildable
    scores_before = (root / "scores.json").read_bytes()
    result = CliRunner().invoke(main, ["sweep", str(root), "--ratios", "0,1", "--criteria", "contribution,random",
                                       "--runs", "2", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((root / "sweep.json").read_text())
    assert [(r["criterion"], r["ratio"]) for r in sweep["rows"]] == [
        ("contribution", 0.0), ("contribution", 1.0), ("random", 0.0), ("random", 1.0)]
    unpruned, all_gone = sweep["rows"][0], sweep["rows"][1]
    assert unpruned["removed_heads"] == 0 and unpruned["ideal_speedup"] == 1.0
    assert unpruned["fidelity"]["latent_psnr_min"] == math.inf
    assert unpruned["fidelity"]["step_cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert all_gone["removed_heads"] == 56 and all_gone["ideal_speedup"] > 1.0
    assert all_gone["fidelity"]["latent_psnr_min"] < math.inf
    # At ratio 1 every head goes whatever the ranking: the criteria give the same model.
    assert sweep["rows"][3]["fidelity"]["latent_psnr_min"] == all_gone["fidelity"]["latent_psnr_min"]
    assert all(r["measured_speedup"] > 0 for r in sweep["rows"])
    assert (root / "sweep.png").stat().st_size > 0
    assert (root / "scores.json").read_bytes() == scores_before  # one calibration, not redone


def test_a_sweep_refuses_an_unknown_criterion(built):
    _, root, _ = built
    result = CliRunner().invoke(main, ["sweep", str(root), "--criteria", "contribution,loudest"])
    assert result.exit_code == 2 and "criteria are contribution, mixing, temporal_contribution, magnitude, random" in result.output


def test_a_sweep_refuses_an_action_the_family_cannot_do(built):
    _, root, _ = built
    result = CliRunner().invoke(main, ["sweep", str(root), "--actions", "remove,frame-local"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --actions remove,frame-local: the heads of a tune-a-video model can "
                                     "only be 'remove'")


def test_a_sweep_by_sensitivity_needs_a_build_that_measured_it(built):
    """Sensitivity costs extra passes, so calibration measures it only when the recipe ranks by it."""
    _, root, _ = built
    result = CliRunner().invoke(main, ["sweep", str(root), "--criteria", "contribution,sensitivity"])
    assert result.exit_code == 1, result.output
    assert "no 'sensitivity' scores: calibration measures them only when the recipe ranks by them; rebuild with " \
           "--set pruning.criterion='sensitivity'" in result.output
