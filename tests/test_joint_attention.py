"""F3 for joint 3D attention (CogVideoX, Wan): frame-local and removed heads, exact and exportable.

The family contract (test_family_contract) covers the default action (frame-local) at ratios 0, 0.5, 1 and the
on-disk round trip; here: faithfulness to diffusers' own processors, the remove action, other frame counts,
ONNX with dynamic frames, the memory shape of frame-local attention, and what the temporal criteria measure.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime
import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode

from f3export.calibrate import calibrate
from f3export.export import export_onnx
from f3export.flops import count_flops, joint_attention_pairs
from f3export.models import get_adapter
from f3export.models.base import VideoShape
from f3export.prune import apply_plan, make_plan, mask_heads, parameter_count
from f3export.recipe import PruningSection, family_sections

from conftest import joint_inputs as inputs, relative_l2, run, scores_for

DIFFUSERS_PROCESSORS = {"cogvideox": CogVideoXAttnProcessor2_0, "wan": WanAttnProcessor}


@pytest.fixture(scope="module")
def family(joint_family):
    return joint_family


def pruned_and_reference(adapter, model, ratio, action, window=1):
    plan = make_plan(scores_for(model, adapter=adapter), PruningSection(ratio=ratio, action=action, window=window))
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(pruned, adapter.structure.temporal_sites(pruned), plan.kept_heads, plan.local_heads, plan.window)
    mask_heads(reference, adapter.structure.temporal_sites(reference), plan.kept_heads, plan.local_heads,
               plan.window)
    return plan, pruned, reference


def test_the_original_model_computes_exactly_what_diffusers_own_attention_processors_compute(family):
    adapter, bundle = family
    theirs = copy.deepcopy(bundle.model)
    for site in adapter.structure.temporal_sites(theirs):
        theirs.get_submodule(site.attention).set_processor(DIFFUSERS_PROCESSORS[adapter.family]())
    with torch.no_grad():
        for frames in (3, 5):
            x = inputs(adapter, bundle.model, frames)
            assert torch.allclose(bundle.model(**x), theirs(**x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("action", ["frame-local", "remove"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_pruned_equals_the_original_with_those_heads_masked_at_every_frame_count(family, action, ratio):
    adapter, bundle = family
    plan, pruned, reference = pruned_and_reference(adapter, bundle.model, ratio, action)
    assert plan.removed_heads == round(ratio * plan.total_heads)
    with torch.no_grad():
        for frames in (2, 3, 5):
            x = inputs(adapter, bundle.model, frames)
            out, expected, original = pruned(**x), reference(**x), bundle.model(**x)
            assert relative_l2(out, expected) < 1e-5, frames
            assert (relative_l2(out, original) > 1e-3) == (ratio > 0), frames  # the heads did matter


@pytest.mark.parametrize("window", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_windowed_heads_equal_the_original_with_scores_beyond_the_window_masked(family, window, ratio):
    """A temporal-window head reads its own frame and ``window`` frames on each side: exactly the original with
    the scores of keys |f_q - f_k| > w at -inf, at every frame count (fewer frames than the window's span too);
    window 0 is frame-local, and a window as wide as the clip changes nothing."""
    adapter, bundle = family
    plan, pruned, reference = pruned_and_reference(adapter, bundle.model, ratio, "temporal-window", window)
    assert (plan.action, plan.window, plan.removed_heads) == ("temporal-window", window, round(ratio * 8))
    with torch.no_grad():
        for frames in (2, 3, 5):
            x = inputs(adapter, bundle.model, frames)
            out, expected, original = pruned(**x), reference(**x), bundle.model(**x)
            assert relative_l2(out, expected) < 1e-5, frames
            changed = ratio > 0 and frames - 1 > window
            assert (relative_l2(out, original) > 1e-3) == changed, frames
    if window == 0 and ratio:
        _, local, _ = pruned_and_reference(adapter, bundle.model, ratio, "frame-local")
        x = inputs(adapter, bundle.model, 5)
        with torch.no_grad():
            assert relative_l2(pruned(**x), local(**x)) < 1e-6


def test_a_wider_window_stays_closer_to_the_original(family):
    adapter, bundle = family
    x = inputs(adapter, bundle.model, 5)
    with torch.no_grad():
        original = bundle.model(**x)
        errors = [relative_l2(pruned_and_reference(adapter, bundle.model, 1.0, "temporal-window", w)[1](**x),
                              original) for w in (0, 1, 2, 3, 4)]
    assert errors[0] > errors[1] > errors[2] > errors[3] > 1e-3 and errors[4] < 1e-6, errors


def test_frame_local_heads_keep_every_parameter_and_removed_heads_lose_theirs(family):
    adapter, bundle = family
    total = parameter_count(bundle.model)
    assert parameter_count(pruned_and_reference(adapter, bundle.model, 0.5, "frame-local")[1]) == total
    _, removed, _ = pruned_and_reference(adapter, bundle.model, 0.5, "remove")
    width = bundle.model.inner.config.num_attention_heads * bundle.model.inner.config.attention_head_dim
    head_dim, layers = bundle.model.inner.config.attention_head_dim, 2
    # 4 of 8 heads, each: its v rows (weights and bias) and its output columns; plus its q and k rows where the
    # q/k norm is per head (CogVideoX); Wan's norm spans every head, so q and k stay whole
    projections = 3 if adapter.family == "cogvideox" else 1
    per_head = projections * head_dim * (width + 1) + head_dim * width
    assert total - parameter_count(removed) == 4 * per_head
    assert layers * bundle.model.inner.config.num_attention_heads == 8


@pytest.mark.parametrize("action", ["frame-local", "temporal-window", "remove"])
def test_the_onnx_of_a_pruned_model_equals_pytorch_at_two_frame_counts(family, action, tmp_path):
    adapter, bundle = family
    _, pruned, _ = pruned_and_reference(adapter, bundle.model, 0.5, action)
    assert "frames" not in adapter.fixed_axes_of(pruned)
    spec = adapter.export_spec(pruned, VideoShape(3, 8, 8), batch=2, dynamic=["batch", "frames"], seed=2)
    info = export_onnx(pruned, spec, tmp_path / "pruned.onnx", 17, "auto")
    session = onnxruntime.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    for frames in (3, 5):
        x = inputs(adapter, pruned, frames, seed=frames)
        with torch.no_grad():
            expected = pruned(**x)
        out = session.run(None, {name: t.numpy() for name, t in x.items()})[0]
        assert relative_l2(torch.from_numpy(out), expected) <= 1e-4, frames


def test_cogvideox_positions_are_the_pipelines_rotary_embedding_of_the_clip():
    """The graph's rotary table, cut to the clip, is what CogVideoXPipeline computes for that many frames (Wan's
    positions are diffusers' own WanRotaryPosEmbed, inside the transformer)."""
    adapter = get_adapter("cogvideox")
    net = adapter.checkpoint.load_preset("tiny", seed=0).model
    assert net.inner.config.use_rotary_positional_embeddings
    for frames in (2, 5):
        x = inputs(adapter, net, frames)
        rotary = net.rotary_embedding(frames, 8, 8)  # the pipeline's function at exactly this clip
        net.layout.tokens_per_frame = 16
        with torch.no_grad():
            expected = net.inner(hidden_states=x["sample"].transpose(1, 2),
                                 encoder_hidden_states=x["encoder_hidden_states"], timestep=x["timestep"],
                                 image_rotary_emb=rotary, return_dict=False)[0].transpose(1, 2)
            assert torch.equal(net(**x), expected)


class SquareScores(TorchDispatchMode):
    """Records whether any operation built, or (a fused attention kernel) scored, [S, S] query-key pairs."""

    def __init__(self, sequence):
        super().__init__()
        self.sequence, self.seen = sequence, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        square = (self.sequence,) * 2
        if "scaled_dot_product" in func.__name__:
            self.seen |= (args[0].shape[-2], args[1].shape[-2]) == square
        elif isinstance(out, torch.Tensor) and out.dim() >= 2:
            self.seen |= tuple(out.shape[-2:]) == square
        return out


@pytest.mark.parametrize("action", ["frame-local", "temporal-window"])
def test_frame_local_and_windowed_attention_never_build_a_sequence_by_sequence_matrix(family, action):
    adapter, bundle = family
    x = inputs(adapter, bundle.model, 5)
    sequence = 5 * 4 * 4 + (adapter.text_tokens if adapter.family == "cogvideox" else 0)  # 5 frames of 4 x 4 tokens
    for ratio, expected in ((0.0, True), (1.0, False)):
        _, pruned, _ = pruned_and_reference(adapter, bundle.model, ratio, action, window=1)
        with torch.no_grad(), SquareScores(sequence) as recorder:
            pruned(**x)
        assert recorder.seen == expected, ratio


def test_with_a_single_frame_no_head_reads_another_frame(family):
    """The temporal criteria measure the cross-frame part alone: with one frame it is zero, the head's
    contribution is not."""
    adapter, bundle = family
    section_type = family_sections(adapter.family)["calibration"]
    section = section_type(prompts=["a man is skiing"], seeds=[0], steps=1)
    for frames, temporal in ((1, False), (3, True)):
        scores = calibrate(adapter, bundle, VideoShape(frames, 8, 8), section)
        for module in scores.modules.values():
            assert all(v > 0 for v in module.scores["contribution"])
            for criterion in ("mixing", "temporal_contribution"):
                assert all((v > 1e-6) == temporal for v in module.scores[criterion]), (frames, criterion)
            assert all(t <= c + 1e-6 for t, c in zip(module.scores["temporal_contribution"],
                                                       module.scores["contribution"]))


def test_frame_local_is_refused_for_a_family_whose_heads_attend_over_frames_only(tmp_path):
    recipe = tmp_path / "tav.toml"
    recipe.write_text('[model]\nfamily = "tune-a-video"\npreset = "tiny"\n[pruning]\naction = "frame-local"\n')
    result = run("build", recipe)
    assert result.exit_code == 2
    assert result.output.strip() == ("error: tav.toml: [pruning].action = 'frame-local': the heads of a "
                                     "tune-a-video model can only be 'remove'")


def test_a_joint_family_prunes_frame_local_unless_the_recipe_says_remove(tmp_path):
    from f3export.recipe import load_recipe

    recipe = tmp_path / "wan.toml"
    recipe.write_text('[model]\nfamily = "wan"\npreset = "tiny"\n')
    assert load_recipe(recipe).pruning.action == "frame-local"
    recipe.write_text('[model]\nfamily = "wan"\npreset = "tiny"\n[pruning]\naction = "remove"\n')
    assert load_recipe(recipe).pruning.action == "remove"
    assert np.isclose(load_recipe(recipe).pruning.ratio, 0.5)


@pytest.mark.parametrize("window", [0, 1, 2])
def test_the_counted_attention_flops_of_windowed_heads_are_what_the_graph_computes(window):
    """``flops.joint_attention_pairs`` (the Pareto's price at CogVideoX-2B's shape) against FlopCounterMode on
    the tiny CogVideoX: every head windowed saves 4 * head_dim FLOPs per query-key pair it no longer scores."""
    adapter = get_adapter("cogvideox")
    model = adapter.checkpoint.load_preset("tiny", seed=0).model
    x = inputs(adapter, model, 5)
    _, pruned, _ = pruned_and_reference(adapter, model, 1.0, "temporal-window", window)
    names = [s.attention for s in adapter.structure.temporal_sites(model)]
    (_, full), (_, local) = count_flops(model, x, names), count_flops(pruned, x, names)
    config = model.inner.config
    pairs = joint_attention_pairs(5, 16, adapter.text_tokens), joint_attention_pairs(5, 16, adapter.text_tokens, window)
    heads = config.num_layers * config.num_attention_heads
    assert full - local == 4 * config.attention_head_dim * 2 * heads * (pairs[0] - pairs[1])
