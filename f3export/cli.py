"""The ``f3export`` command line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import F3ExportError
from .report import console, gates_table, table


def user_errors(command):
    """Turn expected errors into one line on stderr and the error's exit code, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except F3ExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished stages are kept, the rest reruns next time", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="f3export")
def main() -> None:
    """F3-Pruning of temporal attention in text-to-video models, exported to validated engines."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value (repeatable), e.g. --set pruning.ratio=0.25")
@click.option("--force", is_flag=True, help="Rebuild every stage, ignoring the cache.")
@user_errors
def build(recipe: Path, overrides: tuple[str, ...], force: bool) -> None:
    """Calibrate, prune, export, build engines and validate, as RECIPE says."""
    from .build import Build, print_summary
    from .recipe import load_recipe

    result = Build(load_recipe(recipe, list(overrides)), force=force).run()
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
    model = build.bundle.model
    rows, total = [], 0
    for site in build.adapter.temporal_sites(model):
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

    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"{ratios!r}: expected comma-separated numbers", param_hint="--ratios") from None
    if any(not 0 <= r <= 1 for r in ratio_list):
        raise click.BadParameter(f"{ratios!r}: ratios lie in [0, 1]", param_hint="--ratios")
    result = Bench(artifact_dir, runs, warmup).run(ratio_list)
    print_bench(result)
    console.print(f"written: {artifact_dir / 'bench.json'}", highlight=False)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@user_errors
def check(artifact_dir: Path) -> None:
    """Re-run the engines of a build on its goldens; fail on any change or drift."""
    from .check import check_artifacts

    checked, gates = check_artifacts(artifact_dir)
    console.print(gates_table(f"check {artifact_dir}", gates))
    failed = [g.metric for g in gates if not g.passed]
    if failed:
        click.echo(f"error: {artifact_dir}: engine output drifted from the goldens ({', '.join(failed)})", err=True)
        sys.exit(1)
    console.print(f"{checked} files verified, {len(gates)} gates passed", highlight=False)
