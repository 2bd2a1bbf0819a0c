"""Console output: progress bars for long stages and the summary table at the end."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Logs (CI, pipes) get lines wide enough for module names; a terminal uses its own width.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=not sys.stderr.isatty())


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
