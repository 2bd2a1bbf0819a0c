"""CogVideo stage 1: the dual-channel transformer, its SAT checkpoints, and the pruning pipeline on it."""

from __future__ import annotations

import copy
import json
import math
import random
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from f3export.errors import CheckpointError
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.models.cogvideo_stage1.checkpoint import SAT_WEIGHTS, ours_to_sat, save_sat
from f3export.models.cogvideo_stage1.network import (TemporalChannelHeads, key_mask, position_ids, spatial_mask,
                                                     temporal_mask)
from f3export.models.protocols import FramesForward, PromptRun
from f3export.prune import apply_plan, load_pruned, make_plan, parameter_count
from f3export.recipe import PruningSection
from f3export.runtime import EngineRunner
from f3export.weights import load_state_dict

from conftest import relative_l2, run, scores_for

COGVIDEO = get_adapter("cogvideo")
SHAPE = VideoShape(frames=5, latent_height=8, latent_width=8)


@pytest.fixture(scope="module")
def model():
    return COGVIDEO.checkpoint.load_preset("tiny", seed=0).model


@pytest.fixture(scope="module")
def inputs(model):
    """tokens [2, 328] and text_len [2]: seeded texts of 6 and 5 tokens (2 and 3 pads), BOI-led frame blocks."""
    spec = COGVIDEO.export_spec(model, SHAPE, batch=2, dynamic=["batch"], seed=3)
    assert spec.inputs["text_len"].tolist() == [6, 5]
    return spec.inputs


def no_pads(length: int, batch: int = 1) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.bool)


def test_masks_follow_cogvideo_stage_1():
    # 2 text tokens, frames of 2 tokens, 3 frames.
    spatial = spatial_mask(2, 2, 8).int().tolist()
    assert spatial == [
        [1, 1, 0, 0, 0, 0, 0, 0],  # text sees the text only
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # frame tokens: text + own frame, causally
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 0, 1, 1],
    ]
    temporal = temporal_mask(2, 8).int().tolist()  # frame queries only: text + every frame token up to itself
    assert temporal == [[1, 1] + [1] * (i + 1) + [0] * (5 - i) for i in range(6)]


def test_row_j_predicts_image_token_j_from_its_prefix_only(model, inputs):
    """Position 8 + 100 holds image token 99 (frame 1's block: BOI at 8 + 64, then its tokens 64, 65, ...)."""
    tokens = inputs["tokens"]
    text_len, length = model.config.text_len, tokens.shape[1]
    changed = tokens.clone()
    changed[:, text_len + 100] = (changed[:, text_len + 100] + 1) % 256
    with torch.no_grad():
        before, after = model(**inputs), model(changed, inputs["text_len"])
    assert before.shape == (2, length - text_len, 256)  # every image token, over the image vocabulary
    assert torch.equal(before[:, :100], after[:, :100])  # rows 0..99 predict tokens 0..99 without reading token 99
    assert not torch.allclose(before[:, 100:], after[:, 100:])


def test_frames_mix_the_channels_by_attn_distribution(model):
    """Text tokens never read the temporal channel; with sigmoid(a) -> 1 the frames ignore it too."""
    layer = copy.deepcopy(model.transformer.layers[0])
    x = torch.randn(1, 328, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer(x, no_pads(328))
        layer.temporal.dense.weight.mul_(3.0)
        changed = layer(x, no_pads(328))
        assert torch.equal(base[:, :8], changed[:, :8]) and not torch.allclose(base[:, 8:], changed[:, 8:])
        layer.temporal.attn_distribution.fill_(100.0)  # sigmoid = 1: spatial only
        spatial_only = layer(x, no_pads(328))
        layer.temporal.dense.weight.mul_(5.0)
        assert torch.allclose(spatial_only, layer(x, no_pads(328)), atol=1e-6)


def test_contribution_is_each_heads_weighted_output_over_the_residual_norm_from_frame_1_on(model):
    """Frame 0 (rows 8..71) is left out: stage 1 does not train it and generates it with the channel off."""
    channel = model.transformer.layers[1].temporal
    hidden = torch.randn(2, 328, 64, generator=torch.Generator().manual_seed(1))
    residual_norm = torch.rand(2, 328) + 0.5
    keys = key_mask(8, torch.tensor([8, 3]), 328)
    sums, tokens, _ = TemporalChannelHeads(channel).statistics(hidden, residual_norm, keys)
    contribution, mixing = sums["contribution"], sums["mixing"]
    assert tokens == 2 * 4 * 64
    with torch.no_grad():
        constant = channel.dense.bias * (1 - channel.spatial_weight())
        for head in range(4):
            alone = copy.deepcopy(channel)
            TemporalChannelHeads(alone).mask([h for h in range(4) if h != head])
            ratio = (alone(hidden, keys) - constant).norm(dim=-1) / residual_norm[:, 8:]  # every frame token
            assert contribution[head].item() == pytest.approx(ratio[:, 64:].sum().item(), rel=1e-4)
            assert contribution[head].item() != pytest.approx(ratio.sum().item(), rel=1e-2)
        # Mixing: attention mass of frame-1+ queries on other frames' keys, recomputed here from q and k.
        q, k, _ = channel.query_key_value(hidden).reshape(2, 328, 3, 4, 16).permute(2, 0, 3, 1, 4)
        scores = (q[:, :, 72:] @ k.transpose(-1, -2)) / 4.0
        allowed = (torch.arange(328)[None, :] <= torch.arange(72, 328)[:, None])[None, None] & keys[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~allowed, -10000.0), dim=-1)
        frame_of = lambda position: (position - 8) // 64
        other = (torch.arange(328) >= 8)[None, :] & (frame_of(torch.arange(328))[None, :]
                                                     != frame_of(torch.arange(72, 328))[:, None])
        expected_mixing = (probs * other).sum(dim=-1).sum(dim=(0, 2))
    assert mixing.tolist() == pytest.approx(expected_mixing.tolist(), rel=1e-4)


def test_sat_checkpoint_round_trip(model, inputs, tmp_path):
    save_sat(model, tmp_path / "cogvideo-stage1", iteration=3)
    folder = tmp_path / "cogvideo-stage1"
    assert (folder / "latest").read_text() == "3"
    state = torch.load(folder / "3" / SAT_WEIGHTS, weights_only=True)["module"]
    assert {"transformer.layers.0.attention.query_key_value.weight", "mixins.attention_plus.query_key_value.0.weight",
            "mixins.attention_plus.dense.2.bias", "mixins.attention_plus.attn_distribution.1",
            "mixins.extra_position_embedding.position_embeddings.weight"} <= set(state)
    assert state["mixins.attention_plus.query_key_value.0.weight"].shape == (192, 64)
    assert state["transformer.word_embeddings.weight"].shape == (320, 64)  # SAT's one table, image rows first
    assert not any(".temporal." in key for key in state)
    bundle = COGVIDEO.checkpoint.load_folder(folder)
    with torch.no_grad():
        assert torch.equal(bundle.model(**inputs), model(**inputs))


def test_sat_folder_problems_are_one_line_errors(model, tmp_path):
    folder = tmp_path / "ckpt"
    save_sat(model, folder)
    (folder / "latest").write_text("7")
    result = run("inspect", _recipe(tmp_path, f'path = "{folder}"'))
    assert result.exit_code == 2 and "names iteration '7'" in result.output and "Traceback" not in result.output
    (folder / "latest").write_text("1")
    torch.save({"weights": {}}, folder / "1" / SAT_WEIGHTS)
    result = run("inspect", _recipe(tmp_path, f'path = "{folder}"'))
    assert result.exit_code == 2 and "no 'module' entry" in result.output
    config = json.loads((folder / "model_config.json").read_text())
    (folder / "model_config.json").write_text(json.dumps({**config, "window_size": 10, "cogvideo_stage": 2}))
    result = run("inspect", _recipe(tmp_path, f'path = "{folder}"'))
    assert result.exit_code == 2 and "stage 2's 3D window attention is not" in result.output


def test_full_preset_loses_the_temporal_channels_share_at_ratio_one():
    """The real sizes, on the meta device (no memory): 48 layers x 3072 wide, 48 heads."""
    with torch.device("meta"):
        full = COGVIDEO.checkpoint.build(COGVIDEO.checkpoint.presets["full"])
    sites = COGVIDEO.structure.temporal_sites(full)
    plan = make_plan(scores_for(full, adapter=COGVIDEO), PruningSection(ratio=1.0))
    assert plan.removed_heads == 48 * 48
    before = parameter_count(full)
    apply_plan(full, sites, plan.kept_heads)
    c, vocab = 3072, 150010
    spatial = (3 * c * c + 3 * c) + (c * c + c)
    temporal = (3 * c * c + 3 * c) + (c * c + c) + c  # query_key_value, dense, attn_distribution
    mlp = (4 * c * c + 4 * c) + (4 * c * c + c)
    layer = 4 * 2 * c + spatial + temporal + mlp  # 4 sandwich LayerNorms
    assert before == vocab * c + (912 + 2000) * c + 48 * layer + 2 * c == 7_720_783_872
    # Each removed channel keeps dense.bias and attn_distribution (the constant (1 - sigmoid(a)) * bias).
    assert before - parameter_count(full) == 48 * (temporal - 2 * c) == 1_812_381_696  # 23.5 % of the model


def test_full_layout_gives_frames_x_400_rows_over_the_image_vocabulary():
    """The real sizes and layout on the meta device (shapes only; 3 of the 48 layers): 64 text slots + 5 x 400."""
    with torch.device("meta"):
        full = COGVIDEO.checkpoint.build(COGVIDEO.checkpoint.presets["full-3-layers"])
        tokens, text_len = torch.zeros(2, 2064, dtype=torch.long), torch.tensor([64, 20])
        logits = full(tokens, text_len)
    assert tuple(logits.shape) == (2, 5 * 400, 20_000)  # 320 MB of fp32, where all 150,010 columns took 2.4 GB


def _recipe(tmp_path, model_line: str, extra: str = "") -> str:
    path = tmp_path / "cogvideo.toml"
    path.write_text(f"""
[model]
family = "cogvideo"
{model_line}
frames = 5
latent_height = 8
latent_width = 8

[export]
dynamic_axes = ["batch"]

[output]
dir = "{tmp_path / 'artifacts'}"
{extra}""")
    return path


def token_rows(text_lengths: list[int], seed: int = 0) -> np.ndarray:
    """Rows in CogVideo's layout for the tiny preset: <pad> (259) x (8 - L), L text ids, 5 x [BOI (310), 63 images]."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in text_lengths:
        blocks = np.concatenate([np.full((5, 1), 310), rng.integers(0, 256, (5, 63))], axis=1)
        rows.append(np.concatenate([np.full(8 - length, 259), rng.integers(260, 310, length), blocks.ravel()]))
    return np.stack(rows)


def test_cogvideo_recipe_builds_checks_and_uses_real_tokens(tmp_path):
    layout = token_rows([5, 8])
    np.save(tmp_path / "calibration.npy", layout[:1])
    np.save(tmp_path / "validation.npy", layout[1:])
    recipe = _recipe(tmp_path, 'preset = "tiny"', f"""
[calibration]
tokens = "{tmp_path / 'calibration.npy'}"

[validation]
tokens = "{tmp_path / 'validation.npy'}"
export_samples = 1
pruning_min_logit_cosine = 0.5
pruning_min_top1_agreement = 0.2
""")
    result = run("build", recipe)
    assert result.exit_code == 0, result.output
    root = tmp_path / "artifacts" / "cogvideo"
    scores = json.loads((root / "scores.json").read_text())
    assert scores["samples"] == 1 and len(scores["modules"]) == 3
    assert scores["note"] == ("temporal statistics over the tokens of frames 1 on: CogVideo's stage 1 masks frame 0 "
                              "out of its loss and generates it with the temporal channel off")
    pruning = json.loads((root / "validation.json").read_text())["metrics"]["pruning"]
    assert [r["tokens"] for r in pruning["per_run"]] == ["validation.npy[0]"]
    assert len(pruning["per_run"][0]["logit_cosine"]) == 4  # one per frame from frame 1
    assert run("check", root).exit_code == 0
    # The runtime serves a token model from its engine contract (inputs by name, a text length for the batch),
    # at the batch the build validated (2: the export's)
    row = torch.from_numpy(layout[1:]).repeat(2, 1)
    logits = EngineRunner(root)(tokens=row, text_len=8)
    with torch.no_grad():
        expected = load_pruned(root / "pruned")[2](row, torch.tensor([8, 8]))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 320, 256)
    assert relative_l2(logits, expected) < 1e-4
    result = run("bench", root, "--runs", "2", "--warmup", "1", "--ratios", "0,1")
    assert result.exit_code == 0, result.output
    bench = json.loads((root / "bench.json").read_text())
    assert bench["steps"] == 1  # one full-sequence forward per run
    assert bench["ideal_speedup"] > 1 and 0 < bench["temporal_flops_share"] < 1
    assert [r["removed_heads"] for r in bench["ratios"]] == [0, 12]


@pytest.mark.parametrize("extra, message", [
    ("[calibration]\nsteps = 20", "[calibration].steps does not apply to cogvideo models"),
    ("[validation]\npruning_min_latent_psnr = 30.0", "[validation].pruning_min_latent_psnr does not apply"),
    ("[calibration]\ntokens = \"missing.npy\"", "[calibration].tokens = 'missing.npy': file not found"),
])
def test_keys_of_other_families_are_refused(tmp_path, extra, message):
    result = run("build", _recipe(tmp_path, 'preset = "tiny"', extra))
    assert result.exit_code == 2 and message in result.output, result.output


def _row_with(position: int, token: int) -> np.ndarray:
    row = token_rows([5])
    row[0, position] = token
    return row


@pytest.mark.parametrize("rows, message", [
    (np.zeros((1, 100), dtype=np.int64), "rows.npy[0]: 100 tokens, but the recipe's shape (5 frames) needs 328"),
    (_row_with(8 + 2 * 64, 17), "rows.npy[0]: position 136 (frame 2's first) holds 17, not <start_of_image> (310), "
                                "which begins every frame"),
    (_row_with(5, 259), "rows.npy[0]: <pad> (259) at position 5, after the text began: CogVideo's text is left-padded"),
    (_row_with(8 + 64 + 1, 300), "rows.npy[0]: position 73 holds 300, not an image token (< 256)"),
])
def test_token_files_of_the_wrong_layout_are_refused(tmp_path, rows, message):
    np.save(tmp_path / "rows.npy", rows)
    result = run("build", _recipe(tmp_path, 'preset = "tiny"', f'[calibration]\ntokens = "{tmp_path / "rows.npy"}"'))
    assert result.exit_code == 2 and f"error: {message}\n" in result.output, result.output


def test_token_models_do_not_take_diffusion_keys_and_diffusion_models_no_tokens(tmp_path, write_recipe):
    np.save(tmp_path / "t.npy", np.zeros((1, 4), dtype=np.int64))
    from conftest import FAST_RECIPE
    path = write_recipe(FAST_RECIPE.replace("steps = 3\n", f'steps = 3\ntokens = "{tmp_path / "t.npy"}"\n', 1))
    result = run("build", path)
    assert result.exit_code == 2 and "[calibration].tokens does not apply to tune-a-video models" in result.output


def test_calibration_runs_are_one_forward_each(model):
    trajectory = COGVIDEO.trajectory(None, model, PromptRun("a cat", 0), SHAPE)
    assert trajectory.timesteps == [0] and [f.shape for f in trajectory.frame_logits] == [(1, 64, 256)] * 5


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, c = x.shape
    return x.reshape(b, s, heads, c // heads).permute(0, 2, 1, 3)


def _merged(context: torch.Tensor) -> torch.Tensor:
    b, h, s, d = context.shape
    return context.permute(0, 2, 1, 3).reshape(b, s, h * d)


def sat_spatial_reference(attention, hidden, text_len, frame_len, frames, totxt):
    """CogVideo's attention_localframe_and_text, block by block as SAT computes it (``totxt``: [B, text] 0/1, SAT's
    attention_mask_totxt)."""
    heads, b = attention.heads, hidden.shape[0]
    q0, k0, v0 = (_heads(x, heads) for x in attention.query_key_value(hidden).chunk(3, dim=-1))
    d = q0.shape[-1]
    to_text = totxt[:, None, None, :]
    local = torch.ones(1, 1, frames, frame_len, frame_len).tril()
    any2text = torch.matmul(q0 / math.sqrt(d), k0[..., :text_len, :].transpose(-1, -2))
    text2text = any2text[..., :text_len, :] * to_text - 10000.0 * (1.0 - to_text)
    frame2text = any2text[..., text_len:, :] * to_text - 10000.0 * (1.0 - to_text)
    q_frames, k_frames, v_frames = (x[:, :, text_len:].reshape(b, heads, frames, frame_len, d) for x in (q0, k0, v0))
    frame_local = torch.matmul(q_frames / math.sqrt(d), k_frames.transpose(-1, -2)) * local - 10000.0 * (1.0 - local)
    probs = torch.softmax(torch.cat([frame2text, frame_local.view(b, heads, frames * frame_len, frame_len)], -1), -1)
    frame_context = (torch.matmul(probs[..., :text_len], v0[..., :text_len, :])
                     + torch.matmul(probs[..., text_len:].view(b, heads, frames, frame_len, frame_len), v_frames)
                     .view(b, heads, frames * frame_len, d))
    text_context = torch.matmul(torch.softmax(text2text, -1), v0[..., :text_len, :])
    return attention.dense(_merged(text_context)), attention.dense(_merged(frame_context))


def sat_temporal_reference(channel, hidden, text_len, totxt):
    """CogVideo's FullAttentionMixin.attention_extra with text, pb-relax (alpha 16) included."""
    alpha, heads = 16.0, channel.heads
    frames_in, text_in = hidden[:, text_len:], hidden[:, :text_len]
    q, k, v = (_heads(x, heads) for x in channel.query_key_value(frames_in).chunk(3, dim=-1))
    _, k_text, v_text = (_heads(x, heads) for x in channel.query_key_value(text_in).chunk(3, dim=-1))
    d, s1 = q.shape[-1], q.shape[2]
    causal = torch.ones(1, 1, s1, s1).tril()
    scores = torch.matmul(q / (math.sqrt(d) * alpha), k.transpose(-1, -2)) * causal - 10000.0 * (1.0 - causal)
    relax = scores.reshape(scores.shape[0], heads, -1).max(dim=-1, keepdim=True)[0].unsqueeze(-1)
    scores = (scores - relax) * alpha
    to_text = (torch.matmul(q / (math.sqrt(d) * alpha), k_text.transpose(-1, -2)) - relax) * alpha
    to_text = to_text * totxt[:, None, None, :] - 10000.0 * (1.0 - totxt[:, None, None, :])
    probs = torch.softmax(torch.cat([scores, to_text], dim=-1), dim=-1)
    context = torch.matmul(probs[..., :s1], v) + torch.matmul(probs[..., s1:], v_text)
    return channel.dense(_merged(context))


@pytest.mark.parametrize("text_len", [[8, 8], [3, 6]])
def test_both_channels_compute_what_swissarmytransformer_computes(model, text_len):
    """Padding as SAT's get_batch makes it: attention_mask_totxt is 0 for the n_pads = 8 - L leading slots."""
    layer = model.transformer.layers[1]
    hidden = torch.randn(2, 328, 64, generator=torch.Generator().manual_seed(4))
    totxt = torch.tensor([[0.0] * (8 - n) + [1.0] * n for n in text_len])
    keys = key_mask(8, torch.tensor(text_len), 328)
    with torch.no_grad():
        text, frames = sat_spatial_reference(layer.attention, hidden, 8, 64, 5, totxt)
        assert torch.allclose(layer.attention(hidden, keys), torch.cat([text, frames], dim=1), atol=1e-5)
        temporal = sat_temporal_reference(layer.temporal, hidden, 8, totxt)
        weight = torch.sigmoid(layer.temporal.attn_distribution)
        assert torch.allclose(layer.temporal(hidden, keys), temporal * (1 - weight), atol=1e-5)


# -- the input convention, pinned against SAT's own formulas -------------------------------------------


def sat_position_ids(layout: list[int], totxt: torch.Tensor, offset: int) -> torch.Tensor:
    """pretrain_cogvideo.get_masks_and_position_ids_video, with the frames' first id as a parameter (512 there)."""
    n_pads = layout[0] - totxt.sum(dim=-1).long()
    ids = torch.zeros(len(totxt), layout[2], dtype=torch.long)
    for i in range(len(totxt)):
        torch.arange(layout[0] - n_pads[i], out=ids[i, n_pads[i]:layout[0]])
        torch.arange(offset, offset + layout[2] - layout[0], out=ids[i, layout[0]:])
    return ids


def test_position_ids_and_pad_mask_of_a_left_padded_text_are_sats(model):
    """Pads take position id 0 and are masked as keys; the real text counts 0..L-1; frames start at the offset."""
    text_len = torch.tensor([8, 5, 1, 0])
    totxt = torch.tensor([[0.0] * (8 - n) + [1.0] * n for n in text_len.tolist()])  # SAT's attention_mask_totxt
    ids = position_ids(model.config, text_len, 328)
    assert torch.equal(ids, sat_position_ids([8, 72, 328], totxt, offset=16))
    assert ids[1, :8].tolist() == [0, 0, 0, 0, 1, 2, 3, 4] and ids[1, 8:11].tolist() == [16, 17, 18]
    keys = key_mask(8, text_len, 328)
    assert torch.equal(keys[:, :8], totxt.bool()) and keys[:, 8:].all()


def test_left_padded_text_gives_what_sampling_without_pads_gives(model):
    """cogvideo_pipeline samples with the unpadded text (text_len = its length, positions 0..L-1): a model whose
    layout has 5 text slots, same weights, must give what 3 pads + 5 text tokens give in the 8-slot layout."""
    tokens = torch.from_numpy(token_rows([5])).clone()
    unpadded = COGVIDEO.checkpoint.build({**COGVIDEO.checkpoint.presets["tiny"], "layout": [5, 69, 325]}).eval()
    unpadded.load_state_dict(model.state_dict())
    with torch.no_grad():
        padded = model(tokens, torch.tensor([5]))
        tokens[0, :3] = torch.tensor([300, 7, 310])  # what the pad slots hold does not matter
        assert torch.equal(model(tokens, torch.tensor([5])), padded)
        assert torch.allclose(padded, unpadded(tokens[:, 3:], torch.tensor([5])), atol=1e-5)
        assert not torch.allclose(padded, model(tokens, torch.tensor([8])), atol=1e-2)  # pads as text differ


def test_row_j_is_the_full_vocabulary_forward_at_text_len_plus_j_sliced_to_the_image_vocabulary(model, inputs):
    """Training reads logits[:, text_len:, :num_image_tokens] of SAT's full-vocabulary output; recomputed by hand
    from the last layer's hidden states and SAT's one vocabulary table."""
    captured = {}
    handle = model.transformer.layers[-1].register_forward_hook(lambda m, a, out: captured.update(hidden=out))
    with torch.no_grad():
        logits = model(**inputs)
    handle.remove()
    final = model.transformer.final_layernorm
    table = torch.cat([model.transformer.word_embeddings.image, model.transformer.word_embeddings.text])  # [320, 64]
    full_vocabulary = F.layer_norm(captured["hidden"], (64,), final.weight, final.bias, 1e-5) @ table.t()
    assert full_vocabulary.shape == (2, 328, 320)
    for j in (0, 1, 63, 64, 200, 319):  # frame starts (BOI rows), inside frames, the last image token
        assert torch.allclose(logits[:, j], full_vocabulary[:, 8 + j, :256], atol=1e-5)


def test_pruning_fidelity_reads_frames_1_on():
    """Frame 0 differs between the two runs: not measured; frame 2 differs: measured."""
    reference = torch.randn(1, 320, 256, generator=torch.Generator().manual_seed(0))
    frame_0_changed, frame_2_changed = reference.clone(), reference.clone()
    frame_0_changed[:, :64] = torch.randn(1, 64, 256)
    frame_2_changed[:, 128:192] = -frame_2_changed[:, 128:192]
    trajectory = lambda logits: FramesForward([0], list(logits.split(64, dim=1)))
    unchanged = COGVIDEO.fidelity(trajectory(reference), trajectory(frame_0_changed))
    assert unchanged["logit_cosine"] == pytest.approx([1.0] * 4, abs=1e-12) and unchanged["top1_agreement"] == 1.0
    metrics = COGVIDEO.fidelity(trajectory(reference), trajectory(frame_2_changed))
    assert metrics["logit_cosine"] == pytest.approx([1.0, -1.0, 1.0, 1.0], abs=1e-12)
    assert metrics["top1_agreement"] == 0.75


# -- checkpoints as SwissArmyTransformer writes them ----------------------------------------------------


class _Call:
    """Pickles as a call of print; the tests rewrite that global into another."""

    def __reduce__(self):
        return (print, ("hello",))


def _rewrite_pickle(path, old: bytes, new: bytes) -> None:
    """Replace bytes in the pickle of a torch zip checkpoint (GLOBAL opcodes are text: b'cmodule\\nname\\n')."""
    with zipfile.ZipFile(path) as source:
        entries = [(item, source.read(item.filename)) for item in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for item, data in entries:
            if item.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            target.writestr(item, data)


def _sat_training_state(model) -> dict:
    """What SAT 0.2's save_ds_checkpoint (through DeepSpeed) stores beside the weights."""
    folder_state = {ours_to_sat(k): v for k, v in model.state_dict().items()}
    folder_state["transformer.word_embeddings.weight"] = torch.cat(
        [folder_state.pop("transformer.word_embeddings.image"), folder_state.pop("transformer.word_embeddings.text")])
    return {"module": folder_state, "iteration": 3000, "global_steps": 3000, "skipped_steps": 0,
            "client_lr_scheduler": {"start_lr": 2e-4, "warmup_iter": 100, "num_iters": 3000, "decay_style": "cosine",
                                    "decay_ratio": 0.1},
            "random_rng_state": random.Random(0).getstate(), "np_rng_state": np.random.RandomState(0).get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "param_shapes": [OrderedDict((k, v.shape) for k, v in folder_state.items())],
            "ds_config": {"train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": True}}, "ds_version": "0.6.0"}


@pytest.mark.parametrize("numpy_pickle", ["numpy._core", "numpy.core"])  # as numpy 2 and numpy 1 (2022) write it
def test_sat_checkpoint_with_training_metadata_loads_its_module_only(model, inputs, tmp_path, numpy_pickle):
    folder = tmp_path / "sat"
    save_sat(model, folder, iteration=3000)
    weights = folder / "3000" / SAT_WEIGHTS
    torch.save(_sat_training_state(model), weights)
    if numpy_pickle == "numpy.core":
        _rewrite_pickle(weights, b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    loaded = COGVIDEO.checkpoint.load_folder(folder).model
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))


def test_sat_checkpoint_that_runs_code_is_refused_naming_the_global(model, tmp_path):
    folder = tmp_path / "sat"
    save_sat(model, folder, iteration=3000)
    weights = folder / "3000" / SAT_WEIGHTS
    torch.save({**_sat_training_state(model), "hook": _Call()}, weights)
    _rewrite_pickle(weights, b"c__builtin__\nprint\n", b"cos\nsystem\n")
    with pytest.raises(CheckpointError) as refused:
        COGVIDEO.checkpoint.load_folder(folder)
    assert str(refused.value) == (f"{weights}: refused to unpickle the global 'os.system' (a weights-only load takes "
                                  "tensors, plain containers and numpy arrays, never code)")
    result = run("inspect", _recipe(tmp_path, f'path = "{folder}"'))
    assert result.exit_code == 2 and result.output == f"error: {refused.value}\n"


def test_refusals_of_other_pickles_name_the_global_without_terminal_codes(tmp_path):
    """torch's message bolds text with ANSI codes and spans many lines; ours is one plain line."""
    path = tmp_path / "weights.bin"
    torch.save({"w": torch.zeros(1), "rng": np.random.RandomState(0).get_state()}, path)
    with pytest.raises(CheckpointError) as refused:
        load_state_dict(path)
    assert str(refused.value) == (f"{path}: refused to unpickle the global 'numpy._core.multiarray._reconstruct' "
                                  "(a weights-only load takes tensors and plain containers, never code)")
    assert "\x1b" not in str(refused.value) and "\n" not in str(refused.value)
