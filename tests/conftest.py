"""Shared fixtures: the tiny Tune-A-Video model and helpers to write recipes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from f3export.cli import main

from f3export.models import get_adapter
from f3export.models.base import VideoShape

TAV = get_adapter("tune-a-video")
SMALL_SHAPE = VideoShape(frames=4, latent_height=8, latent_width=8)


@pytest.fixture(scope="session")
def tiny_bundle():
    return TAV.load_preset("tiny", seed=0)


@pytest.fixture
def tiny_model(tiny_bundle):
    return copy.deepcopy(tiny_bundle.model)


@pytest.fixture
def small_inputs(tiny_bundle):
    return TAV.export_spec(tiny_bundle.model, SMALL_SHAPE, batch=2, dynamic=[], seed=7).inputs


FAST_RECIPE = """
[model]
family = "tune-a-video"
preset = "tiny"
frames = 4
latent_height = 8
latent_width = 8

[calibration]
prompts = ["a man is skiing"]
seeds = [0]
steps = 3

[pruning]
ratio = 0.5

[validation]
prompts = ["a dog is running"]
seeds = [1000]
steps = 3
export_samples = 1
pruning_min_step_cosine = 0.5
pruning_min_latent_psnr = 5.0

[output]
dir = "{out}"
"""


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(text, name) -> path; ``{out}`` in the text becomes an artifacts folder under tmp_path."""

    def write(text: str = FAST_RECIPE, name: str = "fast") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(text.replace("{out}", str(tmp_path / "artifacts")))
        return path

    return write


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """One finished build, shared read-only by the tests below (copy it before changing anything)."""
    folder = tmp_path_factory.mktemp("build")
    recipe = folder / "fast.toml"
    recipe.write_text(FAST_RECIPE.replace("{out}", str(folder / "artifacts")))
    result = run("build", recipe)
    assert result.exit_code == 0, result.output
    return recipe, folder / "artifacts" / "fast", result.output


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
