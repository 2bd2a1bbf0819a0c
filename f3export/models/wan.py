"""Wan 2.1 (diffusers ``WanTransformer3DModel``): self-attention over the video tokens with 3D RoPE and q/k
RMSNorm across all heads, a separate cross-attention to the UMT5 text; flow matching sampled with the
pipeline's ``UniPCMultistepScheduler`` (flow sigmas, shift 3).

The self-attention is the joint 3D attention F3 is generalised to (``attn1`` of every block); cross-attention
reads no frames and is left alone. Positions come from the input's shape inside the graph, so the export
keeps frames, height and width dynamic.
"""

from __future__ import annotations

import torch

from .diffusers_video import DiffusersFolder
from .joint_attention import JointStyle
from .joint_video import JointVideoAdapter, JointVideoNet
from .pipeline_parts import PipelineParts, PromptEncoding
from .protocols import DiffusionProtocol
from .structure import JointAttentionPatterns


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``WanAttnProcessor``'s rotary embedding of [B, S, H, d], the same products written without in-place
    strided assignment (which an export fixes to one sequence length)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanStyle(JointStyle):
    """``WanAttnProcessor`` for self-attention: q/k RMSNorm over every head's channels, RoPE on every token."""

    norm_across_heads = True

    def qkv(self, attn, head_dim, hidden_states, encoder_hidden_states=None, attention_mask=None,
            image_rotary_emb=None):
        q, k = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        q, k, v = (x.unflatten(2, (-1, head_dim)) for x in (q, k, v))  # [B, S, H, d]
        if image_rotary_emb is not None:
            q, k = rotate(q, *image_rotary_emb), rotate(k, *image_rotary_emb)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0

    def output(self, attn, heads_out, context):
        return attn.to_out[1](attn.to_out[0](heads_out))

    def removed_output(self, constant, hidden_states, encoder_hidden_states):
        return constant(hidden_states)


class WanNet(JointVideoNet):
    style = WanStyle()
    self_attention = "blocks.*.attn1"

    def run(self, sample, timestep, encoder_hidden_states):
        return self.inner(sample, timestep, encoder_hidden_states, return_dict=False)[0]


# The negative prompt of Wan's documented usage (WanPipeline's example; the pipeline itself defaults to ""): what
# the unconditional row reads unless the recipe's [calibration] / [validation] negative_prompt says otherwise.
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards")

# The real layouts (transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers).
_WAN_1_3B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
_WAN_14B = {**_WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}


class WanAdapter(JointVideoAdapter):
    family = "wan"
    checkpoint = DiffusersFolder("WanTransformer3DModel", component="transformer", net=WanNet, presets={
        "tiny": {**_WAN_1_3B, "num_attention_heads": 4, "attention_head_dim": 12, "in_channels": 4,
                 "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
                 "rope_max_seq_len": 64},
        "wan2.1-1.3b": _WAN_1_3B,
        "wan2.1-14b": _WAN_14B,
    }, parts=PipelineParts(
        # WanPipeline: prompts cleaned, padded to 512 tokens, encoded with their mask, padding zeroed
        text_encoders={"UMT5EncoderModel": PromptEncoding(tokens=512, masked=True, clean="wan")},
        vaes=("AutoencoderKLWan",),
        schedulers=("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"), folder_scheduler=True))
    structure = JointAttentionPatterns((WanNet.self_attention,), "transformer")
    text_tokens = 512  # UMT5 tokens the pipeline pads every prompt to
    protocol = DiffusionProtocol(inversion=False, negative_prompt=WAN_NEGATIVE_PROMPT, skip_unconditional=True)
    default_scheduler = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json
        "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2,
        "solver_type": "bh2", "predict_x0": True, "lower_order_final": True, "final_sigmas_type": "zero",
        "timestep_spacing": "linspace", "steps_offset": 0,
    }

    def text_width(self, model):
        return model.inner.config.text_dim

    def shape_error(self, model, shape):
        limit = model.inner.config.rope_max_seq_len
        patch = model.spatial_patch
        if max(shape.frames, shape.latent_height // patch, shape.latent_width // patch) > limit:
            return f"frames or latent size beyond the rotary table's rope_max_seq_len = {limit} positions"
        return super().shape_error(model, shape)
