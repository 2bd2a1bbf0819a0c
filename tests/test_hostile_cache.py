"""Attacks on the shared stage cache (``<output dir>/.cache``), each kept with the outcome the cache promises:
it holds outputs, never verdicts; every byte a reused entry gives a build is covered by a hash the reuse checks;
builds never alias each other; the cache lies inside the trust boundary it claims."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import FAST_RECIPE, run
from f3export.artifacts import sha256_file
from f3export.cache import ENTRY, record_digest
from f3export.errors import CheckError
from f3export.runtime import EngineRunner

FAILING = ("--set", "validation.pruning_min_latent_psnr=200")  # no pruned model reaches 200 dB


@pytest.fixture
def output(built, tmp_path):
    """A private copy of the shared build's output folder (the build "fast" and the shared cache it filled) and a
    recipe writing there: (recipe, output dir)."""
    shutil.copytree(built[1].parent, tmp_path / "artifacts")
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE.replace("{out}", str(tmp_path / "artifacts")))
    return recipe, tmp_path / "artifacts"


def statuses(result) -> dict[str, bool]:
    return {s["name"]: s["cached"] for s in json.loads(result.stdout)["stages"]}


def entries(out, stage: str) -> list:
    return sorted(p for p in (out / ".cache" / stage).iterdir() if not p.name.startswith("."))


def plant(out, stage: str, key: str, files: dict[str, bytes], data: dict) -> None:
    """An entry as a consistent attacker writes it: files, their hashes and a name that matches its record."""
    tmp = out / ".cache" / stage / "planted"
    tmp.mkdir(parents=True)
    for rel, blob in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(blob)
    record = {"files": {rel: sha256_file(tmp / rel) for rel in files}, "data": data}
    (tmp / ENTRY).write_text(json.dumps(record))
    tmp.rename(tmp.with_name(f"{key}.{record_digest(record)}"))


def edit_scheduler(data: dict) -> dict:
    edited = json.loads(json.dumps(data))
    edited["contract"]["conventions"]["scheduler"]["config"]["beta_end"] = 0.5
    return edited


# -- verdicts -------------------------------------------------------------------------------------------------
def test_a_poisoned_validation_entry_cannot_make_a_failing_recipe_pass(output):
    recipe, out = output
    failing = run("build", recipe, *FAILING, "--set", "output.name=failing", "--json")
    assert failing.exit_code == 1, failing.output
    assert not (out / ".cache" / "validate").exists()  # a verdict is never offered to other builds
    manifest = json.loads((out / "failing" / "manifest.json").read_text())
    report = json.loads((out / "failing" / "validation.json").read_text())
    passing = {**report, "gates": [{**g, "value": g["limit"], "passed": True} for g in report["gates"]],
               "passed": True}
    plant(out, "validate", manifest["stages"]["validate"]["key"],
          {"validation.json": json.dumps(passing).encode()}, passing)

    poisoned = run("build", recipe, *FAILING, "--set", "output.name=poisoned", "--json")
    assert poisoned.exit_code == 1, poisoned.output
    assert statuses(poisoned)["validate"] is False  # validated by this build
    document = json.loads(poisoned.stdout)
    assert document["passed"] is False and document["status"] == "failed"
    assert "pruning.latent_psnr_min" in document["error"]
    assert run("check", out / "poisoned").exit_code == 1


# -- every byte under a hash ------------------------------------------------------------------------------------
def test_a_cache_entry_whose_data_was_edited_without_its_hash_is_a_miss(output):
    recipe, out = output
    (entry,) = entries(out, "export")
    record = json.loads((entry / ENTRY).read_text())
    (entry / ENTRY).write_text(json.dumps({**record, "data": edit_scheduler(record["data"])}))

    other = run("build", recipe, "--set", "output.name=other", "--json")
    assert other.exit_code == 0, other.output
    assert statuses(other)["export"] is False  # exported again, not taken from the edited entry
    contract = json.loads((out / "other" / "manifest.json").read_text())["contract"]
    assert contract["conventions"]["scheduler"]["config"]["beta_end"] == 0.012  # Tune-A-Video's DDIM


def test_an_entry_rewritten_consistently_is_refused_by_the_contract_its_files_carry(output):
    """The attacker renames the entry after its new record: the hashes agree, the ONNX files' own contract does
    not, so the build exports again and says why."""
    recipe, out = output
    (entry,) = entries(out, "export")
    record = json.loads((entry / ENTRY).read_text())
    record["data"] = edit_scheduler(record["data"])
    (entry / ENTRY).write_text(json.dumps(record))
    entry.rename(entry.with_name(f"{entry.name.split('.')[0]}.{record_digest(record)}"))

    other = run("build", recipe, "--set", "output.name=other", "--json")
    assert other.exit_code == 0, other.output
    assert statuses(other)["export"] is False
    assert "export: the shared cache's entry" in other.stderr
    assert "contract.conventions.scheduler.config.beta_end differs from the contract embedded in" in \
        " ".join(other.stderr.split())
    assert run("check", out / "other").exit_code == 0


def test_check_and_the_runtime_refuse_a_manifest_whose_contract_differs_from_its_engines(rebuildable):
    _, root = rebuildable
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["contract"]["conventions"]["scheduler"]["config"]["beta_end"] = 0.5
    (root / "manifest.json").write_text(json.dumps(manifest))

    checked = run("check", root)
    assert checked.exit_code == 1
    assert checked.stderr.count("\n") == 1 and "Traceback" not in checked.output
    assert "contract.conventions.scheduler.config.beta_end differs from the contract embedded in" in checked.stderr
    with pytest.raises(CheckError, match=r"beta_end differs .* not served"):
        EngineRunner(root)


def test_a_cache_entry_naming_a_path_outside_the_build_folder_is_a_miss(output):
    recipe, out = output
    key = json.loads((out / "fast" / "manifest.json").read_text())["stages"]["calibrate"]["key"]
    scores = (out / "fast" / "scores.json").read_bytes()
    shutil.rmtree(out / ".cache" / "calibrate")
    plant(out, "calibrate", key, {"scores.json": scores}, {})
    (planted,) = entries(out, "calibrate")
    record = json.loads((planted / ENTRY).read_text())
    record["files"] = {"../escaped.json": record["files"]["scores.json"]}  # a path out of the build folder
    (planted / ENTRY).write_text(json.dumps(record))
    planted.rename(planted.with_name(f"{key}.{record_digest(record)}"))

    other = run("build", recipe, "--set", "output.name=other", "--until", "calibrate", "--json")
    assert other.exit_code == 0, other.output
    assert statuses(other) == {"calibrate": False}  # calibrated again
    assert not (out / "escaped.json").exists()


def test_a_half_written_or_unlisted_entry_is_a_miss(output):
    recipe, out = output
    (entry,) = entries(out, "calibrate")
    (entry / ENTRY).unlink()  # killed before its record was written (or it was deleted)
    stray = out / ".cache" / "calibrate" / f".{entry.name.split('.')[0]}.tmp-99999"  # a killed store's temp folder
    shutil.copytree(entry, stray)
    other = run("build", recipe, "--set", "output.name=other", "--until", "calibrate", "--json")
    assert other.exit_code == 0, other.output
    assert statuses(other) == {"calibrate": False}


# -- no aliasing ------------------------------------------------------------------------------------------------
def test_an_edit_in_place_of_one_builds_file_changes_no_other_build_nor_the_cache(output):
    recipe, out = output
    other = run("build", recipe, "--set", "output.name=other", "--json")
    assert other.exit_code == 0, other.output
    assert statuses(other)["engine"] is True  # its engines came from the cache
    engine = next((out / "other" / "engines").glob("pruned.*.onnx"))
    cached = {p: sha256_file(p) for p in (out / ".cache").rglob("*") if p.is_file()}
    with open(engine, "r+b") as handle:  # in place: the same inode, as an editor or a careless script writes
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\xff" * 8)

    assert {p: sha256_file(p) for p in cached} == cached
    assert run("check", out / "fast").exit_code == 0
    assert run("check", out / "other").exit_code == 1


# -- the trust boundary ----------------------------------------------------------------------------------------
def test_a_cache_folder_that_is_a_symlink_out_of_the_allowed_roots_is_refused_in_one_line(output, tmp_path_factory,
                                                                                            monkeypatch):
    recipe, out = output
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.rmtree(out / ".cache")
    (out / ".cache").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.setenv("F3EXPORT_ALLOWED_ROOTS", str(out.parent))

    refused = run("build", recipe, "--set", "output.name=other")
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.output
    assert f"{out / '.cache'}: the shared stage cache is not a plain folder (a symlink" in refused.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_cache_outside_the_allowed_roots_is_refused_before_anything_is_written(output, monkeypatch):
    """The roots hold the build folder, not the folder beside it where the cache lives."""
    recipe, out = output
    monkeypatch.setenv("F3EXPORT_ALLOWED_ROOTS", str(out / "other"))
    (out / "other").mkdir()
    refused = run("build", recipe, "--set", "output.name=other")
    assert refused.exit_code == 2
    assert f"shared stage cache: {out / '.cache'} is outside the allowed roots (F3EXPORT_ALLOWED_ROOTS)" in \
        refused.stderr
    assert list((out / "other").iterdir()) == []


@pytest.mark.parametrize("folder", ["locks", "text-embeddings"])
def test_a_lock_or_embedding_folder_that_is_a_symlink_is_refused_in_one_line(output, tmp_path_factory, folder):
    recipe, out = output
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.rmtree(out / ".cache" / folder, ignore_errors=True)
    (out / ".cache" / folder).symlink_to(elsewhere, target_is_directory=True)
    refused = run("build", recipe, "--set", "output.name=other")
    assert refused.exit_code == 2, refused.output
    assert f"{out / '.cache' / folder}: the " in refused.stderr and "is not a plain folder" in refused.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_cache_that_cannot_be_written_is_a_note_and_the_build_goes_on(output):
    """A stage folder the cache cannot write into (here a file in its place; read-only or full alike)."""
    recipe, out = output
    shutil.rmtree(out / ".cache" / "calibrate")
    (out / ".cache" / "calibrate").write_text("not a folder")
    other = run("build", recipe, "--set", "output.name=other", "--until", "calibrate", "--json")
    assert other.exit_code == 0, other.output
    assert statuses(other) == {"calibrate": False}
    assert "note: the shared stage cache" in other.stderr and "this build goes on without it" in other.stderr
    assert (out / ".cache" / "calibrate").read_text() == "not a folder"


def test_an_engine_reused_with_another_contract_fails_the_build_instead_of_passing(output):
    """A consistent attacker rewrites the original's cached engine with another scheduler in its contract (and
    its hash, and the entry's name): the build that reuses it fails, so it is never served."""
    import onnx

    from f3export.contract import read_contract, write_contract

    recipe, out = output
    (entry,) = entries(out, "engine-original")
    record = json.loads((entry / ENTRY).read_text())
    (rel,) = record["files"]
    model = onnx.load(str(entry / rel))
    contract = read_contract(entry / rel)
    contract["conventions"]["scheduler"]["config"]["beta_end"] = 0.5
    write_contract(model, contract)
    onnx.save(model, str(entry / rel))
    record["files"][rel] = sha256_file(entry / rel)
    (entry / ENTRY).write_text(json.dumps(record))
    entry.rename(entry.with_name(f"{entry.name.split('.')[0]}.{record_digest(record)}"))

    pruning = run("build", recipe, "--set", "pruning.ratio=0.25")
    assert pruning.exit_code == 1, pruning.output
    assert "engine original.onnxruntime: contract.conventions.scheduler.config.beta_end differs from the contract " \
           "embedded in" in " ".join(pruning.stderr.split())
    assert json.loads((out / "fast" / "manifest.json").read_text())["status"] == "building"
    assert run("check", out / "fast").exit_code == 1


def test_an_export_rewritten_in_its_files_and_record_alike_fails_the_build_instead_of_passing(output):
    """The deepest consistent edit: the cached export's ONNX files carry another scheduler, and so do its data,
    hashes and name; the engines built from them agree with it. The build still computes the contract's terms
    from its own model and recipe, and fails."""
    import onnx

    from f3export.contract import read_contract, write_contract

    recipe, out = output
    (entry,) = entries(out, "export")
    record = json.loads((entry / ENTRY).read_text())
    record["data"] = edit_scheduler(record["data"])
    for rel in [rel for rel in record["files"] if rel.endswith(".onnx") and read_contract(entry / rel)]:
        model = onnx.load(str(entry / rel))
        write_contract(model, record["data"]["contract"])
        onnx.save(model, str(entry / rel))
        record["files"][rel] = sha256_file(entry / rel)
    (entry / ENTRY).write_text(json.dumps(record))
    entry.rename(entry.with_name(f"{entry.name.split('.')[0]}.{record_digest(record)}"))

    other = run("build", recipe, "--set", "output.name=other", "--json")
    assert other.exit_code == 1, other.output
    assert "contract.conventions.scheduler.config.beta_end is not what this model and recipe give" in \
        json.loads(other.stdout)["error"]
    assert json.loads((out / "other" / "manifest.json").read_text())["status"] == "building"
