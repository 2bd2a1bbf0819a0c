"""Hostile export-triton: every name it writes comes from an untrusted manifest.

A build folder travels between machines, and its manifest is a JSON file anyone can edit (``open_build`` checks
its structure, stages and hashes, not its ``name`` or its components' names and tensors). So export-triton checks
each model name as a Triton model folder name before any path or config line is made of it (one line naming the
field, exit 2, nothing written anywhere), writes every text into config.pbtxt as an escaped literal (the config
parses with Triton's own ``model_config_pb2`` and holds the exact names), and writes nothing outside the target.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from f3export.cli import main
from f3export.triton import text_literal


def invoke(*args):
    """The CLI in-process, as a user runs it (errors handled by the CLI itself)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code: int, expected: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error: ")] == [f"error: {expected}"]


@pytest.fixture
def folder(built, tmp_path) -> Path:
    """A private copy of the shared passing build, whose manifest the tests edit as a hostile user would."""
    _, root, _ = built
    return Path(shutil.copytree(root, tmp_path / "fast", symlinks=True))


def edit_manifest(root: Path, change) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    change(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


def every_path(top: Path) -> list[Path]:
    return sorted(top.rglob("*"))


def parsed(config: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())


def with_component(name: str, inputs: list[dict], outputs: list[dict]):
    """A manifest edit adding a pipeline component served by an engine file the build recorded (the pruned one):
    what ``open_build`` and ``component_engine`` accept, with names of the editor's choosing."""

    def change(doc: dict) -> None:
        doc["components"] = {name: {"backend": "onnxruntime", "engine": doc["engines"]["pruned.onnxruntime"]["path"],
                                    "inputs": inputs, "outputs": outputs}}

    return change


PLAIN = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 77]}]


@pytest.mark.parametrize("name, problem", [
    ("../escape", "it contains a path separator"),
    ("a/b", "it contains a path separator"),
    ("a\\b", "it contains a path separator"),
    ('x"\ny', "it contains a control character"),
    ("", "empty, '.' or '..'"),
    ("..", "empty, '.' or '..'"),
    ("-rf", "only letters, digits, '_', '.' and '-' are taken, not starting with '.' or '-'"),
    (".hidden", "only letters, digits, '_', '.' and '-' are taken, not starting with '.' or '-'"),
    ("two words", "only letters, digits, '_', '.' and '-' are taken, not starting with '.' or '-'"),
    (7, "not a string but int"),
])
def test_a_build_name_triton_cannot_take_as_a_folder_is_one_line_and_nothing_is_written(folder, tmp_path, name,
                                                                                          problem):
    edit_manifest(folder, lambda doc: doc.update(name=name))
    before = every_path(tmp_path)
    result = invoke("export-triton", folder, tmp_path / "triton")
    one_line_error(result, 2, f"{folder / 'manifest.json'}: name = {name!r} cannot name a Triton model ({problem})")
    assert every_path(tmp_path) == before


def test_a_name_too_long_once_joined_with_its_variant_is_one_line(folder, tmp_path):
    name = "m" * 250  # a folder name of its own, but not as "<name>_original"
    edit_manifest(folder, lambda doc: doc.update(name=name))
    result = invoke("export-triton", folder, tmp_path / "triton")
    shown = "'" + "m" * 79  # the value's repr, cut at 80 characters
    one_line_error(result, 2, f"{folder / 'manifest.json'}: name = {shown} cannot name a Triton model (259 bytes in "
                              "UTF-8, more than 255)")
    assert not (tmp_path / "triton").exists()


@pytest.mark.parametrize("component, problem", [
    ("../../outside", "it contains a path separator"),
    ("x\n}", "it contains a control character"),
])
def test_a_component_name_triton_cannot_take_is_one_line_and_nothing_is_written(folder, tmp_path, component, problem):
    edit_manifest(folder, with_component(component, PLAIN, PLAIN))
    before = every_path(tmp_path)
    result = invoke("export-triton", folder, tmp_path / "triton")
    one_line_error(result, 2, f"{folder / 'manifest.json'}: components key = {component!r} cannot name a Triton "
                              f"model ({problem})")
    assert every_path(tmp_path) == before


def test_a_component_named_as_a_model_variant_is_refused_rather_than_overwriting_it(folder, tmp_path):
    edit_manifest(folder, with_component("pruned", PLAIN, PLAIN))
    result = invoke("export-triton", folder, tmp_path / "triton")
    one_line_error(result, 2, f"{folder / 'manifest.json'}: components: the Triton model name 'fast_pruned' would be "
                              "made twice")
    assert not (tmp_path / "triton").exists()


def test_a_plain_name_of_letters_digits_dots_and_dashes_is_kept_exactly(folder, tmp_path):
    edit_manifest(folder, lambda doc: doc.update(name="tav.v2-b_1"))
    result = invoke("export-triton", folder, tmp_path / "triton")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "triton").iterdir()) == ["tav.v2-b_1_original", "tav.v2-b_1_pruned"]
    assert parsed(tmp_path / "triton" / "tav.v2-b_1_pruned" / "config.pbtxt").name == "tav.v2-b_1_pruned"


INJECTION = 'ids"\nmax_batch_size: 8\ninput { name: "extra'  # closes the literal, sets a field, adds an input


def test_tensor_names_are_written_escaped_and_parse_back_exactly(folder, tmp_path):
    names = [INJECTION, "back\\slash 'quoted'", "tab\tnul\x00 é 🎥"]
    inputs = [{"name": name, "dtype": "int64", "shape": ["batch", 77]} for name in names]
    outputs = [{"name": 'out"put\r\n', "dtype": "float32", "shape": ["batch", 77, 32]}]
    edit_manifest(folder, with_component("text_encoder", inputs, outputs))
    result = invoke("export-triton", folder, tmp_path / "triton")
    assert result.exit_code == 0, result.output
    config = parsed(tmp_path / "triton" / "fast_text_encoder" / "config.pbtxt")
    assert config.name == "fast_text_encoder" and config.max_batch_size == 0
    assert [(t.name, list(t.dims)) for t in config.input] == [(name, [-1, 77]) for name in names]
    assert [(t.name, t.data_type) for t in config.output] == [('out"put\r\n', model_config_pb2.TYPE_FP32)]


def test_a_tensor_name_that_is_not_unicode_text_is_one_line(folder, tmp_path):
    edit_manifest(folder, with_component("text_encoder", [{"name": "\ud800", "dtype": "int64", "shape": [1]}], PLAIN))
    result = invoke("export-triton", folder, tmp_path / "triton")
    one_line_error(result, 2, f"{folder / 'manifest.json'}: components.text_encoder.inputs[0].name = '\\ud800' is not "
                              "Unicode text (a lone surrogate)")
    assert not (tmp_path / "triton").exists()


@pytest.mark.parametrize("text", ['"', "'", "\\", "\n", "\r\t", "\x00", "\x7f", "é", "🎥", "\\012", INJECTION])
def test_a_text_literal_reads_back_as_the_same_text_in_protobufs_own_parser(text):
    assert parsed_literal(text_literal(text, "field")) == text


def parsed_literal(literal: str) -> str:
    return text_format.Parse(f"name: {literal}", model_config_pb2.ModelConfig()).name


def test_a_staging_folder_planted_beside_the_target_is_neither_followed_nor_removed(folder, tmp_path):
    """The repository is assembled beside its target: under a fresh name, so a planted folder or symlink of the
    name a predictable staging folder would have (here the one earlier versions used) takes nothing."""
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / ".triton.tmp-triton").symlink_to(outside)
    result = invoke("export-triton", folder, out / "triton")
    assert result.exit_code == 0, result.output
    assert list(outside.iterdir()) == []
    assert sorted(os.listdir(out)) == [".triton.tmp-triton", "triton"]


def test_a_file_beside_an_engine_that_the_build_did_not_record_is_not_copied(folder, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("not the build's")
    engine = folder / json.loads((folder / "manifest.json").read_text())["engines"]["pruned.onnxruntime"]["path"]
    engine.with_name(engine.name + ".data").symlink_to(secret)
    result = invoke("export-triton", folder, tmp_path / "triton")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "triton" / "fast_pruned" / "1")) == ["model.onnx"]


@pytest.mark.parametrize("batch, max_batch_size", [((1, 4), 4), ((2, 4), 0), ((2, 2), 0)])
def test_triton_batches_only_where_every_batch_from_1_was_validated(batch, max_batch_size):
    """Triton's batcher sends any batch from 1 to max_batch_size: a range validated from 2 keeps the batch a dim."""
    import numpy as np

    from f3export.runtime import TensorSpec
    from f3export.triton import model_config

    sample = TensorSpec("sample", np.dtype("float32"), ("batch", 4, 8))
    text = model_config("m", "onnxruntime", "cpu", [sample], [TensorSpec("out", np.dtype("float32"), ("batch", 4, 8))],
                        {"batch": batch}, "contract")
    assert f"max_batch_size: {max_batch_size}\n" in text
    assert ("dynamic_batching { }" in text) == (max_batch_size > 0)
    assert ("dims: [ 4, 8 ]" in text) == (max_batch_size > 0)
