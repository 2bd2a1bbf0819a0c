"""The reference-model training and evaluation scripts: seeded, writing a folder any build loads (a few
steps here: the full training is not repeated in CI)."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPTokenizer

from f3export.models import get_adapter
from f3export.tasks.shapes import HELD_OUT_CAPTIONS
from zoo.evaluate_shapes import evaluate
from zoo.train_shapes import TRAINEES, train


@pytest.mark.parametrize("family", TRAINEES)
def test_the_training_script_writes_the_family_folder_with_its_record(tmp_path, family):
    trainee = TRAINEES[family]
    record = train(trainee, tmp_path / "model", steps=2, batch=2, lr=1e-3, seed=0, log_every=1)
    adapter = get_adapter(family)
    bundle = adapter.checkpoint.load_folder(tmp_path / "model")
    config = adapter.checkpoint.folder_config(tmp_path / "model")
    assert {k: config[k] for k in trainee.config} == trainee.config  # the family's own config file, complete
    assert adapter.latent_channels(bundle.model) == 3 and bundle.encode_text is not None  # pixel space, CLIP text
    assert bundle.scheduler_config["_class_name"] == "DDIMScheduler"
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "model" / "tokenizer")
    assert tokenizer.tokenize("a red circle moves left slowly") == [  # the grammar's words: one token each
        "a</w>", "red</w>", "circle</w>", "moves</w>", "left</w>", "slowly</w>"]
    assert len(record["loss_curve"]["mean_loss"]) == 2 and record["arguments"]["seed"] == 0
    assert record["family"] == family
    assert json.loads((tmp_path / "model" / "training.json").read_text()) == record
    assert (tmp_path / "model" / "loss.png").stat().st_size > 0
    again = train(trainee, tmp_path / "again", steps=2, batch=2, lr=1e-3, seed=0, log_every=1)
    assert again["loss_curve"] == record["loss_curve"]  # seeded: the same run twice


def test_the_evaluation_scores_held_out_and_training_captions_apart(tmp_path):
    train(TRAINEES["tune-a-video"], tmp_path / "model", steps=1, batch=1, lr=1e-3, seed=0, log_every=1)
    result = evaluate(tmp_path / "model", "tune-a-video", seeds=[0], steps=2, guidance=3.0)
    assert result["held_out"]["captions"] == len(HELD_OUT_CAPTIONS) == 8 and result["train"]["captions"] == 8
    assert set(result["held_out"]) >= {"direction_accuracy", "smoothness", "identity", "found"}
    assert (tmp_path / "model" / "samples.png").stat().st_size > 0
