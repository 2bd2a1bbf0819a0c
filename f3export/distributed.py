"""Calibration across processes and machines, on torch.distributed, as ``torchrun`` starts them.

``torchrun --nproc-per-node N -m f3export build recipe.toml`` starts N copies of the build; they meet through
torchrun's ``env://`` rendezvous (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``). Rank 0, the leader, builds: it
holds the artifact folder and runs every stage. When its calibration must run, it tells the others the
calibration's stage key, which each compares with its own (its recipe and model files); if any differs, every
rank refuses in one line. The runs left are dealt out in rounds, run ``round * size + rank`` to each rank (a
rank past the last run of a short round lends nothing to it); after every round each rank's statistics go to
the leader, which saves them (so a killed calibration resumes) and sums all runs in run order at the end, so
``scores.json`` is the same bytes as a single process's. The others write nothing.

Statistics are gathered over gloo when calibration runs on the CPU (each process on its own threads), over
NCCL when it runs on GPUs (``[calibration].device = "cuda"``: each process on the GPU of its LOCAL_RANK); a
process that stops closes its connections, so every other rank fails its next exchange with one line and
records nothing.

Joining the group (reaching ``MASTER_ADDR:MASTER_PORT`` and meeting every other rank there) is bounded by
``F3EXPORT_JOIN_TIMEOUT`` seconds (``JOIN_TIMEOUT``, 5 minutes, when unset; plus one retry's delay, a second or
two, when the address does not answer): a wrong address or port, or a rank that never starts, is one line then,
not a wait of the 12-hour ``ROUND_TIMEOUT`` that bounds a round.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .errors import F3ExportError

# A round waits for its slowest run: long for a multi-billion-parameter model. A rank that dies is seen at
# once (its connections close); this bounds only a rank that hangs.
ROUND_TIMEOUT = timedelta(hours=12)
# torchrun starts a group's processes together, and each joins as soon as it has read its recipe: waiting
# longer than this for the others means one of them is unreachable (wrong MASTER_ADDR or MASTER_PORT) or absent.
JOIN_TIMEOUT = timedelta(minutes=5)
JOIN_TIMEOUT_VARIABLE = "F3EXPORT_JOIN_TIMEOUT"  # seconds, overriding JOIN_TIMEOUT
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STARTED_BY = "start several processes with torchrun (see README, \"Calibration on several processes\")"


class TeamError(F3ExportError):
    """Another process of the torchrun group stopped, or disagrees about the build."""


def failure(message: str) -> TeamError:
    """The error this process of the group fails with. torchrun stops every other process (SIGTERM) when it
    sees one fail: from now on that is ignored, so it cannot cut this process's one line short with a second
    error; the process is on its way out anyway."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return TeamError(message)


def whole_number(name: str, default: str = "") -> int:
    """torchrun's variable ``name`` (``default`` when unset or empty)."""
    text = os.environ.get(name) or default
    try:
        return int(text)
    except ValueError:
        raise TeamError(f"{name}={text!r}: not a whole number; {STARTED_BY}") from None


def join_timeout() -> timedelta:
    """How long joining the group may take: ``F3EXPORT_JOIN_TIMEOUT`` seconds, else ``JOIN_TIMEOUT``."""
    text = os.environ.get(JOIN_TIMEOUT_VARIABLE, "")
    if not text:
        return JOIN_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise TeamError(f"{JOIN_TIMEOUT_VARIABLE}={text!r}: not a number of seconds above 0")
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def native_log_silenced() -> Iterator[None]:
    """Standard error (fd 2) to /dev/null: torch's C++ side logs each failed attempt to reach the store with a
    native stack, which a failed join's one line replaces (TORCH_CPP_LOG_LEVEL is read only as torch loads)."""
    sys.stderr.flush()
    kept, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(kept, 2)
        os.close(kept)


class Team:
    """The processes torchrun started for one build; ``leader`` (rank 0) builds, the others lend their runs."""

    def __init__(self, rank: int, size: int, local_rank: int):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self._announced = False

    @classmethod
    def join(cls, device: str) -> Team | None:
        """The group this process was started in (its calibration on ``device``: "cpu" or "cuda"), or None
        outside torchrun (or with one process)."""
        if whole_number("WORLD_SIZE", "1") <= 1:
            return None
        missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
        if missing:
            raise TeamError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: {STARTED_BY}")
        rank, local_rank, timeout = whole_number("RANK"), whole_number("LOCAL_RANK", "0"), join_timeout()
        if device == "cuda":
            torch.cuda.set_device(local_rank)  # NCCL gathers through this process's own GPU
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        with cls._exchange(rank, f"joining the torchrun group at {where} within {timeout.total_seconds():g} s "
                                 f"({JOIN_TIMEOUT_VARIABLE})"), native_log_silenced():
            # Reaching the store (rank 0's, or torchrun's agent's) and meeting every rank there take the join
            # timeout at most; the group then connects through it, and its exchanges wait up to ROUND_TIMEOUT.
            store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # (torchrun's agent store outlives one)
            store.set(f"f3export/joined/{attempt}/{rank}", "")
            store.wait([f"f3export/joined/{attempt}/{other}" for other in range(size)], timeout)
            dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=size, timeout=ROUND_TIMEOUT)
        team = cls(rank, size, local_rank)
        signal.signal(signal.SIGTERM, team._stopped)
        return team

    def _stopped(self, signum: int, frame: Any) -> None:
        """torchrun stops every process of the group when one fails: say so in this process's one line."""
        raise failure(f"rank {self.rank}: stopped by torchrun, which stops the group when one of its processes "
                      "fails (see its report); nothing is recorded, and a rerun resumes from the saved runs")

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @staticmethod
    @contextlib.contextmanager
    def _exchange(rank: int, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, ValueError) as exc:  # gloo's errors (DistBackendError is a RuntimeError)
            first = " ".join(str(exc).split())[:200]
            raise failure(f"rank {rank}: {what} failed: another process of the torchrun group stopped or cannot be "
                          f"reached ({first}); nothing is recorded, and a rerun resumes from the saved runs") from None

    def _broadcast(self, value: Any, what: str) -> Any:
        box = [value]
        with self._exchange(self.rank, what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def announce(self, key: str | None) -> None:
        """Leader: the calibration key the others join, or None if calibration does not run (reused, or the
        build stopped before it). Once per build; later calls do nothing."""
        if not self._announced:
            self._announced = True
            self._broadcast(key, "announcing the calibration")
            if key is not None:
                self._agree_on(key, key)

    def await_calibration(self, own_key: str) -> bool:
        """Follower: whether the leader's build calibrates; refused if it calibrates something else."""
        key = self._broadcast(None, "waiting for rank 0's build")
        if key is not None:
            self._agree_on(key, own_key)
        return key is not None

    def _agree_on(self, key: str, own_key: str) -> None:
        """Every rank learns which ranks calibrate something else than the leader's ``key``, and all of them
        refuse then, the leader included (which would otherwise wait for runs that never come)."""
        same = [None] * self.size
        with self._exchange(self.rank, "comparing calibration keys"):
            dist.all_gather_object(same, own_key == key)
        differ = [str(rank) for rank, agrees in enumerate(same) if not agrees]
        if differ:
            here = f" (calibration key {own_key[:12]} here, {key[:12]} on rank 0)" if own_key != key else ""
            ranks = f"rank{'s' if len(differ) > 1 else ''} {', '.join(differ)}"
            raise failure(f"rank {self.rank}: the recipe, model files or libraries of {ranks} differ from rank "
                          f"0's{here}; give every process the same")

    def agree(self, todo: list[int]) -> list[int]:
        """The leader's list of runs left (it alone holds the saved runs), on every rank."""
        return self._broadcast(todo if self.leader else None, "sharing the runs left")

    def share(self, todo: list[int], progress: Callable[[], Any],
              run_one: Callable[[int, Callable[[int], None]], Any], finished: Callable[[int, Any], None]) -> None:
        """Run ``todo`` in rounds, one run per rank each; after a round, the leader calls ``finished`` for every
        run in it, in run order. ``progress`` makes the leader's bar (``calibrate.RunProgress``)."""
        rounds = [todo[start:start + self.size] for start in range(0, len(todo), self.size)]
        with progress() if self.leader else contextlib.nullcontext() as bar:
            for batch in rounds:
                mine = batch[self.rank] if self.rank < len(batch) else None
                on_step = bar.step if bar is not None else (lambda i: None)
                result = (mine, run_one(mine, on_step)) if mine is not None else None
                gathered = [None] * self.size if self.leader else None
                with self._exchange(self.rank, f"gathering runs {batch[0]}-{batch[-1]}"):
                    dist.gather_object(result, gathered, dst=0)
                if self.leader:
                    for index, run in sorted(item for item in gathered if item is not None):
                        finished(index, run)
                    bar.runs_done(len(batch))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()
