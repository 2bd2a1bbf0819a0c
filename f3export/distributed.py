"""Calibration across processes and machines, on torch.distributed, as ``torchrun`` starts them.

``torchrun --nproc-per-node N -m f3export build recipe.toml`` starts N copies of the build; they meet through
torchrun's ``env://`` rendezvous (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``). Rank 0, the leader, builds: it
holds the artifact folder and runs every stage. When its calibration must run, it tells the others (the
calibration's stage key, which each checks against its own recipe and model files) and the runs left are dealt
out in rounds, run ``round * size + rank`` to each rank; after every round each rank's statistics go to the
leader, which saves them (so a killed calibration resumes) and sums all runs in run order at the end, so
``scores.json`` is the same bytes as a single process's. The others write nothing.

Statistics are gathered over gloo when calibration runs on the CPU (each process on its own threads), over
NCCL when it runs on GPUs (``[calibration].device = "cuda"``: each process on the GPU of its LOCAL_RANK); a
process that stops closes its connections, so every other rank fails its next exchange with one line and
records nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .errors import F3ExportError

# A round waits for its slowest run: long for a multi-billion-parameter model. A rank that dies is seen at
# once (its connections close); this bounds only a rank that hangs.
ROUND_TIMEOUT = timedelta(hours=12)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TeamError(F3ExportError):
    """Another process of the torchrun group stopped, or disagrees about the build."""


class Team:
    """The processes torchrun started for one build; ``leader`` (rank 0) builds, the others lend their runs."""

    def __init__(self, rank: int, size: int, local_rank: int):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self._announced = False

    @classmethod
    def join(cls, device: str) -> Team | None:
        """The group this process was started in (its calibration on ``device``: "cpu" or "cuda"), or None
        outside torchrun (or with one process)."""
        if int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
            return None
        missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
        if missing:
            raise TeamError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: start "
                            "several processes with torchrun (see README, \"Calibration on several processes\")")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local_rank)  # NCCL gathers through this process's own GPU
        with cls._exchange(None, "joining the torchrun group"):
            dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://",
                                    timeout=ROUND_TIMEOUT)
        team = cls(dist.get_rank(), dist.get_world_size(), local_rank)
        signal.signal(signal.SIGTERM, team._stopped)
        return team

    def _stopped(self, signum: int, frame: Any) -> None:
        """torchrun stops every process of the group when one fails: say so in this process's one line."""
        raise TeamError(f"rank {self.rank}: stopped by torchrun, which stops the group when one of its processes "
                        "fails (see its report); nothing is recorded, and a rerun resumes from the saved runs")

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @staticmethod
    @contextlib.contextmanager
    def _exchange(rank: int | None, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, ValueError) as exc:  # gloo's errors (DistBackendError is a RuntimeError)
            first = " ".join(str(exc).split())[:200]
            who = f"rank {rank}: " if rank is not None else ""
            raise TeamError(f"{who}{what} failed: another process of the torchrun group stopped or cannot be "
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

    def await_calibration(self, own_key: str) -> bool:
        """Follower: whether the leader's build calibrates; refused if it calibrates something else."""
        key = self._broadcast(None, "waiting for rank 0's build")
        if key is not None and key != own_key:
            raise TeamError(f"rank {self.rank}: this process's recipe, model files or libraries differ from rank "
                            f"0's (calibration key {own_key[:12]} here, {key[:12]} there); give every process the same")
        return key is not None

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
