"""A scriptable command line: results on stdout (one JSON document with --json), progress and notes on stderr,
progress as plain lines where stderr is not a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from f3export import __version__, report

from conftest import run

REPO = Path(__file__).resolve().parents[1]


def test_check_json_is_one_document_on_stdout(built):
    _, root, _ = built
    result = run("check", root, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["passed"] is True and document["files_verified"] >= 10
    assert {g["metric"] for g in document["gates"]} >= {"recorded.export.pruned.onnxruntime.rel_l2",
                                                        "recorded.pruning.step_cosine_min"}
    assert all(g["passed"] for g in document["gates"])


def test_a_cached_build_json_names_every_stage_and_the_files_to_deploy(built):
    recipe, root, _ = built
    result = run("build", recipe, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [s["name"] for s in document["stages"]] == ["calibrate", "plan", "prune", "export", "engine", "validate"]
    assert all(s["cached"] for s in document["stages"]) and document["passed"] is True
    assert document["deploy"] == ["manifest.json", "engines/original.ort-cpu-extended.onnx",
                                  "engines/pruned.ort-cpu-extended.onnx"]
    assert document["parameters"]["onnx_removed_equals_torch_removed"] is True
    files = [f for f in root.rglob("*") if f.is_file()]
    assert not (root / ".lock").exists()  # the lock lies beside the folder: nothing of the build's own in it
    assert {f.stat().st_mode & 0o777 for f in files} == {files[0].stat().st_mode & 0o777}  # one mode for all


def test_inspect_redirected_writes_the_table_into_the_file_and_nothing_else(tmp_path):
    out = tmp_path / "modules.txt"
    with open(out, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "f3export", "inspect", "recipes/tav.toml"], stdout=handle,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp" in text and "7 modules, 56 heads" in text
    assert "attn_temp" not in done.stderr


def test_inspect_of_a_build_folder_gives_the_heads_each_module_kept(built):
    _, root, _ = built
    result = run("inspect", root, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    plan = json.loads((root / "plan.json").read_text())
    assert document["heads"] == plan["summary"]["total_heads"] == 56
    assert document["kept"] == 56 - plan["summary"]["removed_heads"]
    assert {m["name"]: m["heads"] - m["kept"] for m in document["modules"]} == \
        {name: len(removed) for name, removed in plan["removed"].items()}


def test_a_build_over_another_recipes_folder_says_so(rebuildable):
    path, _ = rebuildable
    result = run("build", path, "--set", "pruning.ratio=0.25")
    assert result.exit_code == 0, result.output
    assert "held a build of another recipe (pruning.ratio changed); it is replaced in place" in result.stderr


def test_progress_in_a_log_is_plain_lines_with_counts_and_time(capsys):
    with report.LineProgress() as bar:
        task = bar.add_task("validate", total=3)
        for _ in range(3):
            bar.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].split() == ["validate", "1/3", "0:00:00"]  # the first at once, then one every 10 s
    assert lines[-1].split() == ["validate", "3/3", "0:00:00"]  # and the end


def test_quiet_leaves_stderr_empty_and_version_is_printed(built):
    recipe, _, _ = built
    quiet = run("-q", "build", recipe)
    assert quiet.exit_code == 0 and quiet.stderr == "" and "build passed" in quiet.stdout
    version = run("--version")
    assert version.exit_code == 0 and __version__ in version.output
