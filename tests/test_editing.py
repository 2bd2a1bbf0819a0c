"""Tune-A-Video's editing protocol: runs that start from the DDIM inversion of a source video
([calibration]/[validation] ``source_videos``), read from animated image files."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from f3export.models.base import VideoShape
from f3export.models.protocols import DiffusionRun
from f3export.models.tune_a_video import TINY
from f3export.models.tune_a_video.network import TuneAVideoUNet
from f3export.tasks.shapes import TRAIN_CAPTIONS, render
from f3export.videos import read_video, write_gif

from conftest import FAST_RECIPE, TAV, run, write_checkpoint
from test_video_fidelity import pixel_folder

SHAPE = VideoShape(4, 8, 8)


def clip(seed: int = 0, frames: int = 4, size: int = 8) -> torch.Tensor:
    return render(TRAIN_CAPTIONS[seed], seed, frames, size)


class ConstantPrediction(nn.Module):
    """A network whose prediction does not depend on its input: DDIM is then exactly invertible."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return torch.full_like(sample, 0.3)


def test_a_source_video_round_trips_through_gif_at_eight_bits(tmp_path):
    video = render(TRAIN_CAPTIONS[5], 5)
    write_gif(tmp_path / "clip.gif", video)
    eight_bits = ((video + 1) * 127.5).round() / 127.5 - 1
    assert torch.equal(read_video(tmp_path / "clip.gif"), eight_bits)
    assert (tmp_path / "clip.gif").stat().st_size < 2000  # 8 frames of 16x16


def test_sampling_from_a_sources_inversion_gives_the_source_back_when_ddim_is_exactly_invertible(tmp_path):
    """Inversion steps the sampler's own timesteps in reverse, from the same first alpha: with a prediction that
    does not depend on the latents each inversion step is undone exactly by its sampling step."""
    write_gif(tmp_path / "source.gif", clip())
    bundle = TAV.checkpoint.load_folder(pixel_folder(tmp_path / "pixel"))  # SD's schedule, epsilon prediction
    source = read_video(tmp_path / "source.gif")
    steps_seen = []
    edit = TAV.trajectory(bundle, ConstantPrediction(), DiffusionRun("a red circle moves left", 0, 5, 7.5,
                                                                     str(tmp_path / "source.gif")),
                          SHAPE, steps_seen.append)
    assert (edit.latents[0] - source).abs().max() < 1e-5
    assert steps_seen == list(range(10))  # 5 inversion calls, then 5 sampling calls: each counted
    assert edit.timesteps == [1, 201, 401, 601, 801, 801, 601, 401, 201, 1] and len(edit.noise_preds) == 5
    from_noise = TAV.trajectory(bundle, ConstantPrediction(), DiffusionRun("a red circle moves left", 0, 5, 7.5),
                                SHAPE)
    assert (from_noise.latents[0] - source).abs().max() > 0.5


def test_a_latent_model_encodes_its_source_with_the_folders_vae_at_the_vaes_scale(tmp_path):
    folder = tmp_path / "latent"
    torch.manual_seed(0)
    write_checkpoint(folder, TuneAVideoUNet(TINY), "safetensors", TINY.to_dict())
    AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(folder / "vae")
    bundle = TAV.checkpoint.load_folder(folder)
    write_gif(tmp_path / "source.gif", clip(size=16))  # 2x the latent size: the VAE halves it
    latents = TAV.source_latents(bundle, tmp_path / "source.gif", (1, 4, 4, 8, 8))
    assert latents.shape == (1, 4, 4, 8, 8)
    expected = bundle.vae.vae.encode(read_video(tmp_path / "source.gif").transpose(0, 1)).latent_dist.mode()
    assert torch.allclose(latents[0].transpose(0, 1), expected * bundle.vae.vae.config.scaling_factor)
    write_gif(tmp_path / "small.gif", clip(size=8))
    with pytest.raises(Exception, match="small.gif: 4 frames of 8x8, the model runs 4 frames of 16x16"):
        TAV.source_latents(bundle, tmp_path / "small.gif", (1, 4, 4, 8, 8))


def edit_recipe(model: str, sources: list[str], seeds: str = "[0]") -> str:
    """The fast recipe with ``model`` (its [model] source line) calibrated on edits of ``sources``."""
    listed = ", ".join(f'"{s}"' for s in sources)
    return FAST_RECIPE.replace('preset = "tiny"', model).replace(
        'prompts = ["a man is skiing"]\nseeds = [0]', f'prompts = ["a man is skiing"]\nseeds = {seeds}\n'
                                                     f'source_videos = [{listed}]')


def test_a_build_calibrates_and_validates_on_edits_and_shows_the_source(write_recipe, tmp_path):
    folder = pixel_folder(tmp_path / "pixel")
    write_gif(tmp_path / "source.gif", clip())
    recipe = edit_recipe(f'path = "{folder}"', [str(tmp_path / "source.gif")]).replace(
        'prompts = ["a dog is running"]', f'prompts = ["a dog is running", "a cat is running"]\n'
                                          f'source_videos = ["{tmp_path / "source.gif"}"]')
    result = run("build", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    root = tmp_path / "artifacts" / "fast"
    scores = json.loads((root / "scores.json").read_text())
    assert scores["timesteps"] == [1, 334, 667, 667, 334, 1]  # inversion, then sampling
    assert all(len(per_step) == 6 for m in scores["modules"].values() for per_step in m["per_step"].values())
    validation = json.loads((root / "validation.json").read_text())
    runs = validation["metrics"]["pruning"]["per_run"]
    assert [(r["prompt"], r["source"]) for r in runs] == [("a dog is running", str(tmp_path / "source.gif")),
                                                          ("a cat is running", str(tmp_path / "source.gif"))]
    strips = Image.open(root / "samples.png")
    assert strips.height > 3 * 2 * 8 * 4  # per run: source, original and pruned strips


@pytest.mark.parametrize("case, message", [
    ("two sources, one prompt", "[calibration].source_videos: 2 videos for 1 prompts"),
    ("two seeds", "[calibration].seeds = [0, 1]: runs from source_videos draw no noise"),
    ("wrong length", "[calibration].source_videos[0] = '{long}': 8 frames, the recipe's clips have 4"),
    ("not a video", "{bad}: not a video file Pillow can read"),
    ("missing", "[calibration].source_videos[0] = '{missing}': file not found"),
])
def test_source_videos_that_cannot_make_runs_are_refused_before_anything_runs(write_recipe, tmp_path, case,
                                                                              message):
    gif, long, bad, missing = (tmp_path / name for name in ("clip.gif", "long.gif", "notes.gif", "missing.gif"))
    write_gif(gif, clip())
    write_gif(long, clip(frames=8))
    bad.write_text("not an image")
    sources = {"two sources, one prompt": [gif, gif], "two seeds": [gif], "wrong length": [long],
               "not a video": [bad], "missing": [missing]}[case]
    seeds = "[0, 1]" if case == "two seeds" else "[0]"
    result = run("build", write_recipe(edit_recipe('preset = "tiny"', [str(s) for s in sources], seeds)))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message.format(long=long, bad=bad, missing=missing) in result.output
    assert not (tmp_path / "artifacts").exists()
