"""Step schedules: ``[pruning] pruned_steps = [start, stop]`` runs the pruned model on that stretch of every trajectory
and the original on the rest, in validation, in the engines-only runtime and in the drop-in denoiser alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from f3export.models.protocols import DiffusionRun
from f3export.prune import make_plan, pruned_copy
from f3export.recipe import PruningSection
from f3export.runtime import EngineRunner, denoiser
from f3export.schedule import ScheduledDenoiser, StepSchedule, scheduled
from f3export.scheduling import numpy_sampler
from f3export.weights import read_json

from conftest import FAST_RECIPE, SMALL_SHAPE, TAV, run, scores_for


@pytest.mark.parametrize("config, steps, pruned", [
    ({"num_train_timesteps": 1000, "timestep_spacing": "trailing"}, 20, list(range(4, 16))),  # CogVideoX's
    ({"num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1}, 10, list(range(5, 10))),
])
def test_the_schedule_reads_the_trajectory_position_of_each_timestep(config, steps, pruned):
    sampler = numpy_sampler("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                              "beta_end": 0.012, **config})
    sampler.set_timesteps(steps)
    schedule = StepSchedule(0.2, 0.8, 1000) if steps == 20 else StepSchedule(0.5, 1.0, 1000)
    assert [i for i, t in enumerate(sampler.timesteps) if schedule.prunes(t)] == pruned
    assert schedule.share(sampler.timesteps) == len(pruned) / steps


class Spy:
    def __init__(self, name, model, calls):
        self.name, self.model, self.calls = name, model, calls

    def __call__(self, *args, **kwargs):
        self.calls.append(self.name)
        return self.model(*args, **kwargs)


def test_a_scheduled_trajectory_calls_the_pruned_model_on_its_stretch_only(tiny_bundle):
    pruned = pruned_copy(TAV, tiny_bundle.model, make_plan(scores_for(tiny_bundle.model), PruningSection(ratio=1.0)))
    calls = []
    model = ScheduledDenoiser(Spy("original", tiny_bundle.model, calls), Spy("pruned", pruned, calls),
                              StepSchedule(0.5, 1.0, 1000))
    with torch.no_grad():
        TAV.trajectory(tiny_bundle, model, DiffusionRun("a dog", 0, 10, 7.5), SMALL_SHAPE)
    assert calls == ["original"] * 5 + ["pruned"] * 5
    assert scheduled(TAV, tiny_bundle, pruned, (0.0, 1.0)) is pruned  # no schedule: the pruned model alone


def test_a_scheduled_build_deploys_both_engines_switched_by_timestep(tmp_path):
    recipe = tmp_path / "scheduled.toml"
    recipe.write_text(FAST_RECIPE.replace("{out}", str(tmp_path / "artifacts"))
                      .replace("ratio = 0.5", "ratio = 1.0\npruned_steps = [0.5, 1.0]"))
    result = run("build", recipe)
    assert result.exit_code == 0, result.output
    root = tmp_path / "artifacts" / "scheduled"
    schedule = read_json(root / "manifest.json")["contract"]["conventions"]["step_schedule"]
    assert (schedule["start"], schedule["stop"], schedule["num_train_timesteps"]) == (0.5, 1.0, 1000)
    engine = denoiser(root)
    assert isinstance(engine, ScheduledDenoiser)
    original, pruned = EngineRunner(root, "original"), EngineRunner(root)
    generator = np.random.default_rng(0)
    x = generator.standard_normal((2, 4, 4, 8, 8), dtype=np.float32)
    text = generator.standard_normal((2, 77, 32), dtype=np.float32)
    late, early = np.float32(1), np.float32(901)  # positions 0.999 (pruned) and 0.099 (original)
    assert np.array_equal(engine(x, late, text), pruned(x, late, text))
    assert np.array_equal(engine(x, early, text), original(x, early, text))
    assert not np.allclose(pruned(x, early, text), original(x, early, text), atol=1e-4)
    # generate follows the schedule: the scheduled pruned video is the original's at no step, and differs
    clip = tmp_path / "clip.gif"
    result = run("generate", root, "--prompt", "a dog", "--steps", "4", "--compare", "--out", clip)
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output
    # bench prices the schedule per trajectory: the pruned engine runs 2 of the recipe's 3 validation steps
    result = run("bench", root, "--runs", "2", "--warmup", "1")
    assert result.exit_code == 0, result.output
    bench = read_json(root / "bench.json")
    scheduled = bench["step_schedule"]
    assert scheduled["pruned_steps_share"] == pytest.approx(2 / 3)
    assert scheduled["ideal_speedup"] == pytest.approx(1 / (2 / 3 / bench["ideal_speedup"] + 1 / 3))
    measured = bench["backends"]["onnxruntime"]["measured_speedup"]
    assert scheduled["measured_speedup"]["onnxruntime"] == pytest.approx(1 / (2 / 3 / measured + 1 / 3))


def test_a_schedule_must_be_a_stretch_of_a_denoising_trajectory(write_recipe):
    from click.testing import CliRunner

    from f3export.cli import main

    for steps, expected in (("[0.8, 0.2]", "expected [start, stop] with 0 <= start < stop <= 1"),
                            ("[0.2]", "expected [start, stop]")):
        path = write_recipe(FAST_RECIPE.replace("ratio = 0.5", f"ratio = 0.5\npruned_steps = {steps}"))
        result = CliRunner().invoke(main, ["build", str(path)])
        assert result.exit_code == 2 and expected in result.output, result.output


def test_ratio_auto_searches_each_listed_schedule_and_keeps_the_most_flops_per_trajectory(tmp_path):
    recipe = tmp_path / "searched.toml"
    recipe.write_text(FAST_RECIPE.replace("{out}", str(tmp_path / "artifacts"))
                      .replace("ratio = 0.5", 'ratio = "auto"\nsearch_steps = [0.5]')
                      .replace("pruning_min_latent_psnr = 5.0", "pruning_min_latent_psnr = 30.0"))
    result = run("build", recipe)
    assert result.exit_code in (0, 1), result.output
    plan = read_json(tmp_path / "artifacts" / "searched" / "plan.json")
    candidates = plan["search"]["candidates"]
    assert [c["steps"] for c in candidates] == [[0.0, 1.0], [0.5, 1.0]]
    # 3 DDIM steps (leading: timesteps 667, 334, 1): [0.5, 1) prunes the last two
    assert [c["pruned_steps_share"] for c in candidates] == [1.0, pytest.approx(2 / 3)]
    for c in candidates:
        assert c["flops_saved_x_share"] == pytest.approx(c["flops_saved_per_forward"] * c["pruned_steps_share"])
        assert (c["flops_saved_per_forward"] > 0) == (c["removed_heads"] > 0)
        assert c["search"]["tried"]  # every ratio tried for every candidate recorded
    best = max(range(2), key=lambda i: (candidates[i]["flops_saved_x_share"], -i))
    assert plan["search"]["chosen_candidate"] == best
    assert plan["steps"] == candidates[best]["steps"]
    config = read_json(tmp_path / "artifacts" / "searched" / "pruned" / "config.json")
    assert config["steps"] == candidates[best]["steps"]  # what export and validation read


WINDOW_SEARCH = """
[model]
family = "cogvideox"
preset = "tiny"
frames = 3
latent_height = 8
latent_width = 8

[calibration]
prompts = ["a man is skiing"]
seeds = [0]
steps = 2

[pruning]
ratio = "auto"
action = "temporal-window"
window = 1
search_windows = [0]
search_steps = [0.5]

[export]
dynamic_axes = ["batch", "frames"]

[validation]
prompts = ["a dog is running"]
seeds = [1000]
steps = 2
export_samples = 1
pruning_min_step_cosine = 0.99

[output]
dir = "{out}"
"""


def test_ratio_auto_searches_windows_with_schedules_and_the_chosen_window_is_built(tmp_path):
    recipe = tmp_path / "windows.toml"
    recipe.write_text(WINDOW_SEARCH.replace("{out}", str(tmp_path / "artifacts")))
    result = run("build", recipe)
    assert result.exit_code in (0, 1), result.output
    root = tmp_path / "artifacts" / "windows"
    plan = read_json(root / "plan.json")
    candidates = plan["search"]["candidates"]
    assert [(c["steps"], c["window"]) for c in candidates] == [([0.0, 1.0], 1), ([0.0, 1.0], 0),
                                                               ([0.5, 1.0], 1), ([0.5, 1.0], 0)]
    best = max(range(4), key=lambda i: (candidates[i]["flops_saved_x_share"], -i))
    assert plan["search"]["chosen_candidate"] == best and plan["window"] == candidates[best]["window"]
    assert read_json(root / "pruned" / "config.json")["window"] == candidates[best]["window"]
