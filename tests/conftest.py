"""Shared fixtures: the tiny Tune-A-Video model, helpers to write recipes and model folders, rebuild checks."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from f3export.calibrate import ModuleScores, Scores
from f3export.cli import main

from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.stages import STAGE_NAMES, STAGES as STAGE_DECLARATIONS
from f3export.models.tune_a_video import TINY
from zoo.text_encoder import write_char_clip

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs in 2 processes (pyproject addopts): one thread each, in this process and in the processes its
    # tests start, as two processes of 2 threads on 2 cores oversubscribe them (OpenMP's threads wait spinning).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

TAV = get_adapter("tune-a-video")
SMALL_SHAPE = VideoShape(frames=4, latent_height=8, latent_width=8)

# The longest modules (CI's durations, 2 cores), started first: pytest-xdist hands whole modules (--dist loadfile)
# to whichever process is free, in collection order, so the last module to start should be a short one; in the
# alphabetical order the longest of all, test_zoo, started last and left the other process idle for minutes.
LONGEST_MODULES = ("test_zoo.py", "test_hostile_generate.py", "test_cache_keys.py", "test_hostile_torchrun.py")


def pytest_collection_modifyitems(config, items):
    first = {name: rank for rank, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # a stable sort: the rest keep their order


@pytest.fixture(scope="session")
def tiny_bundle():
    return TAV.checkpoint.load_preset("tiny", seed=0)


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


# Tiny CogVideo over token files ``{base}/calibration.npy`` and ``{base}/validation.npy``.
COGVIDEO_TOKENS_RECIPE = """
[model]
family = "cogvideo"
preset = "tiny"
frames = 5
latent_height = 8
latent_width = 8

[calibration]
tokens = "{base}/calibration.npy"

[export]
dynamic_axes = ["batch"]

[validation]
tokens = "{base}/validation.npy"
export_samples = 1
pruning_min_logit_cosine = 0.5
pruning_min_top1_agreement = 0.2

[output]
dir = "{base}/artifacts"
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


@pytest.fixture
def rebuildable(built, tmp_path):
    """A private copy of the shared build and its recipe, free to rebuild with changes."""
    recipe, root, _ = built
    shutil.copytree(root, tmp_path / "artifacts" / "fast")
    path = tmp_path / "fast.toml"
    path.write_text(recipe.read_text().replace(str(root.parent), str(tmp_path / "artifacts")))
    return path, tmp_path / "artifacts" / "fast"


def scores_for(model, criterion="contribution", seed=0, adapter=TAV) -> Scores:
    """Distinct pseudo-random scores for every temporal head (a plan without running calibration)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for site in adapter.structure.temporal_sites(model):
        heads = site.heads_of(model)
        values = torch.rand(heads.heads, generator=generator).tolist()
        modules[site.attention] = ModuleScores(heads.heads, heads.head_dim, {criterion: values})
    return Scores(modules, timesteps=[], samples=0)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- model folders on disk -----------------------------------------------------------------------------
def write_checkpoint(folder, model, weights_format: str, config: dict):
    unet = folder / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(config))
    state = model.state_dict()
    if weights_format == "bin":
        torch.save(state, unet / "diffusion_pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, unet / "diffusion_pytorch_model.safetensors")


# The config a Tune-A-Video training run writes (diffusers 0.11 field names and bookkeeping keys).
ORIGINAL_STYLE_CONFIG = {
    "_class_name": "UNet3DConditionModel", "_diffusers_version": "0.11.1", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": TINY.block_out_channels, "center_input_sample": False,
    "cross_attention_dim": TINY.cross_attention_dim, "down_block_types": TINY.down_block_types,
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": TINY.norm_num_groups, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "sample_size": 16, "up_block_types": TINY.up_block_types, "upcast_attention": False,
    "use_linear_projection": False,
}


def write_clip(folder, width: int) -> None:
    write_char_clip(folder, width)


# -- rebuilds: which stages reran --------------------------------------------------------------------
STAGES = STAGE_NAMES  # the build's own declarations (f3export/stages.py), not a restatement of them


# What each stage reads: a stage whose own inputs are unchanged is reused even when an upstream stage
# reran (content-addressed keys: a rerun that reproduces the same bytes stops the cascade).
CONSUMES = {stage.name: list(stage.upstream) for stage in STAGE_DECLARATIONS}


def rebuild(path, root, *args) -> tuple[dict, dict]:
    before = json.loads((root / "manifest.json").read_text())["stages"]
    result = run("build", path, *args)
    assert result.exit_code == 0, result.output
    return before, json.loads((root / "manifest.json").read_text())["stages"]


def assert_reruns_exactly(before: dict, after: dict, changed: dict[str, bool]) -> None:
    """``changed[s]``: whether stage s's own settings or libraries changed."""
    for stage in STAGES:
        inputs_changed = any(after[u]["files"] != before[u]["files"] for u in CONSUMES.get(stage, []))
        reran = after[stage]["key"] != before[stage]["key"]
        assert reran == (changed.get(stage, False) or inputs_changed), stage


@pytest.fixture(scope="module", params=["cogvideox", "wan"])
def joint_family(request):
    """A tiny joint-attention transformer (CogVideoX, Wan) with weights large enough that every head matters."""
    from f3export.models import get_adapter

    adapter = get_adapter(request.param)
    bundle = adapter.checkpoint.load_preset("tiny", seed=0)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(parameter.numel()))
    return adapter, bundle


def joint_inputs(adapter, model, frames, seed=1):
    """A joint transformer's inputs at ``frames`` latent frames of 8x8, CFG batch 2."""
    from f3export.models.base import VideoShape

    return adapter.example_inputs(model, VideoShape(frames, 8, 8), batch=2, seed=seed)
