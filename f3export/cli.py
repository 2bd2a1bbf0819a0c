"""The ``f3export`` command line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .artifacts import BUILD_STAGES as STAGE_NAMES
from .errors import F3ExportError, activity_of

EXIT_ENVIRONMENT = 2
EXIT_INTERNAL = 3
from .report import console, gates_table, table


def _environment_error(exc: BaseException) -> str | None:
    """One line for an error of the machine or its files (not of f3export), or None for a bug."""
    doing = activity_of(exc)
    while_doing = f" (while {doing})" if doing else ""
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "file system"
        other = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
        reason = exc.strerror or type(exc).__name__
        return f"{where}{other}: {reason}{while_doing}"
    if isinstance(exc, ValueError) and "null byte" in str(exc):
        return f"a path contains a NUL byte{while_doing}"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "allocate memory" in str(exc)):
        return f"out of memory{while_doing}: reduce the shape, batch or model size"
    return None


def user_errors(command):
    """Every error as one line on stderr and its exit code (see errors.py); ``--debug`` keeps the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: finished stages are kept, the rest reruns next time", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if _debug():
                raise
            if isinstance(exc, F3ExportError):
                message, code = str(exc), exc.exit_code
            elif (line := _environment_error(exc)) is not None:
                message, code = line, EXIT_ENVIRONMENT
            else:
                first = " ".join(str(exc).split())[:300]
                message = (f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback, "
                           "and please report it)")
                code = EXIT_INTERNAL
            click.echo(f"error: {' '.join(message.splitlines())}", err=True)
            sys.exit(code)

    return wrapper


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


@click.group()
@click.version_option(__version__, prog_name="f3export")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (for bug reports).")
def main(debug: bool) -> None:
    """F3-Pruning of temporal attention in text-to-video models, exported to validated engines.

    Exit codes: 0 success, 1 a validation gate or check failed, 2 bad input or environment, 3 internal error.
    """


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value (repeatable), e.g. --set pruning.ratio=0.25")
@click.option("--force", is_flag=True, help="Rebuild every stage, ignoring the cache.")
@click.option("--until", type=click.Choice(STAGE_NAMES), help="Stop after this stage (e.g. calibrate on a "
              "cluster, finish elsewhere: a later build reuses what is done).")
@user_errors
def build(recipe: Path, overrides: tuple[str, ...], force: bool, until: str | None) -> None:
    """Calibrate, prune, export, build engines and validate, as RECIPE says.

    Under torchrun (torchrun --nproc-per-node N -m f3export build RECIPE), the calibration runs are shared
    among the N processes; rank 0 writes the artifacts.
    """
    from .build import Build, print_summary
    from .distributed import Team
    from .recipe import load_recipe

    loaded = load_recipe(recipe, list(overrides))
    team = Team.join(loaded.calibration.device)
    try:
        build = Build(loaded, force=force, team=team, until=until)
        if team is not None and not team.leader:
            lent = "calibration runs done for rank 0" if build.follow() else \
                "nothing to calibrate (rank 0 reused its calibration, or stopped before it)"
            console.print(f"rank {team.rank} of {team.size}: {lent}; rank 0 writes the artifacts", highlight=False)
            return
        result = build.run()
    finally:
        if team is not None:
            team.close()
    print_summary(result)
    if not result.passed:
        sys.exit(1)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe value.")
@user_errors
def inspect(recipe: Path, overrides: tuple[str, ...]) -> None:
    """List the temporal attention modules RECIPE's model has, before anything is pruned."""
    from .build import Build
    from .recipe import load_recipe

    build = Build(load_recipe(recipe, list(overrides)))
    model = build.model.bundle.model
    rows, total = [], 0
    for site in build.adapter.structure.temporal_sites(model):
        heads = site.heads_of(model)
        modules = [heads.module] + ([model.get_submodule(site.own_norm)] if site.own_norm else [])
        count = sum(p.numel() for m in modules for p in m.parameters())
        total += count
        rows.append([site.attention, str(heads.heads), str(heads.head_dim), f"{count:,}"])
    params = sum(p.numel() for p in model.parameters())
    result = table(f"{build.recipe.model.family}: temporal attention modules", ["module", "heads", "head dim",
                                                                              "parameters"], rows)
    result.caption = (f"{len(rows)} modules, {sum(int(r[1]) for r in rows)} heads, {total:,} of {params:,} "
                      f"parameters ({100 * total / params:.1f}%)")
    console.print(result)


def _numbers(text: str, option: str) -> list[float]:
    try:
        values = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=option) from None
    if any(not 0 <= r <= 1 for r in values):
        raise click.BadParameter(f"{text!r}: ratios lie in [0, 1]", param_hint=option)
    return values


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--ratios", default="0,0.25,0.5,0.75,1", show_default=True, help="Pruning ratios to compare.")
@click.option("--criteria", default="contribution,mixing,magnitude,random", show_default=True,
              help="Criteria to compare (each a [pruning].criterion).")
@click.option("--actions", default="", help="Actions to compare, e.g. frame-local,remove (each a "
              "[pruning].action); default: the build's.")
@click.option("--runs", default=10, show_default=True, help="Timed runs per engine (after warm-up).")
@click.option("--warmup", default=2, show_default=True, help="Untimed runs per engine first.")
@user_errors
def sweep(artifact_dir: Path, ratios: str, criteria: str, actions: str, runs: int, warmup: int) -> None:
    """Compare pruning criteria at several ratios on a build's calibration: fidelity on the held-out runs
    (video PSNR/SSIM, task metric) and measured speedup. Writes sweep.json and sweep.png."""
    from .criteria import CRITERIA
    from .sweep import Sweep, print_sweep

    names = [c.strip() for c in criteria.split(",") if c.strip()]
    unknown = [c for c in names if c not in CRITERIA]
    if unknown or not names:
        raise click.BadParameter(f"{criteria!r}: criteria are {', '.join(CRITERIA)}", param_hint="--criteria")
    from .recipe import ACTIONS

    chosen = [a.strip() for a in actions.split(",") if a.strip()]
    if any(a not in ACTIONS for a in chosen):
        raise click.BadParameter(f"{actions!r}: actions are {', '.join(ACTIONS)}", param_hint="--actions")
    result = Sweep(artifact_dir, runs, warmup).run(names, _numbers(ratios, "--ratios") or [0.5], chosen)
    print_sweep(result)
    console.print(f"written: {artifact_dir / 'sweep.json'}, {artifact_dir / 'sweep.png'}", highlight=False)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--runs", default=10, show_default=True, help="Timed runs per model (after warm-up).")
@click.option("--warmup", default=2, show_default=True, help="Untimed runs per model first.")
@click.option("--ratios", default="", help="Also prune, export and time these ratios, e.g. 0,0.25,0.5,0.75,1 "
              "(writes bench.png).")
@user_errors
def bench(artifact_dir: Path, runs: int, warmup: int, ratios: str) -> None:
    """Latency, size, memory and FLOPs of the original vs the pruned model of a build."""
    from .bench import Bench, print_bench

    result = Bench(artifact_dir, runs, warmup).run(_numbers(ratios, "--ratios"))
    print_bench(result)
    console.print(f"written: {artifact_dir / 'bench.json'}", highlight=False)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--expect-sha256", metavar="DIGEST", help="SHA-256 of manifest.json as recorded outside the folder "
              "(closes what a self-describing manifest cannot prove: a consistent replacement of engines, "
              "goldens and hashes).")
@user_errors
def check(artifact_dir: Path, expect_sha256: str | None) -> None:
    """Re-verify a finished build: hashes, engines on their goldens, recorded gates; exit 1 on any failure."""
    from .check import check_artifacts

    checked, gates = check_artifacts(artifact_dir, expect_sha256)
    console.print(gates_table(f"check {artifact_dir}", gates))
    failed = [g.metric for g in gates if not g.passed]
    if failed:
        click.echo(f"error: {artifact_dir}: {len(failed)} of {len(gates)} gates failed ({', '.join(failed)})",
                   err=True)
        sys.exit(1)
    console.print(f"{checked} files verified, {len(gates)} gates passed", highlight=False)
