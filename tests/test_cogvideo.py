"""CogVideo stage 1: the dual-channel transformer, its SAT checkpoints, and the pruning pipeline on it."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from f3export.export import export_onnx
from f3export.models import get_adapter
from f3export.models.base import Run, VideoShape
from f3export.models.cogvideo import (SAT_WEIGHTS, TemporalChannelHeads, save_sat, spatial_mask, temporal_mask)
from f3export.prune import apply_plan, make_plan, mask_heads, parameter_count
from f3export.recipe import PruningSection

from conftest import run
from test_prune import scores_for

COGVIDEO = get_adapter("cogvideo")
SHAPE = VideoShape(frames=5, latent_height=8, latent_width=8)


@pytest.fixture(scope="module")
def model():
    return COGVIDEO.load_preset("tiny", seed=0).model


@pytest.fixture(scope="module")
def tokens(model):
    return COGVIDEO.export_spec(model, SHAPE, batch=2, dynamic=["batch"], seed=3).inputs["tokens"]


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


def test_logits_predict_each_image_token_from_its_prefix_only(model, tokens):
    text_len, length = model.config.text_len, tokens.shape[1]
    changed = tokens.clone()
    position = text_len + 100  # a token of frame 1
    changed[:, position] = (changed[:, position] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (2, length - text_len, 320)
    prediction_of = lambda i: i - text_len  # logits row predicting token i
    assert torch.equal(before[:, :prediction_of(position) + 1], after[:, :prediction_of(position) + 1])
    assert not torch.allclose(before[:, prediction_of(position) + 1:], after[:, prediction_of(position) + 1:])


def test_frames_mix_the_channels_by_attn_distribution(model, tokens):
    """Text tokens never read the temporal channel; with sigmoid(a) -> 1 the frames ignore it too."""
    layer = copy.deepcopy(model.transformer.layers[0])
    x = torch.randn(1, tokens.shape[1], 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer(x)
        layer.temporal.dense.weight.mul_(3.0)
        changed = layer(x)
        assert torch.equal(base[:, :8], changed[:, :8]) and not torch.allclose(base[:, 8:], changed[:, 8:])
        layer.temporal.attn_distribution.fill_(100.0)  # sigmoid = 1: spatial only
        spatial_only = layer(x)
        layer.temporal.dense.weight.mul_(5.0)
        assert torch.allclose(spatial_only, layer(x), atol=1e-6)


def test_contribution_is_each_heads_weighted_output_over_the_residual_norm(model):
    channel = model.transformer.layers[1].temporal
    hidden = torch.randn(2, 328, 64, generator=torch.Generator().manual_seed(1))
    residual_norm = torch.rand(2, 328) + 0.5
    contribution, mixing, tokens = TemporalChannelHeads(channel).statistics(hidden, residual_norm)
    assert tokens == 2 * 320
    with torch.no_grad():
        constant = channel.dense.bias * (1 - channel.spatial_weight())
        for head in range(4):
            alone = copy.deepcopy(channel)
            TemporalChannelHeads(alone).mask([h for h in range(4) if h != head])
            expected = ((alone(hidden) - constant).norm(dim=-1) / residual_norm[:, 8:]).sum()
            assert contribution[head].item() == pytest.approx(expected.item(), rel=1e-4)
    assert all(0.0 < m < tokens for m in mixing.tolist())


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_pruned_equals_masked_and_onnx_shrinks_by_the_removed_parameters(model, tokens, tmp_path, ratio):
    plan = make_plan(scores_for(model, adapter=COGVIDEO), PruningSection(ratio=ratio))
    assert plan.removed_heads == round(12 * ratio)
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(pruned, COGVIDEO.temporal_sites(pruned), plan)
    mask_heads(masked, COGVIDEO.temporal_sites(masked), plan)
    with torch.no_grad():
        assert torch.allclose(pruned(tokens), masked(tokens), atol=1e-5, rtol=1e-5)
        assert torch.equal(pruned(tokens), model(tokens)) == (ratio == 0)
    # Per removed head: its q, k, v rows (weights and biases) and its dense columns.
    removed_heads = sum(len(h) for h in plan.removed.values())
    assert parameter_count(model) - parameter_count(pruned) == removed_heads * (4 * 64 * 16 + 3 * 16)
    spec = COGVIDEO.export_spec(model, SHAPE, batch=2, dynamic=["batch"], seed=3)
    before = export_onnx(model, spec, tmp_path / "original.onnx", 17, "auto")
    after = export_onnx(pruned, spec, tmp_path / "pruned.onnx", 17, "auto")
    # ONNX folds sigmoid(a) and 1 - sigmoid(a) into two constants; a removed channel folds its
    # (1 - sigmoid(a)) * bias into one, so each removed channel drops one more hidden-wide vector than in torch.
    channels_removed = sum(1 for n in plan.head_counts().values() if n == 0)
    assert before.parameters - after.parameters == (parameter_count(model) - parameter_count(pruned)
                                                      + 64 * channels_removed)


def test_sat_checkpoint_round_trip(model, tokens, tmp_path):
    save_sat(model, tmp_path / "cogvideo-stage1", iteration=3)
    folder = tmp_path / "cogvideo-stage1"
    assert (folder / "latest").read_text() == "3"
    state = torch.load(folder / "3" / SAT_WEIGHTS, weights_only=True)["module"]
    assert {"transformer.layers.0.attention.query_key_value.weight", "mixins.attention_plus.query_key_value.0.weight",
            "mixins.attention_plus.dense.2.bias", "mixins.attention_plus.attn_distribution.1",
            "mixins.extra_position_embedding.position_embeddings.weight"} <= set(state)
    assert state["mixins.attention_plus.query_key_value.0.weight"].shape == (192, 64)
    assert not any(".temporal." in key for key in state)
    bundle = COGVIDEO.load_folder(folder)
    with torch.no_grad():
        assert torch.equal(bundle.model(tokens), model(tokens))


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
        full = COGVIDEO.build(COGVIDEO.presets["full"])
    sites = COGVIDEO.temporal_sites(full)
    plan = make_plan(scores_for(full, adapter=COGVIDEO), PruningSection(ratio=1.0))
    assert plan.removed_heads == 48 * 48
    before = parameter_count(full)
    apply_plan(full, sites, plan)
    c, vocab = 3072, 150010
    spatial = (3 * c * c + 3 * c) + (c * c + c)
    temporal = (3 * c * c + 3 * c) + (c * c + c) + c  # query_key_value, dense, attn_distribution
    mlp = (4 * c * c + 4 * c) + (4 * c * c + c)
    layer = 4 * 2 * c + spatial + temporal + mlp  # 4 sandwich LayerNorms
    assert before == vocab * c + (912 + 2000) * c + 48 * layer + 2 * c == 7_720_783_872
    # Each removed channel keeps dense.bias and attn_distribution (the constant (1 - sigmoid(a)) * bias).
    assert before - parameter_count(full) == 48 * (temporal - 2 * c) == 1_812_381_696  # 23.5 % of the model


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


def test_cogvideo_recipe_builds_checks_and_uses_real_tokens(tmp_path):
    layout = np.concatenate([np.full((2, 8), 300), np.random.default_rng(0).integers(0, 256, (2, 320))], axis=1)
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
    pruning = json.loads((root / "validation.json").read_text())["metrics"]["pruning"]
    assert [r["prompt"] for r in pruning["per_run"]] == ["validation.npy[0]"]
    assert len(pruning["per_run"][0]["logit_cosine"]) == 5  # one per frame
    assert run("check", root).exit_code == 0
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


def test_token_files_of_the_wrong_layout_are_refused(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((1, 100), dtype=np.int64))
    result = run("build", _recipe(tmp_path, 'preset = "tiny"', f'[calibration]\ntokens = "{tmp_path / "short.npy"}"'))
    assert result.exit_code == 2 and "short.npy[0]: 100 tokens, but the recipe's shape (5 frames) needs 328" \
        in result.output


def test_token_models_do_not_take_diffusion_keys_and_diffusion_models_no_tokens(tmp_path, write_recipe):
    np.save(tmp_path / "t.npy", np.zeros((1, 4), dtype=np.int64))
    from conftest import FAST_RECIPE
    path = write_recipe(FAST_RECIPE.replace("steps = 3\n", f'steps = 3\ntokens = "{tmp_path / "t.npy"}"\n', 1))
    result = run("build", path)
    assert result.exit_code == 2 and "[calibration].tokens does not apply to tune-a-video models" in result.output


def test_calibration_runs_are_one_forward_each(model):
    trajectory = COGVIDEO.trajectory(None, model, Run("a cat", 0), SHAPE, steps=1, guidance_scale=0.0)
    assert len(trajectory.outputs) == 5 and trajectory.final.shape == (1, 320, 320)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, c = x.shape
    return x.reshape(b, s, heads, c // heads).permute(0, 2, 1, 3)


def _merged(context: torch.Tensor) -> torch.Tensor:
    b, h, s, d = context.shape
    return context.permute(0, 2, 1, 3).reshape(b, s, h * d)


def sat_spatial_reference(attention, hidden, text_len, frame_len, frames):
    """CogVideo's attention_localframe_and_text, block by block as SAT computes it."""
    heads, (b, s, c) = attention.heads, hidden.shape
    q0, k0, v0 = (_heads(x, heads) for x in attention.query_key_value(hidden).chunk(3, dim=-1))
    d = q0.shape[-1]
    to_text = torch.ones(b, 1, 1, text_len)
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


def sat_temporal_reference(channel, hidden, text_len):
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
    probs = torch.softmax(torch.cat([scores, to_text], dim=-1), dim=-1)
    context = torch.matmul(probs[..., :s1], v) + torch.matmul(probs[..., s1:], v_text)
    return channel.dense(_merged(context))


def test_both_channels_compute_what_swissarmytransformer_computes(model):
    layer = model.transformer.layers[1]
    hidden = torch.randn(2, 328, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        text, frames = sat_spatial_reference(layer.attention, hidden, text_len=8, frame_len=64, frames=5)
        assert torch.allclose(layer.attention(hidden), torch.cat([text, frames], dim=1), atol=1e-5)
        temporal = sat_temporal_reference(layer.temporal, hidden, text_len=8)
        weight = torch.sigmoid(layer.temporal.attn_distribution)
        assert torch.allclose(layer.temporal(hidden), temporal * (1 - weight), atol=1e-5)
