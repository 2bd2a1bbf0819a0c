"""Builds of one output folder share what did not change: another [pruning] reuses the original model's export
and engine; another output name reuses every stage but validation (a verdict: every build computes its own);
a damaged shared entry is never used."""

from __future__ import annotations

import json

from conftest import run


def stage_statuses(result) -> dict[str, bool]:
    return {s["name"]: s["cached"] for s in json.loads(result.stdout)["stages"]}


def test_builds_share_the_original_models_work_and_every_unchanged_stage(write_recipe, tmp_path):
    recipe = write_recipe()
    first = run("build", recipe, "--json")
    assert first.exit_code == 0, first.output
    out = tmp_path / "artifacts"

    pruning = run("-v", "build", recipe, "--set", "pruning.ratio=0.25", "--json")
    assert pruning.exit_code == 0, pruning.output
    assert stage_statuses(pruning) == {"calibrate": True, "plan": False, "prune": False, "export": False,
                                       "engine": False, "validate": False}
    for stage in ("export", "engine"):  # only the pruned model's part ran
        assert f"{stage}: the original model's part reused from {out / '.cache'}" in pruning.stderr
    assert "validate: the original model's part reused" not in pruning.stderr
    forced = run("-v", "build", recipe, "--set", "pruning.ratio=0.25", "--force", "--until", "engine", "--json")
    assert forced.exit_code == 0, forced.output
    assert not any(stage_statuses(forced).values()) and "reused" not in forced.stderr  # --force ignores the cache
    assert json.loads(pruning.stdout)["passed"] is True

    renamed = run("build", recipe, "--set", "output.name=other", "--json")
    assert renamed.exit_code == 0, renamed.output
    # nothing recalibrated or exported again; validated again
    assert stage_statuses(renamed) == {"calibrate": True, "plan": True, "prune": True, "export": True,
                                       "engine": True, "validate": False}
    assert (out / "other" / "scores.json").read_bytes() == (out / "fast" / "scores.json").read_bytes()
    check = run("check", out / "other")
    assert check.exit_code == 0, check.output


def test_a_shared_entry_whose_file_changed_is_not_used(write_recipe, tmp_path):
    recipe = write_recipe()
    assert run("build", recipe, "--until", "calibrate").exit_code == 0
    out = tmp_path / "artifacts"
    (entry,) = (out / ".cache" / "calibrate").iterdir()
    cached = entry / "scores.json"
    text = cached.read_text()
    cached.write_text(text.replace("0.", "9.", 1))
    again = run("build", recipe, "--until", "calibrate", "--set", "output.name=other", "--json")
    assert again.exit_code == 0, again.output
    assert stage_statuses(again) == {"calibrate": False}
    assert (out / "other" / "scores.json").read_text() == text
