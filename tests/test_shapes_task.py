"""The moving-shapes task: clips that show what their caption says, and a task metric that can tell."""

from __future__ import annotations

import pytest
import torch

from f3export.tasks.shapes import (ALL_CAPTIONS, DIRECTIONS, FRAMES, HELD_OUT_CAPTIONS, SPEEDS, TRAIN_CAPTIONS,
                                   Caption, locate, render, score)

CLIPS = [(caption, render(caption, seed)) for seed, caption in enumerate(ALL_CAPTIONS)]


def test_the_split_is_fixed_and_every_held_out_word_is_trained_on():
    assert len(ALL_CAPTIONS) == 64 and len(HELD_OUT_CAPTIONS) == 8 and len(TRAIN_CAPTIONS) == 56
    assert HELD_OUT_CAPTIONS[0].text == "a red circle moves left slowly"
    trained = {word for caption in TRAIN_CAPTIONS for word in caption.text.split()}
    for caption in HELD_OUT_CAPTIONS:
        assert set(caption.text.split()) <= trained


def test_captions_parse_back_and_others_are_refused_by_name():
    assert all(Caption.parse(c.text) == c for c in ALL_CAPTIONS)
    with pytest.raises(ValueError, match="'a red triangle moves left' is not a caption"):
        Caption.parse("a red triangle moves left")


def test_a_clip_is_seeded_rgb_in_range():
    caption = ALL_CAPTIONS[5]
    clip = render(caption, seed=3)
    assert clip.shape == (3, FRAMES, 16, 16) and clip.min() == -1.0 and clip.max() <= 1.0
    assert torch.equal(clip, render(caption, seed=3)) and not torch.equal(clip, render(caption, seed=4))


@pytest.mark.parametrize("caption, clip", CLIPS[::7], ids=[c.text for c, _ in CLIPS[::7]])
def test_the_shape_moves_the_captions_way_at_its_speed_and_keeps_its_size(caption, clip):
    centroid, area = locate(clip, caption.colour)
    assert not centroid.isnan().any()
    step = torch.tensor(DIRECTIONS[caption.direction], dtype=torch.float64) * SPEEDS[caption.speed]
    assert torch.allclose(centroid[1:] - centroid[:-1], step.expand(FRAMES - 1, 2), atol=0.25)
    assert (area.max() - area.min()) / area.mean() < 0.1


def test_the_task_metric_scores_ground_truth_high_and_wrong_motion_at_or_below_chance():
    captions, clips = [c for c, _ in CLIPS], [clip for _, clip in CLIPS]
    truth = score(clips, captions)
    assert truth.direction_accuracy == 1.0 and truth.identity == 1.0 and truth.found == 1.0
    assert truth.smoothness < 0.1
    assert score([clip.flip(1) for clip in clips], captions).direction_accuracy == 0.0  # played backwards
    still = score([clip[:, :1].expand(-1, FRAMES, -1, -1) for clip in clips], captions)
    assert still.direction_accuracy == 0.0 and still.smoothness == 0.0 and still.identity == 1.0
    noise = torch.rand((len(clips), *clips[0].shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert score(list(noise), captions).found == 0.0  # scattered pixels of a colour are no shape


def test_a_shape_of_another_colour_is_not_found():
    caption = Caption("red", "circle", "left")
    blue = render(Caption("blue", "circle", "left"), seed=0)
    assert score([blue], [caption]).found == 0.0


def test_a_shape_that_flickers_loses_identity():
    caption, clip = CLIPS[0]
    flicker = clip.clone()
    flicker[:, 1::2] = -1.0  # the shape vanishes every other frame
    scores = score([flicker], [caption])
    assert scores.found == 0.5 and scores.identity == 0.5
