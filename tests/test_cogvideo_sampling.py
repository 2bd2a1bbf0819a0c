"""CogVideo as it samples: the KV-cache step graph against the full forward, its engines, and generate --token-ids."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from f3export.export import export_onnx
from f3export.models import get_adapter
from f3export.models.base import ExportSpec, VideoShape
from f3export.models.cogvideo_stage1.incremental import (CogVideoStep, cache_heads, cache_names, step_axes,
                                                         step_inputs)
from f3export.models.cogvideo_stage1.network import TRAINING, SamplingTerms, TemporalChannelHeads
from f3export.prune import load_pruned
from f3export.token_sampling import Layout, Sampler, Session, generate_tokens

from conftest import relative_l2, run
from test_deploy import NO_TORCH, REPO
from test_distributed import cogvideo_recipe

COGVIDEO = get_adapter("cogvideo")
PIPELINE = SamplingTerms(1.4, 1.4, False)  # the pipeline's frame-0 session: text weight 1.4, temporal channel off
TEXT_SLOTS, FRAME = 8, 64


@pytest.fixture(scope="module")
def model():
    return COGVIDEO.checkpoint.load_preset("tiny", seed=0).model.eval()


@pytest.fixture(scope="module")
def pruned(model):
    """Layer 0 keeps temporal heads 0 and 2, layer 1 loses all four, layer 2 keeps all."""
    pruned = copy.deepcopy(model)
    TemporalChannelHeads(pruned.transformer.layers[0].temporal).keep([0, 2])
    layer = pruned.transformer.layers[1]
    layer.temporal = TemporalChannelHeads(layer.temporal).removed()
    return pruned


@pytest.fixture(scope="module")
def sequence(model):
    """Two rows of 2 frames: seeded texts of 6 and 5 tokens (left-padded), BOI-led frame blocks."""
    spec = COGVIDEO.export_spec(model, VideoShape(2, 8, 8), batch=2, dynamic=["batch"], seed=3)
    return spec.inputs["tokens"], spec.inputs["text_len"]


def stepped(model, tokens, text_len, terms, prefill: int):
    """Logits of every position from ``prefill`` on, one step each, after a prefill of the first ``prefill``."""
    step, rows = CogVideoStep(model), []
    with torch.no_grad():
        _, past = step.run(tokens[:, :prefill], text_len, terms)
        for p in range(prefill, tokens.shape[1]):
            logits, past = step.run(tokens[:, p:p + 1], text_len, terms, past)
            rows.append(logits)
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("variant", ["original", "pruned"])
@pytest.mark.parametrize("terms", [TRAINING, PIPELINE, SamplingTerms(1.4, 1.4, True), SamplingTerms(0.7, 0.2, False)],
                         ids=["training", "pipeline-frame-0", "pipeline-later-frames", "unequal-weights"])
def test_step_engine_driven_token_by_token_equals_the_full_forward_at_every_position(model, pruned, sequence,
                                                                                   variant, terms):
    net = model if variant == "original" else pruned
    tokens, text_len = sequence
    with torch.no_grad():
        full = net.logits(tokens, text_len, terms)  # [2, 128, 256]: row j is position 8 + j
    by_step = stepped(net, tokens, text_len, terms, prefill=TEXT_SLOTS)
    worst = max(relative_l2(by_step[:, j], full[:, j]) for j in range(full.shape[1]))
    assert worst <= 1e-5
    assert torch.equal(by_step.argmax(-1), full.argmax(-1))
    # a prefill that reaches into frame 1 (the later frames' session: frame 0 given) gives the same rows
    assert relative_l2(stepped(net, tokens, text_len, terms, prefill=TEXT_SLOTS + FRAME + 5),
                       full[:, FRAME + 5:]) <= 1e-5


def test_frame_0_without_the_temporal_channel_ignores_it_and_later_frames_do_not(model, sequence):
    tokens, text_len = sequence
    silenced = copy.deepcopy(model)
    for layer in silenced.transformer.layers:
        torch.nn.init.normal_(layer.temporal.query_key_value.weight)  # a different temporal channel
    with torch.no_grad():
        before, after = (m.logits(tokens, text_len, PIPELINE) for m in (model, silenced))
        training = model.logits(tokens, text_len, SamplingTerms(1.4, 1.4, True))
    assert torch.equal(before[:, :FRAME], after[:, :FRAME])
    assert relative_l2(after[:, FRAME:], before[:, FRAME:]) > 0.05
    assert relative_l2(training[:, :FRAME], before[:, :FRAME]) > 0.05  # the temporal channel mattered there


def test_the_text_weight_moves_attention_onto_the_text(model, sequence):
    """log_text_attention_weights = w multiplies every text key's unnormalised weight by e^w: the logits move."""
    tokens, text_len = sequence
    with torch.no_grad():
        plain, weighted = (model.logits(tokens, text_len, SamplingTerms(w, w, True)) for w in (0.0, 1.4))
    assert relative_l2(weighted, plain) > 0.05


def test_a_pruned_step_graph_caches_only_kept_temporal_heads(model, pruned):
    assert cache_heads(model) == [(4, 4), (4, 4), (4, 4)]
    assert cache_heads(pruned) == [(4, 2), (4, 0), (4, 4)]
    assert cache_names(pruned, "past") == ["past_spatial_0", "past_temporal_0", "past_spatial_1", "past_spatial_2",
                                           "past_temporal_2"]


def test_the_onnx_step_engine_equals_pytorch_for_a_prefill_steps_and_a_frame_boundary(pruned, sequence, tmp_path):
    tokens, text_len = sequence
    example = step_inputs(pruned, tokens, text_len, TEXT_SLOTS + FRAME + 3, 2, PIPELINE)
    export_onnx(CogVideoStep(pruned), ExportSpec(example, ["logits", *cache_names(pruned, "present")],
                                                 step_axes(pruned)), tmp_path / "step.onnx", 17, "never")
    session = onnxruntime.InferenceSession(str(tmp_path / "step.onnx"))
    for known, new in ((0, TEXT_SLOTS + 1), (TEXT_SLOTS + 10, 1), (TEXT_SLOTS + FRAME - 1, 2)):
        feed = step_inputs(pruned, tokens, text_len, known, new, SamplingTerms(1.4, 1.4, known > TEXT_SLOTS))
        with torch.no_grad():
            expected = CogVideoStep(pruned)(*feed.values())
        actual = session.run(None, {k: v.numpy() for k, v in feed.items()})
        assert actual[1].shape == (2, 2, 4, known + new, 16) and actual[2].shape[2] == 2  # spatial 0, temporal 0
        assert max(relative_l2(torch.from_numpy(a), e) for a, e in zip(actual, expected)) <= 1e-4


def torch_step(net):
    """``CogVideoStep`` as a ``token_sampling.StepFunction`` (NumPy in and out)."""
    step = CogVideoStep(net)

    def call(tokens, text_len, weights, frame0_temporal, past):
        terms = SamplingTerms(float(weights[0]), float(weights[1]), frame0_temporal)
        with torch.no_grad():
            logits, present = step.run(torch.from_numpy(tokens), torch.from_numpy(text_len), terms,
                                       None if past is None else [torch.from_numpy(p) for p in past])
        return logits.numpy(), [p.numpy() for p in present]

    return call


LAYOUT = Layout(text_slots=8, frame_len=64, boi_token_id=310, image_vocab_size=256, max_frames=5, vocab_size=320)
SESSIONS = [Session(0, 1, "first_frame", (1.4, 0.0), (1.4, 1.4), False), Session(1, 5, "video", (0.0, 0.0),
                                                                               (0.0, 0.0), True)]


def test_guidance_at_alpha_1_is_the_text_alone_and_at_0_the_guide_alone(model):
    texts = {"first_frame": [270, 271], "video": [280, 281, 282], "guide": [290]}
    sample = lambda: Sampler(top_k=1)
    alone = generate_tokens(torch_step(model), LAYOUT, SESSIONS, texts, 2, sample(), 259)
    alpha_1 = generate_tokens(torch_step(model), LAYOUT, SESSIONS, texts, 2, sample(), 259, guidance=1.0)
    assert np.array_equal(alpha_1.tokens, alone.tokens)
    guide_only = generate_tokens(torch_step(model), LAYOUT, SESSIONS, {**texts, "video": texts["guide"]}, 2,
                                 sample(), 259)
    alpha_0 = generate_tokens(torch_step(model), LAYOUT, SESSIONS, texts, 2, sample(), 259, guidance=0.0)
    assert np.array_equal(alpha_0.tokens, guide_only.tokens)
    assert not np.array_equal(alpha_0.tokens[1], alone.tokens[1])  # the texts do lead to different frames
    assert np.array_equal(alpha_0.tokens[0], alone.tokens[0])  # frame 0's session has no guide


def test_top_k_sampling_draws_only_among_the_k_best_and_repeats_with_its_seed():
    logits = np.random.default_rng(0).normal(size=(1, 50))
    best = set(np.argsort(-logits[0])[:3])
    draws = [int(Sampler(top_k=3, temperature=1.0, seed=s)(logits)[0]) for s in range(40)]
    assert set(draws) == best
    assert draws == [int(Sampler(top_k=3, temperature=1.0, seed=s)(logits)[0]) for s in range(40)]
    assert int(Sampler(top_k=1)(logits)[0]) == int(logits.argmax())


@pytest.fixture(scope="module")
def cogvideo_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cogvideo-sampling")
    assert run("build", cogvideo_recipe(folder, runs=1)).exit_code == 0
    return folder / "artifacts" / "cogvideo"


def generate_tokens_without_torch(root, out, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, "generate", str(root), "--out", str(out), *options],
                          capture_output=True, text=True, cwd=REPO)


def test_generate_samples_the_pruned_models_greedy_tokens_from_engines_alone(cogvideo_build, tmp_path):
    """The step engines in the build, driven by the contract's sessions without torch, choose the tokens the
    pruned PyTorch model chooses; --compare prices pruned against original, with the ideal."""
    out = tmp_path / "tokens.npy"
    done = generate_tokens_without_torch(cogvideo_build, out, "--token-ids", "270,271,272", "--first-frame-ids",
                                         "275 276", "--greedy", "--frames", "2", "--compare")
    assert done.returncode == 0, done.stderr
    tokens = np.load(out)
    assert tokens.shape == (2, 64) and tokens.dtype == np.int64 and tokens.max() < 256
    contract = json.loads((cogvideo_build / "manifest.json").read_text())["contract"]
    sessions = [Session(s["first"], s["stop"], s["text"], tuple(s["prefill_weights"]), tuple(s["step_weights"]),
                        s["frame0_temporal"]) for s in contract["conventions"]["step_engine"]["sessions"]]
    assert sessions == [Session(0, 1, "first_frame", (1.4, 0.0), (1.4, 1.4), False),
                        Session(1, 5, "video", (1.4, 0.0), (1.4, 1.4), True)]
    pruned = load_pruned(cogvideo_build / "pruned")[2]
    expected = generate_tokens(torch_step(pruned), LAYOUT, sessions, {"video": [270, 271, 272],
                                                                      "first_frame": [275, 276]},
                               2, Sampler(top_k=1), 259)
    assert np.array_equal(tokens, expected.tokens)
    assert "step.original" in done.stdout and "step.pruned" in done.stdout
    assert "pruned vs original:" in done.stdout and "ideal from counted FLOPs" in done.stdout


@pytest.mark.parametrize("options, error", [
    (["--token-ids", "270,9999"], "--token-ids: 9999 is not a text token id [256, 320)"),
    (["--token-ids", ",".join(["270"] * 9)], "--token-ids: 9 text tokens; this model takes 1 to 8"),
    (["--token-ids", "270", "--guide-ids", "12"], "--guide-ids: 12 is not a text token id [256, 320)"),
    (["--token-ids", "270", "--frames", "6"], "--frames 6: the model's layout holds at most 5 frames"),
    (["--greedy", "--prompt", "x"], "--greedy goes with --token-ids"),
])
def test_bad_token_requests_are_one_line_errors_before_any_work(cogvideo_build, tmp_path, options, error):
    out = tmp_path / "tokens.npy"
    result = run("generate", cogvideo_build, "--out", out, *options)
    assert result.exit_code == 2 and result.output.strip() == f"error: {error}"
    assert not out.exists()


def test_a_prompt_on_a_token_build_is_refused_saying_it_samples_image_tokens(cogvideo_build, tmp_path):
    result = run("generate", cogvideo_build, "--prompt", "x", "--out", tmp_path / "clip.gif")
    assert result.exit_code == 2
    assert result.output.startswith("error: generate samples text-to-video diffusion models, and this 'cogvideo' "
                                    "build is not one")
    assert result.output.rstrip().endswith("; it samples image tokens: give --token-ids")


def test_the_runtime_serves_a_step_engine_repeating_only_batch_inputs(cogvideo_build):
    """A text length given once is every row's; the [2] text weights and the [1] flag are not batch axes."""
    from f3export.errors import ShapeError
    from f3export.runtime import EngineRunner

    step = EngineRunner(cogvideo_build, "step.pruned")
    pasts = {t.name: np.zeros((2, 2, t.shape[2], 0, t.shape[4]), np.float32) for t in step.inputs
             if t.name.startswith("past_")}
    tokens = np.array([[259] * 5 + [270, 271, 272], [259] * 5 + [270, 271, 272]])
    out = step(tokens=tokens, text_len=3, text_weights=[1.4, 0.0], frame0_temporal=[False], **pasts)
    assert out["logits"].shape == (2, 8, 256) and out["present_spatial_0"].shape == (2, 2, 4, 8, 16)
    assert np.array_equal(out["logits"][0], out["logits"][1])
    with pytest.raises(ShapeError, match=r"input 'text_weights' has shape \[\]; the engine takes 1 axes \[2\]"):
        step(tokens=tokens, text_len=3, text_weights=1.4, frame0_temporal=[False], **pasts)
