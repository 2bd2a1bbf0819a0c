"""torchrun launches gone wrong, as a hostile or unlucky user makes them: processes given different recipes or
model files, a process killed mid-round, more processes than runs, a process that cannot reach rank 0. Each
fails on every rank with one line and records nothing (or, with idle processes, simply works), and the next
run resumes from the runs already saved.

The groups are real: torchrun's, or processes started as torchrun starts them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) where each rank needs its own command, folder or output.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST_RECIPE, ORIGINAL_STYLE_CONFIG, TAV, run, write_checkpoint
from test_distributed import ONE_THREAD, calibrate, f3export_command, saved_runs, tav_recipe

CALIBRATE = ("build", "tav.toml", "--until", "calibrate")


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def group(folders: list[Path], *args: str, **env: str) -> list[tuple[int, str]]:
    """``f3export *args`` as ranks 0, 1, .. of one group on this machine, each in its own folder (its own
    machine, as it were): each rank's exit code and output."""
    shared = {"WORLD_SIZE": str(len(folders)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(unused_port()), **env}
    processes = []
    for rank, folder in enumerate(folders):
        with open(folder / "output.txt", "w") as output:
            processes.append(subprocess.Popen(
                f3export_command(*args), cwd=folder, stdout=output, stderr=subprocess.STDOUT,
                env={**ONE_THREAD, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    codes = [process.wait(timeout=600) for process in processes]  # (a hang's bound, not a wait for an outcome)
    return [(code, (folder / "output.txt").read_text()) for code, folder in zip(codes, folders)]


def errors(output: str, rank: int | None = None) -> list[str]:
    """The error lines in ``output`` (of ``rank`` only, given one)."""
    prefix = "error: " if rank is None else f"error: rank {rank}: "
    return [line for line in output.splitlines() if line.startswith(prefix)]


def nothing_recorded(root: Path) -> bool:
    manifest = root / "manifest.json"
    return not (root / "scores.json").exists() and (
        not manifest.exists() or "calibrate" not in json.loads(manifest.read_text())["stages"])


def machine(folder: Path, weights_seed: int = 0, prompt: str = "a man is skiing") -> Path:
    """A folder holding a Tune-A-Video model folder (the tiny preset's layout, weights of ``weights_seed``) and a
    recipe naming it by relative paths (model/, artifacts/), as each machine of a cluster has its own copy."""
    folder.mkdir()
    write_checkpoint(folder / "model", TAV.checkpoint.load_preset("tiny", seed=weights_seed).model, "safetensors",
                     ORIGINAL_STYLE_CONFIG)
    (folder / "tav.toml").write_text(FAST_RECIPE.replace('preset = "tiny"', 'path = "model"')
                                     .replace('"a man is skiing"', json.dumps(prompt)).replace("{out}", "artifacts"))
    return folder


@pytest.mark.parametrize("rank_1_differs", [{"prompt": "a man is surfing"}, {"weights_seed": 1}],
                         ids=["recipe", "model files"])
def test_ranks_given_a_different_recipe_or_model_files_each_fail_in_one_line_and_record_nothing(tmp_path,
                                                                                              rank_1_differs):
    """The recipe files are the same text (paths relative to each rank's folder); only the named input differs.
    Rank 0 fails too, at once, rather than waiting for runs that never come."""
    folders = [machine(tmp_path / "rank0"), machine(tmp_path / "rank1", **rank_1_differs)]
    (leader_code, leader), (follower_code, follower) = group(folders, *CALIBRATE)
    assert (leader_code, follower_code) == (2, 2), leader + follower
    assert errors(leader) == ["error: rank 0: the recipe, model files or libraries of rank 1 differ from rank 0's; "
                              "give every process the same"], leader
    [line] = errors(follower)
    assert line.startswith("error: rank 1: the recipe, model files or libraries of rank 1 differ from rank 0's "
                           "(calibration key ") and line.endswith("; give every process the same")
    assert "Traceback" not in leader + follower
    assert nothing_recorded(folders[0] / "artifacts" / "tav")


@pytest.mark.parametrize("processes, runs", [(3, 2)])
def test_more_processes_than_runs_calibrate_the_bytes_one_process_does(tmp_path, processes, runs):
    """The processes without a run lend nothing and wait for the others; nothing is summed twice or left out.
    (3 on 2: rank 2 never runs one, the case of 2 processes on 1 run as well, at one launch's cost.)"""
    single, shared = tmp_path / "single", tmp_path / "shared"
    single.mkdir(), shared.mkdir()
    calibrate(tav_recipe(single, runs))
    calibrate(tav_recipe(shared, runs), processes=processes)
    scores = (shared / "artifacts" / "tav" / "scores.json").read_bytes()
    assert scores == (single / "artifacts" / "tav" / "scores.json").read_bytes()
    assert json.loads(scores)["samples"] == runs


def ranks_of(launcher: subprocess.Popen, processes: int) -> dict[int, int]:
    """rank -> process id of the processes torchrun (``launcher``) started, once all have started."""
    found: dict[int, int] = {}
    while len(found) < processes:
        assert launcher.poll() is None, "torchrun ended before starting its processes"
        children = [pid for task in Path(f"/proc/{launcher.pid}/task").glob("*/children")
                    for pid in task.read_text().split()]  # (whichever of torchrun's threads started them)
        for child in children:
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:  # (a helper process that has ended)
                continue
            rank = [item[len(b"RANK="):] for item in environ if item.startswith(b"RANK=")]
            if rank:  # (once it has exec'd the build: before, its environment is torchrun's own)
                found[int(rank[0])] = int(child)
        time.sleep(0.01)
    return found


KILL_RUNS, KILL_STEPS, KILL_PROCESSES = 12, 10, 3  # 4 rounds of 3 runs


def test_a_rank_killed_mid_round_fails_every_other_rank_in_one_line_and_a_rerun_resumes(tmp_path):
    """Rank 1 is killed once a round has been saved, while the next is running: ranks 0 and 2 each say so in one
    line and exit nonzero, nothing is recorded, the finished rounds' runs stay, and the same command resumes."""
    recipe, root = tav_recipe(tmp_path, KILL_RUNS, KILL_STEPS), tmp_path / "artifacts" / "tav"
    with open(tmp_path / "output.txt", "w") as output:
        launcher = subprocess.Popen(f3export_command("build", recipe, "--until", "calibrate",
                                                     processes=KILL_PROCESSES),
                                    env=ONE_THREAD, stdout=output, stderr=subprocess.STDOUT)
    ranks = ranks_of(launcher, KILL_PROCESSES)
    while len(saved_runs(root)) < KILL_PROCESSES:  # the event: the first round, saved by rank 0
        assert launcher.poll() is None, "the calibration ended before saving its first round"
        time.sleep(0.01)
    os.kill(ranks[1], signal.SIGKILL)  # (3 rounds are still to run: it lands before the last)
    assert launcher.wait(timeout=600) != 0
    output = (tmp_path / "output.txt").read_text()
    assert len(errors(output, 0)) == len(errors(output, 2)) == 1 and len(errors(output)) == 2, output
    assert nothing_recorded(root)
    kept = len(saved_runs(root))
    assert KILL_PROCESSES <= kept < KILL_RUNS, kept

    done = calibrate(recipe, processes=KILL_PROCESSES)
    assert f"resuming; {kept} of {KILL_RUNS} runs were saved by an interrupted calibration" \
        in " ".join((done.stdout + done.stderr).split())
    assert json.loads((root / "scores.json").read_text())["samples"] == KILL_RUNS


@pytest.mark.parametrize("rank, address", [(1, "127.0.0.1"), (1, "no-such-host.invalid"), (0, "127.0.0.1")],
                         ids=["rank 0 never started", "wrong MASTER_ADDR", "the other ranks never started"])
def test_a_rank_that_cannot_meet_the_others_fails_in_one_line_after_the_join_timeout(tmp_path, rank, address):
    """Alone in its group (nobody at MASTER_ADDR:MASTER_PORT, or nobody joining rank 0): the join gives up after
    F3EXPORT_JOIN_TIMEOUT seconds, not after the 12 hours a round may take."""
    recipe = tav_recipe(tmp_path)
    port = unused_port()
    done = subprocess.run(f3export_command("build", recipe, "--until", "calibrate"), capture_output=True, text=True,
                          timeout=600, env={**ONE_THREAD, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": address,
                                            "MASTER_PORT": str(port), "F3EXPORT_JOIN_TIMEOUT": "1"})
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    [line] = done.stderr.splitlines()  # (torch's native log of each attempt, with its stacks, is not shown)
    assert line.startswith(f"error: rank {rank}: joining the torchrun group at {address}:{port} within 1 s "
                           "(F3EXPORT_JOIN_TIMEOUT) failed: another process of the torchrun group stopped or cannot "
                           "be reached ("), line
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("variable, value, message", [
    ("F3EXPORT_JOIN_TIMEOUT", "soon", "F3EXPORT_JOIN_TIMEOUT='soon': not a number of seconds above 0"),
    ("F3EXPORT_JOIN_TIMEOUT", "-1", "F3EXPORT_JOIN_TIMEOUT='-1': not a number of seconds above 0"),
    ("RANK", "first", "RANK='first': not a whole number; start several processes with torchrun"),
])
def test_a_group_variable_that_is_not_a_number_is_refused_in_one_line(tmp_path, monkeypatch, variable, value,
                                                                      message):
    for name, setting in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                          variable: value}.items():
        monkeypatch.setenv(name, setting)
    result = run("build", tav_recipe(tmp_path), "--until", "calibrate")
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {message}") and result.output.count("\n") == 1, result.output
