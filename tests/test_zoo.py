"""The reference-model training and evaluation scripts: seeded, writing a folder any build loads (a few
steps here: the full training is not repeated in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from click.testing import CliRunner
from transformers import CLIPTokenizer

from f3export.cli import main
from f3export.models import get_adapter
from f3export.models.pipeline_parts import load_clip_text_encoder
from f3export.recipe import load_recipe
from f3export.tasks.shapes import (DIRECTIONS, HELD_OUT_CAPTIONS, SPEEDS, TRAIN_CAPTIONS, Caption, score,
                                   training_sample)
from f3export.videos import read_video
from f3export.weights import load_state_dict
from zoo.evaluate_shapes import evaluate, sample
from zoo.sources import edit_source, source_path, write_sources
from zoo.text_encoder import write_char_clip
from zoo.train_shapes import TEXT_TOKENS, TEXT_WIDTH, TRAINEES, WORDS, train


@pytest.mark.parametrize("name", TRAINEES)
def test_the_training_script_writes_the_family_folder_with_its_record(tmp_path, name):
    trainee = TRAINEES[name]
    family = trainee.family
    record = train(trainee, tmp_path / "model", steps=2, batch=2, lr=1e-3, seed=0, log_every=1)
    adapter = get_adapter(family)
    bundle = adapter.checkpoint.load_folder(tmp_path / "model")
    config = adapter.checkpoint.folder_config(tmp_path / "model")
    assert {k: config[k] for k in trainee.config} == trainee.config  # the family's own config file, complete
    assert adapter.latent_channels(bundle.model) == 3 and bundle.encode_text is not None  # pixel space, CLIP text
    stored = load_state_dict(adapter.checkpoint.weights_files(tmp_path / "model")[-1])
    assert {t.dtype for t in stored.values()} == {trainee.storage}  # read back as float32 either way
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}
    # the family's sampler, on the training schedule's own noise levels
    assert bundle.scheduler_config["_class_name"] == adapter.scheduler_class.__name__
    assert torch.equal(adapter.scheduler(bundle).scheduler.alphas_cumprod,
                       DDPMScheduler.from_config(trainee.schedule).alphas_cumprod)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "model" / "tokenizer")
    assert tokenizer.tokenize("a red circle moves left slowly") == [  # the grammar's words: one token each
        "a</w>", "red</w>", "circle</w>", "moves</w>", "left</w>", "slowly</w>"]
    assert bundle.encode_text(["a red circle moves left"]).shape == (1, TEXT_TOKENS, TEXT_WIDTH)
    assert len(record["loss_curve"]["mean_loss"]) == 2 and record["arguments"]["seed"] == 0
    assert record["family"] == family
    assert json.loads((tmp_path / "model" / "training.json").read_text()) == record
    assert (tmp_path / "model" / "loss.png").stat().st_size > 0
    again = train(trainee, tmp_path / "again", steps=2, batch=2, lr=1e-3, seed=0, log_every=1)
    assert again["loss_curve"] == record["loss_curve"]  # seeded: the same run twice


def test_the_evaluation_scores_held_out_and_training_captions_apart(tmp_path):
    train(TRAINEES["tune-a-video"], tmp_path / "model", steps=1, batch=1, lr=1e-3, seed=0, log_every=1)
    result = evaluate(tmp_path / "model", "tune-a-video", seeds=[0], steps=2, guidance=3.0, edit=True)
    for scored in (result, result["edit"]):  # from noise, and edits of source clips
        assert scored["held_out"]["captions"] == len(HELD_OUT_CAPTIONS) == 8 and scored["train"]["captions"] == 8
        assert set(scored["held_out"]) >= {"direction_accuracy", "smoothness", "identity", "found"}
    assert (tmp_path / "model" / "samples.png").stat().st_size > 0
    assert (tmp_path / "model" / "samples-edit.png").stat().st_size > 0


def test_prompts_are_padded_to_the_tokenizers_own_length_as_diffusers_pipelines_do(tmp_path):
    write_char_clip(tmp_path / "short", 16, seed=0, max_tokens=8)
    write_char_clip(tmp_path / "clip", 16, seed=0)
    assert load_clip_text_encoder(tmp_path / "short")(["a red circle"]).shape == (1, 8, 16)
    assert load_clip_text_encoder(tmp_path / "clip")(["a red circle"]).shape == (1, 77, 16)  # SD's CLIP length
    config = tmp_path / "short" / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 1000}))
    assert load_clip_text_encoder(tmp_path / "short")(["a red circle"]).shape == (1, 8, 16)  # the encoder's table


def test_word_vectors_carry_the_direction_word_as_loudly_as_the_colour_and_far_above_clips_initialisation(
        tmp_path):
    def change_per_position(folder):
        encode = load_clip_text_encoder(folder)
        red_left, red_right, blue_left = encode(["a red circle moves left", "a red circle moves right",
                                                 "a blue circle moves left"])
        return (red_left - red_right).norm(dim=-1), (red_left - blue_left).norm(dim=-1)

    write_char_clip(tmp_path / "clip", TEXT_WIDTH, 0, WORDS, TEXT_TOKENS)
    write_char_clip(tmp_path / "words", TEXT_WIDTH, 0, WORDS, TEXT_TOKENS, word_vector_scale=10.0)
    direction, colour = change_per_position(tmp_path / "clip")  # CLIP's initialisation: faint
    assert direction[5] < 2 and colour[2] < 4
    direction, colour = change_per_position(tmp_path / "words")  # each position is its own word, 10x louder
    assert direction[:5].max() == 0 and direction[5] > 5 * direction[6:].max()
    assert 0.7 < direction[5] / colour[2] < 1.4 and direction[5] > 50


def test_the_training_side_of_the_evaluation_covers_every_direction_and_speed_twice_over():
    sample = training_sample()
    assert all(caption in TRAIN_CAPTIONS for caption in sample)
    assert sorted((c.direction, c.speed) for c in sample) == sorted((d, v) for d in DIRECTIONS for v in SPEEDS)


ZOO = Path(__file__).parent.parent / "zoo"


def test_the_committed_latte_does_the_task_on_held_out_captions():
    """The reference model proves something only if the original does the task: held-out captions, seed 1000,
    the recipe's sampling (20 DDIM steps, guidance 3.0); measured 0.875 / 0.80 / 1.00 / 1.00."""
    scores = score([video for _, video in sample(ZOO / "latte-shapes", "latte", list(HELD_OUT_CAPTIONS), [1000], 20, 3.0)],
                   list(HELD_OUT_CAPTIONS))
    assert scores.direction_accuracy >= 0.75  # chance: 0.25
    assert scores.smoothness <= 1.2 and scores.identity >= 0.95 and scores.found >= 0.95


def test_the_committed_cogvideox_does_the_task_on_held_out_captions():
    """CogVideoX's joint 3D attention learns the task from noise: held-out captions, seed 1000, the recipe's
    sampling (20 CogVideoX DDIM steps, guidance 3.0); measured 0.875 / 0.89 / 0.92 / 0.92."""
    scores = score([video for _, video in sample(ZOO / "cogvideox-shapes", "cogvideox", list(HELD_OUT_CAPTIONS),
                                                 [1000], 20, 3.0)], list(HELD_OUT_CAPTIONS))
    assert scores.direction_accuracy >= 0.75  # chance: 0.25
    assert scores.smoothness <= 1.2 and scores.identity >= 0.9 and scores.found >= 0.9


def test_the_committed_48_head_cogvideox_does_the_task_on_held_out_captions():
    """The over-parameterised CogVideoX (CogVideoX-2B's layout, 48 heads): held-out captions, seed 1000, the
    recipe's sampling (20 CogVideoX DDIM steps, guidance 3.0); its evaluation.json (seeds 1000 and 1001) reads
    0.75 / 0.63 / 1.00 / 1.00."""
    scores = score([video for _, video in sample(ZOO / "cogvideox-2b-shapes", "cogvideox", list(HELD_OUT_CAPTIONS),
                                                 [1000], 20, 3.0)], list(HELD_OUT_CAPTIONS))
    assert scores.direction_accuracy >= 0.625  # chance: 0.25
    assert scores.smoothness <= 1.2 and scores.identity >= 0.95 and scores.found >= 0.95


def test_the_committed_tune_a_video_does_the_edits_of_held_out_captions():
    """Tune-A-Video's protocol: each held-out caption sampled from the DDIM inversion of a training clip with the
    same motion, another colour and shape (zoo/sources); the recipe's sampling (Tune-A-Video's 50 inversion and
    50 sampling steps, guidance 1.0); measured 0.875 / 0.87 / 1.00 / 1.00 (from noise: 0.19, chance)."""
    scores = score([video for _, video in sample(ZOO / "tav-shapes", "tune-a-video", list(HELD_OUT_CAPTIONS), [1000],
                                                 50, 1.0, edit=True)], list(HELD_OUT_CAPTIONS))
    assert scores.direction_accuracy >= 0.75  # chance: 0.25
    assert scores.smoothness <= 1.2 and scores.identity >= 0.95 and scores.found >= 0.95  # the new colour, steady


def test_the_committed_source_clips_are_the_tasks_own_renders(tmp_path):
    written = write_sources(tmp_path)
    assert len(written) == 15  # 16 captions, two of them edited from the same clip
    for path in written:
        assert torch.equal(read_video(path), read_video(ZOO / "sources" / path.name)), path.name
    recipe = load_recipe("recipes/tav-shapes.toml")
    for section in (recipe.calibration, recipe.validation):
        assert section.source_videos == [str(source_path(edit_source(Caption.parse(p))).relative_to(ZOO.parent))
                                         for p in section.prompts]


@pytest.mark.parametrize("folder, trainee, steps, weights_limit, minutes", [
    ("latte-shapes", "latte", 4500, 3_000_000, 25), ("tav-shapes", "tune-a-video", 1500, 4_000_000, 25),
    ("cogvideox-shapes", "cogvideox", 3000, 3_000_000, 25),
    # 0.6 s a step alone (30 min); trained beside this session's other work on the same 2 cores: 72 min
    ("cogvideox-2b-shapes", "cogvideox-2b", 3000, 4_000_000, 75)])
def test_a_committed_model_is_small_and_carries_its_training_record(folder, trainee, steps, weights_limit, minutes):
    committed = ZOO / folder
    family = TRAINEES[trainee].family
    weights = sum(f.stat().st_size for f in committed.rglob("*.safetensors"))
    assert weights < weights_limit  # network + frozen text encoder (latte: 2.2 MB; tav: 3.7 MB, cogvideox: 2.6 MB and
    # cogvideox-2b: 3.8 MB, stored in float16)
    record = json.loads((committed / "training.json").read_text())
    assert record["family"] == family and record["arguments"] == {"steps": steps, "batch": 8,
                                                                  "lr": TRAINEES[trainee].lr, "seed": 0,
                                                                  "log_every": 50}
    assert record["versions"]["torch"].startswith("2.13.0") and record["wall_seconds"] < minutes * 60
    curve = record["loss_curve"]["mean_loss"]
    assert len(curve) == steps // 50 and curve[-1] < 0.2 * curve[0]
    assert (committed / "loss.png").stat().st_size > 0 and (committed / "samples.png").stat().st_size > 0
    config = get_adapter(family).checkpoint.folder_config(committed)
    assert {k: config[k] for k in TRAINEES[trainee].config} == TRAINEES[trainee].config  # the script's network


def test_the_recipe_on_the_committed_model_chooses_a_ratio_that_keeps_the_task(tmp_path):
    """`f3export build recipes/latte-shapes.toml`: ratio "auto" under the recipe's video-space budget; measured
    here: 6 of 16 heads (ratio 0.375), video PSNR min 23.9 dB, direction accuracy 0.875 as the original's."""
    result = CliRunner().invoke(main, ["build", "recipes/latte-shapes.toml", "--set", f"output.dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "latte-shapes" / "plan.json").read_text())
    chosen = plan["search"]["chosen"]
    assert 4 <= chosen["removed_heads"] <= 8 and not plan["search"]["next"]["passed"]
    assert chosen["fidelity"]["video_psnr_min"] >= 20 and chosen["task"]["direction_accuracy"] >= 0.75
    validation = json.loads((tmp_path / "latte-shapes" / "validation.json").read_text())
    assert validation["passed"]
