"""Calibration shared among torchrun's processes, and resumed after a kill: the same scores.json bytes as one
uninterrupted process.

Every process runs with one thread (OMP_NUM_THREADS=1, torchrun's default per process): a float32 kernel's
rounding may depend on how many threads split it, so bytes are compared between processes of equal threads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import COGVIDEO_TOKENS_RECIPE, FAST_RECIPE, run

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
RUNS = 3  # odd: on 2 processes the last round is one run, and rank 1 has none in it


def f3export_command(*args: object, processes: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    return [sys.executable, *launcher, "-m", "f3export", *map(str, args)]


def calibrate(recipe: Path, processes: int = 1) -> subprocess.CompletedProcess:
    done = subprocess.run(f3export_command("build", recipe, "--until", "calibrate", processes=processes),
                          capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def tav_recipe(folder: Path, runs: int = RUNS, steps: int = 3) -> Path:
    """The tiny Tune-A-Video recipe with ``runs`` calibration runs (a prompt each) of ``steps`` steps."""
    prompts = json.dumps([f"a man is skiing, take {i}" for i in range(runs)])
    text = FAST_RECIPE.replace('prompts = ["a man is skiing"]\nseeds = [0]\nsteps = 3',
                               f"prompts = {prompts}\nseeds = [0]\nsteps = {steps}")
    path = folder / "tav.toml"
    path.write_text(text.replace("{out}", str(folder / "artifacts")))
    return path


def cogvideo_recipe(folder: Path, runs: int = RUNS) -> Path:
    """The tiny CogVideo recipe over ``runs`` token sequences (8 text tokens, 5 frames of 64 tokens)."""
    rng = np.random.default_rng(0)
    for name, rows in (("calibration", runs), ("validation", 1)):
        image = rng.integers(0, 256, (rows, 5, 63))
        frames = np.concatenate([np.full((rows, 5, 1), 310), image], axis=2).reshape(rows, 320)
        np.save(folder / f"{name}.npy", np.concatenate([np.full((rows, 8), 300), frames], axis=1))
    path = folder / "cogvideo.toml"
    path.write_text(COGVIDEO_TOKENS_RECIPE.replace("{base}", str(folder)))
    return path


RECIPES = {"tav": tav_recipe, "cogvideo": cogvideo_recipe}


@pytest.mark.parametrize("family", RECIPES)
def test_two_processes_calibrate_the_bytes_one_process_does_whatever_the_last_round_holds(tmp_path, family):
    """3 runs on 2 processes: rounds (0, 1) and (2), rank 1 idle in the last; every run summed once, in order."""
    single, shared = tmp_path / "single", tmp_path / "shared"
    single.mkdir(), shared.mkdir()
    calibrate(RECIPES[family](single))
    done = calibrate(RECIPES[family](shared), processes=2)
    scores = (shared / "artifacts" / family / "scores.json").read_bytes()  # output name: the recipe file's
    assert scores == (single / "artifacts" / family / "scores.json").read_bytes()
    assert json.loads(scores)["samples"] == RUNS
    assert "rank 1 of 2: calibration runs done for rank 0" in done.stderr + done.stdout
    assert f"calibrate (2 processes) 0/{RUNS}" in done.stderr  # rank 0's progress, counting every rank's runs
    assert not (shared / "artifacts" / family / "calibration").exists()  # the runs are in scores.json now
    manifest = json.loads((shared / "artifacts" / family / "manifest.json").read_text())
    assert manifest["status"] == "stopped after calibrate" and list(manifest["stages"]) == ["calibrate"]


def saved_runs(root: Path) -> list[Path]:
    return sorted(root.glob("calibration/*/run-*.safetensors"))


KILLED_RUNS, KILLED_STEPS = 8, 8


@pytest.fixture
def uninterrupted(tmp_path) -> bytes:
    """scores.json of the calibration the next test kills, run by one process without interruption."""
    folder = tmp_path / "uninterrupted"
    folder.mkdir()
    calibrate(tav_recipe(folder, KILLED_RUNS, KILLED_STEPS))
    return (folder / "artifacts" / "tav" / "scores.json").read_bytes()


def test_a_calibration_killed_mid_way_resumes_at_the_next_run_to_the_same_bytes(tmp_path, uninterrupted):
    """Killed as one process, resumed by two: the saved runs are reused whoever resumes (one process resuming
    takes the same path, ``calibrate``'s store, without the team)."""
    runs = KILLED_RUNS
    recipe, root = tav_recipe(tmp_path, runs, KILLED_STEPS), tmp_path / "artifacts" / "tav"
    process = subprocess.Popen(f3export_command("build", recipe, "--until", "calibrate"), env=ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(saved_runs(root)) < 2:  # the event; 6 runs are still to run, so the kill lands before the last
        assert process.poll() is None, "the calibration ended before saving 2 runs"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    kept = len(saved_runs(root))
    assert 2 <= kept < runs, kept
    assert not (root / "scores.json").exists()

    done = calibrate(recipe, processes=2)
    assert f"resuming; {kept} of {runs} runs were saved by an interrupted calibration, {runs - kept} to run" \
        in " ".join((done.stderr + done.stdout).split())
    assert (root / "scores.json").read_bytes() == uninterrupted
    assert saved_runs(root) == []


def test_a_saved_run_that_is_not_what_it_claims_is_run_again(tmp_path):
    """The artifact folder is untrusted: a run file of another run, or damaged, is never summed."""
    from f3export.calibrate import RunStatistics, RunStore

    store = RunStore(tmp_path / "key", "key")
    like = RunStatistics.zeros({"down.attn_temp": (4, 8)}, ["contribution", "mixing"], steps=3, frames=2)
    run = RunStatistics.zeros({"down.attn_temp": (4, 8)}, ["contribution", "mixing"], steps=3, frames=2)
    run.sums["down.attn_temp"]["mixing"] += 0.25
    run.tokens["down.attn_temp"] += 8
    run.timesteps = [900, 500, 100]
    store.save(0, run)
    store.save(1, run)
    store.path(1).rename(store.path(2))  # run 1's statistics under run 2's name
    other = RunStore(tmp_path / "key", "other-key")
    found = store.finished(3, like)
    assert list(found) == [0] and other.finished(3, like) == {}
    assert torch_equal(found[0].sums["down.attn_temp"]["mixing"], run.sums["down.attn_temp"]["mixing"])
    assert found[0].timesteps == [900, 500, 100]
    store.path(0).write_bytes(store.path(0).read_bytes()[:-8])  # truncated
    assert store.finished(3, like) == {}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_calibration_on_cuda_is_refused_where_there_is_none(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run("build", tav_recipe(tmp_path), "--set", "calibration.device=cuda")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: tav.toml: [calibration].device = 'cuda'")


def two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
def test_two_gpu_processes_over_nccl_calibrate_the_bytes_one_gpu_does_and_agree_with_the_cpu(tmp_path):
    folders = {name: tmp_path / name for name in ("cpu", "gpu", "gpus")}
    for folder in folders.values():
        folder.mkdir()
    for name, processes in (("cpu", 1), ("gpu", 1), ("gpus", 2)):
        recipe = tav_recipe(folders[name])
        if name != "cpu":
            recipe.write_text(recipe.read_text().replace("[pruning]", 'device = "cuda"\n\n[pruning]'))
        calibrate(recipe, processes)
    scores = {name: (folder / "artifacts" / "tav" / "scores.json").read_bytes() for name, folder in folders.items()}
    assert scores["gpus"] == scores["gpu"]
    cpu, gpu = (json.loads(scores[name])["modules"] for name in ("cpu", "gpu"))
    for module in cpu:
        expected = np.array(cpu[module]["scores"]["contribution"])
        assert np.allclose(gpu[module]["scores"]["contribution"], expected, rtol=1e-3), module
