"""The Tune-A-Video implementation is pinned to the original architecture and on-disk format."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from f3export.errors import CheckpointError
from f3export.models.tune_a_video import TINY
from f3export.models.tune_a_video.network import TuneAVideoConfig
from f3export.stages import model_digest

from conftest import ORIGINAL_STYLE_CONFIG, TAV, write_checkpoint, write_clip


def diffusers_2d_twin(config: TuneAVideoConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=config.sample_size, in_channels=4, out_channels=4,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=tuple(t.replace("3D", "2D") for t in config.down_block_types),
        up_block_types=tuple(t.replace("3D", "2D") for t in config.up_block_types),
        layers_per_block=config.layers_per_block, cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_num_groups, attention_head_dim=config.attention_head_dim,
    ).eval()


def test_static_video_without_temporal_output_equals_diffusers_2d_unet_per_frame(tiny_model):
    """Identical frames make sparse-causal attention plain self-attention and frame-joint GroupNorm
    per-frame; with attn_temp.to_out zeroed the video UNet must be the SD UNet applied to each frame."""
    spatial = {k: v for k, v in tiny_model.state_dict().items() if "_temp." not in k}
    twin = diffusers_2d_twin(TINY)
    twin.load_state_dict(spatial, strict=True)  # same key names as diffusers' SD-1.x UNet
    with torch.no_grad():
        for name, module in tiny_model.named_modules():
            if name.endswith("attn_temp"):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        frame = torch.randn(2, 4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        video = frame.expand(2, 4, 6, 16, 16).contiguous()
        context = torch.randn(2, 77, TINY.cross_attention_dim, generator=torch.Generator().manual_seed(2))
        timestep = torch.tensor([421.0, 421.0])
        out = tiny_model(video, timestep, context)
        reference = twin(frame[:, :, 0], timestep, context).sample
    assert out.shape == (2, 4, 6, 16, 16)
    for f in range(6):
        assert torch.allclose(out[:, :, f], reference, atol=2e-5, rtol=1e-4)


def test_sparse_causal_attention_reads_only_first_and_previous_frame(tiny_model):
    attn = tiny_model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    frames, tokens, width = 5, 6, TINY.block_out_channels[0]
    x = torch.randn(frames, tokens, width, generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[2] += 1.0  # frame 2 is read by frames 2 and 3 only
    with torch.no_grad():
        before, after = attn(x, video_length=frames), attn(changed, video_length=frames)
    moved = [(after[f] - before[f]).abs().max().item() > 1e-6 for f in range(frames)]
    assert moved == [False, False, True, True, False]


def test_every_transformer_block_has_8_heads_and_sd14_has_16_temporal_modules():
    with torch.device("meta"):
        model = TAV.checkpoint.build(TAV.checkpoint.presets["sd14"])
    sites = TAV.structure.temporal_sites(model)
    assert len(sites) == 16
    assert {model.get_submodule(s.attention).heads for s in sites} == {8}
    assert [model.get_submodule(s.attention).inner_dim // 8 for s in sites][:2] == [40, 40]
    parameters = sum(p.numel() for p in model.parameters())
    # attn_temp: q, k, v, out (C x C each) + out bias, norm_temp: 2C; 5 blocks at 320 and 640, 6 at 1280.
    temporal = sum(n * (4 * c * c + 3 * c) for n, c in ((5, 320), (5, 640), (6, 1280)))
    assert parameters == 859_520_964 + temporal  # the SD-1.4 UNet plus the temporal modules: 909.1 M


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_loads_tune_a_video_folder_with_original_key_names(tmp_path, tiny_model, small_inputs, weights_format):
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.weight" in tiny_model.state_dict()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.norm_temp.weight" in tiny_model.state_dict()
    write_checkpoint(tmp_path, tiny_model, weights_format, ORIGINAL_STYLE_CONFIG)
    bundle = TAV.checkpoint.load_folder(tmp_path)
    assert not bundle.random_weights
    with torch.no_grad():
        assert torch.equal(bundle.model(**small_inputs), tiny_model(**small_inputs))


def test_pickled_checkpoint_that_needs_code_is_refused(tmp_path, tiny_model):
    write_checkpoint(tmp_path, tiny_model, "safetensors", ORIGINAL_STYLE_CONFIG)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"weights": tiny_model.state_dict(), "hook": TuneAVideoConfig()},
               tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: refused to unpickle"):
        TAV.checkpoint.load_folder(tmp_path)


def test_checkpoint_with_a_wrong_shape_names_the_key(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    state["conv_in.weight"] = torch.zeros(1)
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps(ORIGINAL_STYLE_CONFIG))
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'conv_in.weight' has shape \[1\]"):
        TAV.checkpoint.load_folder(tmp_path)


def test_odd_latent_sizes_run_and_keep_their_shape(tiny_model):
    sample = torch.randn(1, 4, 3, 10, 14)
    with torch.no_grad():
        out = tiny_model(sample, torch.tensor([10.0]), torch.randn(1, 77, TINY.cross_attention_dim))
    assert out.shape == sample.shape


def test_a_clip_text_encoder_in_the_folder_conditions_calibration(tmp_path, tiny_model):
    write_checkpoint(tmp_path, tiny_model, "safetensors", ORIGINAL_STYLE_CONFIG)
    write_clip(tmp_path, TINY.cross_attention_dim)
    bundle = TAV.checkpoint.load_folder(tmp_path)
    embeddings = TAV.encode_prompts(bundle, ["a man is skiing", "a cat"])
    assert embeddings.shape == (2, 77, TINY.cross_attention_dim)
    assert not torch.allclose(embeddings[0], embeddings[1])
    assert model_digest(TAV, "network", None, str(tmp_path), 0) != model_digest(TAV, "network", "tiny", None, 0)
