"""The ``f3export`` command line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .artifacts import BUILD_STAGES as STAGE_NAMES
from .errors import F3ExportError, activity_of

from .report import console, gates_table, plural, results, set_verbosity

EXIT_ENVIRONMENT = 2
EXIT_INTERNAL = 3


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


def error_document(message: str, code: int) -> dict:
    """What ``--json`` prints for a command that stopped on an error: one document, as for any other outcome."""
    return {"passed": False, "error": message, "exit_code": code}


def user_errors(command):
    """Every error as one line on stderr and its exit code (see errors.py), and under ``--json`` as one JSON
    document on stdout too; ``--debug`` keeps the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            message, code = "interrupted: finished stages are kept, the rest reruns next time", 130
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
        message = " ".join(message.splitlines())
        if kwargs.get("as_json"):
            _print_json(error_document(message, code))
        click.echo(message if code == 130 else f"error: {message}", err=True)
        sys.exit(code)

    return wrapper


class Commands(click.Group):
    """The command group; a command line click itself refuses (an unknown option, a bad value) prints, under
    ``--json``, the one JSON document every outcome prints."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["f3export.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException as exc:
            if ctx.meta.get("f3export.json"):
                _print_json(error_document(" ".join(exc.format_message().splitlines()), exc.exit_code))
            raise


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug"))


@click.group(cls=Commands)
@click.version_option(__version__, prog_name="f3export")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (for bug reports).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr (errors still).")
@click.option("-v", "--verbose", is_flag=True, help="More detail on stderr (each stage's key and cache decision).")
def main(debug: bool, quiet: bool, verbose: bool) -> None:
    """F3-Pruning of temporal attention in text-to-video models, exported to validated engines.

    Results go to stdout (--json: one JSON document), progress and notes to stderr.
    Exit codes: 0 success, 1 a validation gate or check failed, 2 bad input or environment, 3 internal error.

    Shell completion (bash; zsh/fish alike): eval "$(_F3EXPORT_COMPLETE=bash_source f3export)"
    """
    set_verbosity(quiet, verbose)


def _json_option(command):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of "
                        "the tables.")(command)


def _print_json(document) -> None:
    click.echo(json.dumps(document, indent=2))


def _gates_failed(where: Path, gates) -> str | None:
    """The one line of a build or check whose gates failed (exit 1), or None."""
    failed = [g.metric for g in gates if not g.passed]
    return f"{where}: {len(failed)} of {plural(len(gates), 'gate')} failed ({', '.join(failed)})" if failed else None


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value (repeatable), e.g. --set pruning.ratio=0.25")
@click.option("--force", is_flag=True, help="Rebuild every stage, ignoring the cache.")
@click.option("--until", type=click.Choice(STAGE_NAMES), help="Stop after this stage (e.g. calibrate on a "
              "cluster, finish elsewhere: a later build reuses what is done).")
@_json_option
@user_errors
def build(recipe: Path, overrides: tuple[str, ...], force: bool, until: str | None, as_json: bool) -> None:
    """Calibrate, prune, export, build engines and validate, as RECIPE says.

    Under torchrun (torchrun --nproc-per-node N -m f3export build RECIPE), the calibration runs are shared
    among the N processes; rank 0 writes the artifacts.
    """
    from .build import Build, print_summary, summary_document
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
    error = _gates_failed(result.root, result.gates)
    if as_json:
        _print_json({**summary_document(result), **({"error": error, "exit_code": 1} if error else {})})
    else:
        print_summary(result)
    if error:
        sys.exit(1)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe value.")
@_json_option
@user_errors
def inspect(source: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """List the temporal attention modules of SOURCE: a recipe's model before anything is pruned, or a
    finished build folder's (with the heads each module kept)."""
    from .inspection import inspect_build, inspect_recipe

    if source.is_dir():
        if overrides:
            raise click.BadParameter("--set applies to a recipe, not to a build folder", param_hint="--set")
        report = inspect_build(source)
    else:
        report = inspect_recipe(source, list(overrides))
    if as_json:
        _print_json(report.document())
    else:
        results.print(report.table())


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
    results.print(f"written: {artifact_dir / 'sweep.json'}, {artifact_dir / 'sweep.png'}", highlight=False)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--runs", default=10, show_default=True, help="Timed runs per model (after warm-up).")
@click.option("--warmup", default=2, show_default=True, help="Untimed runs per model first.")
@click.option("--ratios", default="", help="Also prune, export and time these ratios, e.g. 0,0.25,0.5,0.75,1 "
              "(writes bench.png).")
@_json_option
@user_errors
def bench(artifact_dir: Path, runs: int, warmup: int, ratios: str, as_json: bool) -> None:
    """Latency, size, memory and FLOPs of the original vs the pruned model of a build (from the build folder
    alone; --ratios also loads the source model)."""
    from .bench import Bench, print_bench

    result = Bench(artifact_dir, runs, warmup).run(_numbers(ratios, "--ratios"))
    if as_json:
        _print_json(result)
        return
    print_bench(result)
    results.print(f"written: {artifact_dir / 'bench.json'}" + (f", {artifact_dir / 'bench.png'}" if ratios else ""),
                  highlight=False)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--expect-sha256", metavar="DIGEST", help="SHA-256 of manifest.json as recorded outside the folder "
              "(closes what a self-describing manifest cannot prove: a consistent replacement of engines, "
              "goldens and hashes).")
@_json_option
@user_errors
def check(artifact_dir: Path, expect_sha256: str | None, as_json: bool) -> None:
    """Re-verify a finished build: hashes, engines on their goldens, recorded gates; exit 1 on any failure."""
    from .check import check_artifacts

    checked, gates, caveats = check_artifacts(artifact_dir, expect_sha256)
    error = _gates_failed(artifact_dir, gates)
    if as_json:
        _print_json({"artifacts": str(artifact_dir), "passed": not error, "files_verified": checked,
                     "gates": [{"metric": g.metric, "value": g.value, "limit": g.limit, "kind": g.kind,
                                "passed": g.passed} for g in gates], "cannot_vouch_for": caveats,
                     **({"error": error, "exit_code": 1} if error else {})})
    else:
        results.print(gates_table(f"check {artifact_dir}", gates))
    if error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    if not as_json:
        results.print(f"{plural(checked, 'file')} verified, {plural(len(gates), 'gate')} passed"
                      + (f", on {' and '.join(caveats)}: this build cannot vouch for a trained model's behaviour"
                         if caveats else ""), highlight=False)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--prompt", help="What the video shows (diffusion models).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The file to write: an animated "
              "image (.gif, .webp, .png) or an H.264 video (.mp4); with --token-ids, the token grid (.npy).")
@click.option("--token-ids", help="Token models (CogVideo): the video text's token ids, inline (comma-separated) "
              "or a .npy / text file; image tokens are sampled with the build's step engine.")
@click.option("--first-frame-ids", help="With --token-ids: frame 0's text ids [default: the video text's].")
@click.option("--guide-ids", help="With --token-ids: the guide text's ids (the pipeline's '<duration>秒<n>视频'): "
              "later frames sampled with the contract's guidance alpha.")
@click.option("--greedy", is_flag=True, help="With --token-ids: top-1 tokens instead of seeded top-k sampling.")
@click.option("--top-k", type=click.IntRange(1), help="With --token-ids: sample among the k most likely tokens "
              "[default: the contract's, per frame 0 and later frames].")
@click.option("--temperature", type=click.FloatRange(1e-3, 100), help="With --token-ids: the sampling "
              "temperature [default: the contract's].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**64 - 1),
              help="Seed of the initial noise (NumPy's generator).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Denoising steps, at most the scheduler's training "
              "timesteps [default: the build's validation steps].")
@click.option("--frames", type=click.IntRange(1), help="Latent frames (a pixel-space model's frames), within the "
              "range the build validated [default: the build's].")
@click.option("--guidance-scale", type=click.FloatRange(0), help="Classifier-free guidance [default: the build's "
              "validation guidance].")
@click.option("--negative-prompt", help="The unconditional row's prompt [default: the build's validation one, else "
              "the family pipeline's].")
@click.option("--dynamic-cfg/--no-dynamic-cfg", default=None, help="CogVideoX's rising guidance scale [default: as "
              "the build was validated].")
@click.option("--compare", is_flag=True, help="Also run the original engine on the same noise: original (left) "
              "and pruned (right) side by side, with their PSNR.")
@click.option("--scale", default=4, show_default=True, type=click.IntRange(1, 64), help="Pixels per output pixel "
              "in the file (small models make small frames).")
@user_errors
def generate(artifact_dir: Path, prompt: str | None, out: Path, token_ids: str | None, first_frame_ids: str | None,
             guide_ids: str | None, greedy: bool, top_k: int | None, temperature: float | None, seed: int,
             steps: int | None, frames: int | None, guidance_scale: float | None, negative_prompt: str | None,
             dynamic_cfg: bool | None, compare: bool, scale: int) -> None:
    """Generate a video from a build's engines alone (no PyTorch): text, the build's sampler, frames; or a token
    model's image tokens (--token-ids)."""
    from .errors import RecipeError
    from .generate import EnginePipeline, animation_format, inside_build, psnr, side_by_side, write_animation
    from .report import progress

    if inside_build(out, artifact_dir):
        raise RecipeError(f"--out {out}: inside the build folder {artifact_dir}, where a new file would change what "
                          "check verifies; write it elsewhere")
    if token_ids is not None:
        return generate_tokens(artifact_dir, out, token_ids, first_frame_ids, guide_ids, greedy, top_k, temperature,
                               seed, frames, compare)
    token_options = {"--first-frame-ids": first_frame_ids, "--guide-ids": guide_ids, "--greedy": greedy or None,
                     "--top-k": top_k, "--temperature": temperature}
    given = [name for name, value in token_options.items() if value is not None]
    if given:
        raise RecipeError(f"{given[0]} goes with --token-ids")
    if prompt is None:
        raise RecipeError("--prompt is required (or --token-ids, for a token model)")
    animation_format(out)  # before any work
    variants = ("original", "pruned") if compare else ("pruned",)
    pipeline = EnginePipeline(artifact_dir, variants)
    validation = pipeline.validation
    steps = steps or validation["steps"]
    guidance = validation["guidance_scale"] if guidance_scale is None else guidance_scale
    dynamic_cfg = validation["dynamic_cfg"] if dynamic_cfg is None else dynamic_cfg
    frames = pipeline.frames if frames is None else frames
    pipeline.check_request(steps, guidance, dynamic_cfg, frames)  # before the progress bars
    clips = {}
    with progress() as bar:
        for variant in variants:
            task = bar.add_task(variant, total=steps)
            clips[variant] = pipeline.sample(
                variant, prompt, seed, steps, guidance,
                validation["negative_prompt"] if negative_prompt is None else negative_prompt, dynamic_cfg,
                on_step=lambda i, task=task: bar.update(task, completed=i + 1), frames=frames)
    video = side_by_side(clips["original"].video, clips["pruned"].video) if compare else clips["pruned"].video
    write_animation(out, video, scale)
    shown = clips["pruned"].shown_as
    results.print(f"written: {out} ({video.shape[1]} frames of {video.shape[2] * scale}x{video.shape[3] * scale} pixels; "
                  f"{shown})", highlight=False)
    if compare:
        results.print(f"original (left) vs pruned (right): PSNR {psnr(clips['original'].video, clips['pruned'].video):.2f} "
                      "dB over the frames shown", highlight=False)


def generate_tokens(artifact_dir: Path, out: Path, token_ids: str, first_frame_ids: str | None, guide_ids: str | None,
                    greedy: bool, top_k: int | None, temperature: float | None, seed: int, frames: int | None,
                    compare: bool) -> None:
    """Image tokens from a build's step engines alone, as its contract's sessions say (``token_sampling``)."""
    import numpy as np
    from rich.table import Table

    from .artifacts import atomic_path
    from .errors import RecipeError
    from .report import progress
    from .token_sampling import Sampler, StepEngines, generate_tokens as sample_tokens, read_token_ids, step_flops

    if out.suffix != ".npy":
        raise RecipeError(f"--out {out}: a token grid is written as .npy")
    options = {"video": ("--token-ids", token_ids), "first_frame": ("--first-frame-ids", first_frame_ids or token_ids),
               **({"guide": ("--guide-ids", guide_ids)} if guide_ids else {})}
    texts = {text: read_token_ids(value, option) for text, (option, value) in options.items()}
    variants = ("original", "pruned") if compare else ("pruned",)
    engines = StepEngines(artifact_dir, variants)
    layout = engines.layout
    frames = layout.max_frames if frames is None else frames
    if frames > layout.max_frames:
        raise RecipeError(f"--frames {frames}: the model's layout holds at most {layout.max_frames} frames")
    for text, ids in texts.items():
        layout.text_row(ids, engines.pad, options[text][0])  # every text checked before any work

    def sampler(frame: int) -> Sampler:
        k, t = engines.sampling["first_frame" if frame == 0 else "video"]
        return Sampler(1 if greedy else top_k or k, temperature or t, seed + frame)

    made = {}
    with progress() as bar:
        for variant in variants:
            task = bar.add_task(variant, total=frames * layout.frame_len)
            made[variant] = sample_tokens(engines.step_function(variant), layout, engines.sessions[bool(guide_ids)],
                                          texts, frames, sampler, engines.pad,
                                          guidance=engines.alpha if guide_ids else None,
                                          on_token=lambda task=task: bar.advance(task))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, made["pruned"].tokens)
    positions = range(layout.text_slots, layout.text_slots + frames * layout.frame_len)
    flops = {v: step_flops(*engines.cache_heads(v), layout, positions) for v in variants}
    drawn = "greedy" if greedy else ", ".join(
        f"{part}: top {sampler(frame).top_k} at temperature {sampler(frame).temperature:g}"
        for part, frame in (("frame 0", 0), ("later frames", 1))[:min(frames, 2)]) + f", seed {seed}"
    table = Table(title=f"generate {artifact_dir}: {frames} frames x {layout.frame_len} image tokens, {drawn}")
    for column in ("engine", "tokens/s (median)", "p10-p90", "GFLOP per token"):
        table.add_column(column)
    for variant, result in made.items():
        median, low, high = result.tokens_per_second()
        table.add_row(f"step.{variant}", f"{median:.1f}", f"{low:.1f}-{high:.1f}",
                      f"{flops[variant] / len(positions) / 1e9:.4g}")
    results.print(table)
    results.print(f"written: {out} (int64 [{frames}, {layout.frame_len}] image token ids; a video needs icetk's image "
                  "tokenizer to decode them, not shipped)", highlight=False)
    if compare:
        (fast, fast_low, fast_high), (slow, slow_low, slow_high) = (made[v].tokens_per_second()
                                                                     for v in ("pruned", "original"))
        same = float((made["original"].tokens == made["pruned"].tokens).mean())
        overlap = fast_low <= slow_high and slow_low <= fast_high
        results.print(f"pruned vs original: {fast / slow:.2f}x tokens per second"
                      + (" (within the spread of the step times: not a result)" if overlap else "")
                      + f"; ideal from counted FLOPs {flops['original'] / flops['pruned']:.2f}x; {same:.1%} of "
                      "tokens the same", highlight=False)


@main.command("export-triton")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, type=click.Choice(["original", "pruned"]),
              help="Which engines [default: both].")
@user_errors
def export_triton(artifact_dir: Path, repo: Path, variants: tuple[str, ...]) -> None:
    """Write a Triton Inference Server model repository REPO (a new folder) from a build's engines:
    <model>/config.pbtxt and <model>/1/model.onnx (or model.plan), I/O from the engine contract."""
    from .triton import export_triton as write_repository

    models = write_repository(artifact_dir, repo, variants or ("original", "pruned"))
    for model in models:
        results.print(f"written: {model.folder}/config.pbtxt, {model.folder}/1/", highlight=False)
    results.print(f"serve with: tritonserver --model-repository {repo}", highlight=False)
