"""Trust: a failed build is never served, an artifact folder is untrusted input, every bad input is one line.

The artifact folder is copied between machines and CI jobs, so `check`, `bench`
and the runtime read it as hostile: every path stays inside it, every field is
checked, and anything wrong is one line with exit 1 (a check failed) or 2 (bad
input or environment), never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from f3export.build import lock_file
from f3export.cli import main
from f3export.engines.onnxruntime import OnnxRuntimeBackend
from f3export.errors import CheckError, EngineError
from f3export.recipe import load_recipe
from f3export.runtime import EngineUNet

from conftest import FAST_RECIPE, ORIGINAL_STYLE_CONFIG, run, write_checkpoint


def invoke(*args, env: dict | None = None):
    """The CLI in-process, as a user runs it (exceptions handled by the CLI itself)."""
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def one_line_error(result, code: int, pattern: str) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert pattern in lines[0], lines[0]
    return lines[0]


def f3export(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "f3export", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture
def folder(built, tmp_path) -> Path:
    """A private copy of the shared passing build."""
    _, root, _ = built
    copy = tmp_path / "fast"
    shutil.copytree(root, copy, symlinks=True)
    return copy


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root: Path, doc) -> None:
    (root / "manifest.json").write_text(json.dumps(doc))


def rehash(root: Path) -> None:
    """Re-record every stage file's hash: what a forger who replaces files consistently does."""
    doc = manifest_of(root)
    for record in doc["stages"].values():
        record["files"] = {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in record["files"]}
    write_manifest(root, doc)


# -- 1. failed means failed, everywhere ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed_build(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("failed")
    recipe = folder / "fast.toml"
    recipe.write_text(FAST_RECIPE.replace("{out}", str(folder / "artifacts"))
                      .replace("pruning_min_latent_psnr = 5.0", "pruning_min_latent_psnr = 500.0"))
    assert run("build", recipe).exit_code == 1
    return folder / "artifacts" / "fast"


def test_check_refuses_a_build_that_failed_its_gates(failed_build):
    one_line_error(invoke("check", failed_build), 1, "this build FAILED its validation gates; its engines are not "
                                                     "served")


def test_runtime_and_bench_refuse_a_failed_build(failed_build):
    with pytest.raises(CheckError, match="FAILED its validation gates"):
        EngineUNet(failed_build)
    one_line_error(invoke("bench", failed_build, "--runs", "1"), 1, "FAILED its validation gates")


def test_a_failed_build_relabelled_passed_fails_on_its_recorded_gates(failed_build, tmp_path):
    copy = tmp_path / "forged"
    shutil.copytree(failed_build, copy)
    doc = manifest_of(copy)
    doc["status"] = "passed"
    for entry in doc["engines"].values():
        entry["good"] = True
    write_manifest(copy, doc)
    result = invoke("check", copy)
    line = one_line_error(result, 1, "gates failed")
    assert "recorded.pruning.latent_psnr_min" in line
    assert "FAIL" in result.output


def test_an_unfinished_build_is_refused(folder):
    doc = manifest_of(folder)
    doc["status"] = "building"
    write_manifest(folder, doc)
    one_line_error(invoke("check", folder), 1, "the build did not finish (status 'building')")
    with pytest.raises(CheckError, match="did not finish"):
        EngineUNet(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(engines={}), "engines [] are not the ones the recipe asks for"),
    (lambda d: d.update(stages={}), "stages calibrate, plan, prune, export, engine, validate missing"),
    (lambda d: d["engines"].pop("original.onnxruntime"), "are not the ones the recipe asks for"),
    (lambda d: d["engines"]["pruned.onnxruntime"].update(good=False), "engines.pruned.onnxruntime: not marked good"),
    (lambda d: d["recipe"]["engine"].update(backends=["onnxruntime", "tensorrt"]),
     "are not the ones the recipe asks for"),
])
def test_check_requires_every_stage_and_exactly_the_engines_the_recipe_asks_for(folder, edit, message):
    doc = manifest_of(folder)
    edit(doc)
    write_manifest(folder, doc)
    one_line_error(invoke("check", folder), 1, message)


def test_check_reevaluates_the_export_gates_on_the_goldens_and_the_recorded_gates(folder):
    result = invoke("check", folder)
    assert result.exit_code == 0, result.output
    gates = json.loads((folder / "validation.json").read_text())["gates"]
    # every recorded gate re-evaluated, plus rel_l2, cosine and nonfinite of each of the two engines on goldens
    assert f"{len(gates) + 2 * 3} gates passed" in result.output
    assert "recorded.pruning.step_cosine_min" in result.output and "check.pruned.onnxruntime.rel_l2" in result.output


def test_runtime_refuses_a_tampered_engine(folder):
    engine = folder / "engines" / "pruned.ort-cpu-extended.onnx"
    data = bytearray(engine.read_bytes())
    data[-100] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(CheckError, match=r"pruned\.ort-cpu-extended\.onnx: content changed since the build.*not "
                                         r"served"):
        EngineUNet(folder)
    EngineUNet(folder, variant="original")  # the untouched engine is still served


# -- 2. the artifact folder is untrusted input ---------------------------------------------------------------
@pytest.mark.parametrize("path, message", [
    ("/etc/hostname", "'/etc/hostname' is an absolute path"),
    ("../../outside.onnx", "'../../outside.onnx' leads outside"),
    ("engines/linked.onnx", "'engines/linked.onnx' leads outside"),  # a symlink in the folder pointing out
])
def test_manifest_paths_must_stay_inside_the_folder(folder, tmp_path, path, message):
    secret = tmp_path / "outside.onnx"
    secret.write_bytes(b"not yours")
    (folder / "engines" / "linked.onnx").symlink_to(secret)
    doc = manifest_of(folder)
    doc["engines"]["pruned.onnxruntime"]["path"] = path
    doc["stages"]["engine"]["files"][path] = hashlib.sha256(b"not yours").hexdigest()
    write_manifest(folder, doc)
    one_line_error(invoke("check", folder), 1, message)


def test_a_stage_file_outside_the_folder_is_never_opened(folder, tmp_path):
    doc = manifest_of(folder)
    doc["stages"]["plan"]["files"]["/dev/zero"] = "0" * 64  # hashing it would never finish
    write_manifest(folder, doc)
    one_line_error(invoke("check", folder), 1, "'/dev/zero' is an absolute path")


MALFORMED_MANIFESTS = [
    ("not json", lambda text, doc: "{", "not valid JSON"),
    ("a list", lambda text, doc: "[]", "expected dict, got list"),
    ("no status", lambda text, doc: json.dumps({k: v for k, v in doc.items() if k != "status"}),
     "did not finish (status None)"),
    ("no recipe", lambda text, doc: json.dumps({k: v for k, v in doc.items() if k != "recipe"}), "missing 'recipe'"),
    ("files a list", lambda text, doc: text.replace('"files": {', '"files": [{', 1).replace("}, \"data\"", "}], \"data\"", 1),
     "stages.calibrate.files: expected dict, got list"),
    ("digest not hex", lambda text, doc: json.dumps(_set(doc, ["stages", "plan", "files", "plan.json"], "xyz")),
     "expected a SHA-256 hex digest"),
    ("seconds a string", lambda text, doc: json.dumps(_set(doc, ["stages", "plan", "seconds"], "fast")),
     "stages.plan.seconds: expected int or float"),
    ("good a string", lambda text, doc: json.dumps(_set(doc, ["engines", "pruned.onnxruntime", "good"], "yes")),
     "not marked good"),
    ("ratio a string", lambda text, doc: json.dumps(_set(doc, ["recipe", "pruning", "ratio"], "half")),
     "malformed recipe"),
    ("engine path a number", lambda text, doc: json.dumps(_set(doc, ["engines", "pruned.onnxruntime", "path"], 7)),
     "expected a relative path, got 7"),
]


def _set(doc: dict, keys: list[str], value) -> dict:
    target = doc
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return doc


@pytest.mark.parametrize("name, corrupt, message", MALFORMED_MANIFESTS, ids=[m[0] for m in MALFORMED_MANIFESTS])
def test_a_malformed_manifest_is_one_line_exit_1(folder, name, corrupt, message):
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(corrupt(json.dumps(json.loads(text)), json.loads(text)))
    line = one_line_error(invoke("check", folder), 1, message)
    assert "manifest.json" in line


def test_a_manifest_from_another_version_asks_for_a_rebuild(folder):
    doc = manifest_of(folder)
    doc["versions"]["f3export"] = "0.0.1"
    doc["recipe"]["engine"]["retired_option"] = 1
    write_manifest(folder, doc)
    one_line_error(invoke("check", folder), 2, "built by f3export '0.0.1'")


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


MALFORMED_GOLDENS = [
    ("not a zip", b"PK\x03\x04 broken", "malformed goldens"),
    ("pickled object array", _npz(**{"0/input/sample": np.array([{"a": 1}], dtype=object)}), "malformed goldens"),
    ("key without kind", _npz(**{"0": np.zeros(3, np.float32)}), "malformed goldens"),
    ("no samples", _npz(), "no golden samples"),
    ("no expected output", _npz(**{"0/input/sample": np.zeros(3, np.float32)}), "sample 0 lacks expected outputs"),
    ("empty array", _npz(**{"0/input/sample": np.zeros(0, np.float32),
                            "0/expected/noise_pred": np.zeros(3, np.float32)}), "expected a non-empty numeric array"),
    ("text array", _npz(**{"0/input/sample": np.array(["x"]), "0/expected/noise_pred": np.zeros(3, np.float32)}),
     "expected a non-empty numeric array"),
    ("unknown input", _npz(**{"0/input/bogus": np.zeros(3, np.float32),
                              "0/expected/noise_pred": np.zeros(3, np.float32)}), "the engine refused the golden inputs"),
]


@pytest.mark.parametrize("name, content, message", MALFORMED_GOLDENS, ids=[m[0] for m in MALFORMED_GOLDENS])
def test_malformed_goldens_are_one_line_exit_1_even_when_consistently_rehashed(folder, name, content, message):
    (folder / "goldens" / "pruned.npz").write_bytes(content)
    rehash(folder)
    line = one_line_error(invoke("check", folder), 1, message)
    assert "pruned.npz" in line


def test_expect_sha256_closes_a_consistent_replacement(folder):
    digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert invoke("check", folder, "--expect-sha256", digest).exit_code == 0
    # Replace the goldens by the engine's own outputs on other inputs and re-record every hash: the manifest
    # vouches for itself, so this passes a plain check; only the digest kept outside the folder catches it.
    goldens = dict(np.load(folder / "goldens" / "pruned.npz"))
    goldens["0/input/sample"] = goldens["0/input/sample"] * 0.5
    engine = OnnxRuntimeBackend().load(folder / "engines" / "pruned.ort-cpu-extended.onnx")
    inputs = {k.split("/")[-1]: v for k, v in goldens.items() if "/input/" in k}
    goldens["0/expected/noise_pred"] = engine.run(inputs)["noise_pred"]
    (folder / "goldens" / "pruned.npz").write_bytes(_npz(**goldens))
    rehash(folder)
    assert invoke("check", folder).exit_code == 0
    one_line_error(invoke("check", folder, "--expect-sha256", digest), 1, f"is not the expected {digest}")


def test_an_engine_onnx_runtime_refuses_is_one_line(folder, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    with pytest.raises(EngineError, match=r"garbage\.onnx: ONNX Runtime refused to load the model"):
        OnnxRuntimeBackend().load(garbage)
    shutil.copy(garbage, folder / "engines" / "pruned.ort-cpu-extended.onnx")
    rehash(folder)
    one_line_error(invoke("check", folder), 2, "ONNX Runtime refused to load the model")


# -- 5. every user or environment error is one line and exit 2 ----------------------------------------------
def test_output_folder_under_a_file_is_one_line(write_recipe, tmp_path):
    (tmp_path / "artifacts").write_text("a file, not a folder")
    done = f3export("build", write_recipe())
    assert done.returncode == 2, done.stderr
    root = tmp_path / "artifacts" / "fast"
    assert done.stderr.strip().splitlines() == [
        f"error: {root}: Not a directory (while preparing the artifact folder {root})"]
    assert "Traceback" not in done.stderr


def test_a_lock_that_is_a_symlink_is_refused(write_recipe, tmp_path):
    path = write_recipe()
    root = tmp_path / "artifacts" / "fast"
    root.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock = lock_file(load_recipe(path))
    lock.parent.mkdir(parents=True)
    lock.symlink_to(victim)
    one_line_error(invoke("build", path), 2, ".lock: not a plain file (a symlink or folder); refusing to lock")
    assert victim.read_text() == "keep me"


def test_a_nul_byte_in_a_path_is_one_line(write_recipe):
    path = write_recipe(FAST_RECIPE.replace('preset = "tiny"', 'path = "models/a\\u0000b"'))
    done = f3export("build", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")


def test_an_over_long_path_is_one_line(write_recipe):
    path = write_recipe(FAST_RECIPE.replace('preset = "tiny"', f'path = "{"m" * 300}"'))
    done = f3export("build", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")


def _in_mount_namespace(mount_options: str, target: Path, *args) -> subprocess.CompletedProcess:
    """Run f3export with ``target`` a fresh tmpfs (own mount namespace: nothing leaks to the machine)."""
    script = (f"mount -t tmpfs -o {mount_options} tmpfs {target} && "
              f"exec {sys.executable} -m f3export {' '.join(map(str, args))}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)


@pytest.fixture
def mount_namespaces():
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("unshare cannot create a mount namespace here (needs util-linux and user namespaces)")


@pytest.mark.parametrize("options, reason", [
    ("ro", "Read-only file system"),
    ("size=48k", "No space left on device"),  # full while safetensors writes the pruned weights (stage prune)
    ("size=10m", "No space left on device"),  # full while ONNX writes the graph, which names no file (stage export)
])
def test_read_only_and_full_file_systems_are_one_line(write_recipe, tmp_path, mount_namespaces, options, reason):
    path = write_recipe()
    target = tmp_path / "artifacts"
    target.mkdir()
    done = _in_mount_namespace(options, target, "build", path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and reason in errors[0] and str(target) in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_an_internal_error_is_one_line_exit_3_and_debug_shows_the_traceback(write_recipe, monkeypatch):
    def broken(self):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("f3export.build.Build.run", broken)
    one_line_error(invoke("build", write_recipe()), 3, "internal error: ZeroDivisionError: a bug (rerun with --debug")
    debug = invoke("--debug", "build", write_recipe())
    assert isinstance(debug.exception, ZeroDivisionError)


# -- 6. allowed roots hold ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [("", "empty entry"), (f"/tmp{os.pathsep}", "empty entry"),
                                            ("relative/dir", "'relative/dir' is not an absolute path")])
def test_empty_or_relative_allowed_roots_are_an_error(write_recipe, value, message):
    one_line_error(invoke("build", write_recipe(), env={"F3EXPORT_ALLOWED_ROOTS": value}), 2, message)


def test_a_symlinked_artifact_folder_cannot_leave_the_allowed_roots(write_recipe, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "fast").symlink_to(outside)  # dir is allowed, dir/name is not
    one_line_error(invoke("build", write_recipe(), env={"F3EXPORT_ALLOWED_ROOTS": str(tmp_path)}), 2,
                   f"[output].dir/name: {tmp_path / 'artifacts' / 'fast'} (resolves to {outside}) is outside")
    assert not any(outside.iterdir())


def test_check_bench_and_runtime_stay_inside_the_allowed_roots(folder, tmp_path, monkeypatch):
    env = {"F3EXPORT_ALLOWED_ROOTS": str(tmp_path / "elsewhere")}
    one_line_error(invoke("check", folder, env=env), 2, "artifact folder: ")
    one_line_error(invoke("bench", folder, env=env), 2, "is outside the allowed roots")
    monkeypatch.setenv("F3EXPORT_ALLOWED_ROOTS", str(tmp_path / "elsewhere"))
    with pytest.raises(Exception, match="outside the allowed roots"):
        EngineUNet(folder)


@pytest.mark.parametrize("linked", ["unet", "scheduler"])
def test_a_model_subfolder_symlinked_out_of_the_allowed_roots_is_refused(write_recipe, tmp_path, tiny_model, linked):
    outside = tmp_path.parent / f"{tmp_path.name}-model"
    write_checkpoint(outside, tiny_model, "safetensors", ORIGINAL_STYLE_CONFIG)
    (outside / "scheduler").mkdir()
    (outside / "scheduler" / "scheduler_config.json").write_text('{"beta_schedule": "scaled_linear"}')
    model = tmp_path / "models" / "tav"
    model.mkdir(parents=True)
    for part in ("unet", "scheduler"):
        if part == linked:
            (model / part).symlink_to(outside / part)
        else:
            shutil.copytree(outside / part, model / part)
    path = write_recipe(FAST_RECIPE.replace('preset = "tiny"', f'path = "{model}"'))
    result = invoke("build", path, env={"F3EXPORT_ALLOWED_ROOTS": str(tmp_path)})
    one_line_error(result, 2, f"[model].path's {linked}/")
    assert "is outside the allowed roots" in result.output and not (tmp_path / "artifacts" / "fast").exists()


# Survivors of the mutmut sample (benchmarks/mutation.md): a consistently rehashed validation report whose
# gates cannot be re-evaluated is refused, naming the report and what is wrong with it.
@pytest.mark.parametrize("edit, message", [
    (lambda gates: [], "validation.json: malformed validation report (no gates, or a gate kind not 'max'/'min')"),
    (lambda gates: [{**g, "kind": "at least"} for g in gates], "malformed validation report (no gates, or a gate"),
    (lambda gates: [g for g in gates if not g["metric"].startswith("export.pruned.")],
     "validation.json: no export gate for engine 'pruned.onnxruntime'"),
], ids=["no gates", "unknown kind", "an engine without export gates"])
def test_a_validation_report_check_cannot_reevaluate_is_one_line_exit_1(folder, edit, message):
    report = json.loads((folder / "validation.json").read_text())
    (folder / "validation.json").write_text(json.dumps({**report, "gates": edit(report["gates"])}))
    rehash(folder)
    one_line_error(invoke("check", folder), 1, message)


# -- what a build cannot vouch for, where a person reads it -----------------------------------------------------
RANDOM_AND_STANDIN = ["random weights (never trained)",
                      "stand-in text (seeded random embeddings, not a text encoder's)"]


def test_a_build_on_random_weights_and_stand_in_text_says_so_in_its_verdict_line_and_in_check(built):
    _, root, _ = built
    verdict = (root / "report.md").read_text().splitlines()[2]
    assert verdict.startswith(f"**PASSED** on {' and '.join(RANDOM_AND_STANDIN)}, which it cannot vouch for")
    quiet = run("-q", "check", root)  # -q silences stderr: the words are in the results
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert f"gates passed, on {' and '.join(RANDOM_AND_STANDIN)}" in " ".join(quiet.stdout.split())
    assert json.loads(run("check", root, "--json").stdout)["cannot_vouch_for"] == RANDOM_AND_STANDIN


def test_a_trained_model_read_through_its_text_encoder_has_nothing_to_disclaim():
    from f3export.report import unvouched

    assert unvouched({"random_weights": False, "text": "CLIPTextModel (zoo/tav-shapes/text_encoder), prompts padded "
                                                        "to 8 tokens"}) == []
    assert unvouched({"random_weights": True}) == RANDOM_AND_STANDIN[:1]
