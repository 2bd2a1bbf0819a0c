"""Pruning fidelity in video space: frames from pixel-space models or a folder's VAE, PSNR/SSIM per frame,
gates that only apply where there are frames, and a task metric over both models' videos."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from f3export.models.base import VideoShape, video_fidelity
from f3export.models.protocols import DiffusionRun
from f3export.models.tune_a_video import TINY
from f3export.models.tune_a_video.network import TuneAVideoUNet
from f3export.tasks.shapes import HELD_OUT_CAPTIONS

from conftest import FAST_RECIPE, TAV, run, write_checkpoint, write_clip

PIXEL = dataclasses.replace(TINY, in_channels=3, out_channels=3)


def pixel_folder(folder):
    torch.manual_seed(0)
    write_checkpoint(folder, TuneAVideoUNet(PIXEL), "safetensors", PIXEL.to_dict())
    write_clip(folder, PIXEL.cross_attention_dim)
    return folder


def test_video_psnr_and_ssim_are_per_frame_over_the_signal_range():
    video = torch.rand((3, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = video_fidelity(video, video)
    assert same["video_psnr"] == [math.inf] * 4 and same["video_ssim"] == pytest.approx([1.0] * 4)
    shifted = video.clone()
    shifted[:, 2] += 0.1  # frame 2 only: mse 0.01 over a range of 2 -> 10 log10(4 / 0.01) dB
    metrics = video_fidelity(shifted, video)
    assert metrics["video_psnr"][2] == pytest.approx(10 * math.log10(400.0))
    assert metrics["video_psnr"][0] == math.inf and metrics["video_ssim"][2] < 1.0


def test_a_pixel_space_model_samples_frames_and_a_vae_decodes_latents(tmp_path):
    run_ = DiffusionRun(prompt="a red circle moves left", seed=0, steps=2, guidance_scale=7.5)
    bundle = TAV.checkpoint.load_folder(pixel_folder(tmp_path / "pixel"))
    pixels = TAV.trajectory(bundle, bundle.model, run_, VideoShape(4, 8, 8))
    assert pixels.latents.shape == (1, 3, 4, 8, 8) and torch.equal(pixels.video, pixels.latents[0].clamp(-1, 1))

    latent = tmp_path / "latent"
    write_checkpoint(latent, TuneAVideoUNet(TINY), "safetensors", TINY.to_dict())
    AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(latent / "vae")
    bundle = TAV.checkpoint.load_folder(latent)
    decoded = TAV.trajectory(bundle, bundle.model, run_, VideoShape(4, 8, 8))
    assert decoded.video.shape == (3, 4, 16, 16) and decoded.video.abs().max() <= 1.0
    assert "vae" in {f.parent.name for f in TAV.checkpoint.sampling_files(latent)}  # keyed like the scheduler


def test_validation_reports_video_fidelity_and_the_task_metric_of_both_models(tmp_path, write_recipe):
    folder = pixel_folder(tmp_path / "pixel")
    prompts = [c.text for c in HELD_OUT_CAPTIONS[:2]]
    recipe = FAST_RECIPE.replace('preset = "tiny"', f'path = "{folder}"').replace(
        'prompts = ["a dog is running"]', f"prompts = {json.dumps(prompts)}\ntask = \"moving-shapes\"\n"
                                          "pruning_min_video_psnr = 0.0\npruning_min_video_ssim = -1.0")
    result = run("build", write_recipe(recipe))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "artifacts" / "fast" / "validation.json").read_text())
    pruning = report["metrics"]["pruning"]
    assert len(pruning["per_run"][0]["video_psnr"]) == 4  # one per frame
    assert pruning["video_ssim_min"] <= pruning["video_ssim_mean"] <= 1.0
    assert set(pruning["task"]) == {"original", "pruned"}
    assert set(pruning["task"]["original"]) == {"direction_accuracy", "smoothness", "identity", "found"}
    assert pruning["task_chance"] == {"direction_accuracy": 0.25}
    gated = {g["metric"] for g in report["gates"]}
    assert {"pruning.video_psnr_min", "pruning.video_ssim_min"} <= gated
    # Something to look at: a strip of frames per model per held-out run, and a page that shows it.
    root = tmp_path / "artifacts" / "fast"
    with Image.open(root / "samples.png") as picture:
        assert picture.size == (90 + 4 * (8 * 4 + 2), 2 * (12 + 2 * (8 * 4 + 2) + 4))
    page = (root / "report.md").read_text()
    assert "| pruning.video_psnr_min |" in page and "## Task metric" in page and "![original vs pruned](samples.png)" \
        in page
    # random weights do not do the task: the page says the task metric cannot show pruning's cost
    assert pruning["task"]["original"]["direction_accuracy"] <= 0.25
    assert "**The original scores direction_accuracy" in page and "no better than chance (0.25)" in page


def test_a_video_gate_on_a_model_without_frames_is_a_clear_error(write_recipe):
    recipe = FAST_RECIPE.replace("pruning_min_latent_psnr = 5.0", "pruning_min_latent_psnr = 5.0\n"
                                                                  "pruning_min_video_psnr = 20.0")
    result = run("build", write_recipe(recipe))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "[validation].pruning_min_video_psnr = 20.0: this model produces no video_psnr" in result.output


def test_a_task_needs_captions_of_its_grammar(write_recipe, tmp_path):
    folder = pixel_folder(tmp_path / "pixel")
    recipe = FAST_RECIPE.replace('preset = "tiny"', f'path = "{folder}"').replace(
        'prompts = ["a dog is running"]', 'prompts = ["a dog is running"]\ntask = "moving-shapes"')
    result = run("build", write_recipe(recipe))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'a dog is running' is not a caption of the moving-shapes grammar" in result.output
