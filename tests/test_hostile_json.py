"""``--json`` means one JSON document on stdout, always: for a failed build, a malformed or missing folder, a
command line click refuses and every other error, with the exit code the command would give without it."""

from __future__ import annotations

import json

import pytest

from conftest import run


def one_document(result) -> dict:
    """The whole of stdout as one JSON document (json.loads refuses anything before or after it)."""
    return json.loads(result.stdout)


def assert_error_document(result, code: int, *words: str) -> dict:
    assert result.exit_code == code, result.output
    document = one_document(result)
    assert document["passed"] is False and document["exit_code"] == code
    assert "\n" not in document["error"] and all(word in document["error"] for word in words), document
    return document


@pytest.mark.parametrize("command, code, words", [
    ("check", 1, "no manifest.json"), ("bench", 1, "no manifest.json"),
    ("inspect", 2, "recipe file not found"),  # inspect reads a folder or a recipe: a missing path is neither
])
def test_a_missing_folder_is_one_document(command, code, words, tmp_path):
    result = run(command, tmp_path / "nowhere", "--json")
    assert_error_document(result, code, str(tmp_path / "nowhere"), words)


@pytest.mark.parametrize("command", ["check", "bench"])
def test_a_malformed_manifest_is_one_document(command, rebuildable):
    _, root = rebuildable
    (root / "manifest.json").write_text("{not json")
    assert_error_document(run(command, root, "--json"), 1, "manifest.json", "not valid JSON")


def test_a_malformed_recipe_is_one_document_with_exit_2(write_recipe):
    result = run("build", write_recipe(), "--set", "pruning.ratio=2", "--json")
    assert_error_document(result, 2, "[pruning].ratio = 2.0 is out of range")


def test_a_command_line_click_refuses_is_one_document_with_exit_2(tmp_path):
    assert_error_document(run("check", tmp_path, "--json", "--no-such-option"), 2, "--no-such-option")
    assert_error_document(run("bench", tmp_path, "--runs", "many", "--json"), 2, "--runs")


def test_a_build_that_fails_its_gates_is_one_document_with_exit_1(rebuildable):
    path, root = rebuildable
    result = run("build", path, "--set", "validation.pruning_min_latent_psnr=200", "--json")
    document = assert_error_document(result, 1, "pruning.latent_psnr_min", "failed")
    assert document["status"] == "failed" and document["gates"]  # the whole summary, as for a build that passed


def test_a_folder_whose_files_changed_is_one_document_from_check_and_bench(rebuildable):
    _, root = rebuildable
    (root / "goldens" / "pruned.npz").write_bytes(b"changed")
    for command in ("check", "bench"):
        assert_error_document(run(command, root, "--json"), 1, "pruned.npz", "sha256 mismatch")


def test_a_failed_build_folder_is_one_document_from_every_reader(rebuildable):
    path, root = rebuildable
    assert run("build", path, "--set", "validation.pruning_min_latent_psnr=200").exit_code == 1
    for command in ("check", "bench"):
        assert_error_document(run(command, root, "--json"), 1, "FAILED its validation gates")


def test_inspect_of_a_folder_whose_plan_is_missing_is_one_document(rebuildable):
    _, root = rebuildable
    (root / "plan.json").unlink()
    assert_error_document(run("inspect", root, "--json"), 1, "plan.json", "missing")
