"""Console output. Results (tables, verdicts, JSON) go to stdout, so they can be piped or redirected;
progress and notes go to stderr. ``-q`` silences stderr but for errors; ``-v`` adds per-stage detail.

In a terminal progress is a live bar; elsewhere (a CI log, a pipe) it is plain lines with counts and the
elapsed time, at most one every ``LINE_EVERY_S`` seconds and one at the end, so a log shows the job moving."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Logs (CI, pipes) get lines wide enough for module names; a terminal uses its own width.
# soft_wrap: a line of text stays one line (a log, a grep, a script reading stdout); tables keep the width
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=True)  # progress and notes
results = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)  # what a command produces
LINE_EVERY_S = 10.0
verbose = False


def set_verbosity(quiet: bool, loud: bool) -> None:
    global verbose
    console.quiet = quiet
    verbose = loud and not quiet


def detail(message: str) -> None:
    """A note printed only with ``-v``."""
    if verbose:
        console.print(message, highlight=False)


def progress() -> Progress | "LineProgress":
    if console.is_terminal:
        return Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    return LineProgress()


class LineProgress:
    """rich's Progress interface (the part used here) as plain lines: "validate  12/40  0:00:31"."""

    def __init__(self):
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks.values():
            if task["printed"] != task["completed"]:
                self._print(task)

    def add_task(self, description: str, total: float, completed: float = 0) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = {"description": description, "total": total, "completed": completed,
                               "start": time.monotonic(), "last": 0.0, "printed": None}
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, completed=self.tasks[task_id]["completed"] + advance)

    def update(self, task_id: int, completed: float) -> None:
        task = self.tasks[task_id]
        task["completed"] = completed
        now = time.monotonic()
        if now - task["last"] >= LINE_EVERY_S or completed >= task["total"]:
            self._print(task)

    def _print(self, task: dict) -> None:
        task["last"], task["printed"] = time.monotonic(), task["completed"]
        elapsed = int(task["last"] - task["start"])
        console.print(f"{task['description']:<10} {int(task['completed'])}/{int(task['total'])}  "
                      f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}", highlight=False)


def plural(count: int, noun: str) -> str:
    """"1 module", "2 modules", "0 modules"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column, overflow="fold")
    for row in rows:
        result.add_row(*row)
    return result


def gates_table(title: str, gates) -> Table:
    """Validation gates (``metric``, ``value``, ``limit``, ``kind``, ``passed``) with their verdicts."""
    return table(title, ["metric", "value", "limit", "result"], [
        [g.metric, f"{g.value:.6g}", f"{'<=' if g.kind == 'max' else '>='} {g.limit:g}",
         "[green]pass[/]" if g.passed else "[bold red]FAIL[/]"] for g in gates])


def unvouched(scores: dict) -> list[str]:
    """What a build cannot vouch for, from its scores.json, in words short enough for a verdict line: the same
    gates mean little on weights never trained or on prompts the model never read."""
    from .text_standin import STANDIN_TEXT

    text = scores.get("text")
    return (["random weights (never trained)"] if scores.get("random_weights") is True else []) + \
        (["stand-in text (seeded random embeddings, not a text encoder's)"]
         if isinstance(text, str) and text.startswith(STANDIN_TEXT) else [])

