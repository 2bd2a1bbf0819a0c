"""CogVideoX (diffusers ``CogVideoXTransformer3DModel``): text tokens concatenated with the video tokens in
one joint attention per block (expert adaptive LayerNorms), 3D RoPE on the video tokens (5B) or sincos
positions (2B), per-head q/k LayerNorm; v-prediction sampled with ``CogVideoXDDIMScheduler``.

The pipeline holds latents as [B, F, C, H, W] and computes the rotary embedding from the latent grid
(``CogVideoXPipeline._prepare_rotary_positional_embeddings``); ``CogVideoXNet`` does both inside the graph, from
f3export's [B, C, F, H, W]. A frame's rotary rows do not depend on the clip's length (frames are the outermost
axis of the table), so the graph holds the table of ROPE_FRAMES frames and takes the clip's first rows: frames
stay dynamic. Height and width do not (the grid is cropped to the model's base size at trace time), nor
anything for CogVideoX-2B, whose sincos positions the patch embedding computes from the clip's shape.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from .diffusers_video import DiffusersFolder
from .base import PipelineCall
from .joint_attention import JointStyle
from .joint_video import JointVideoAdapter, JointVideoNet
from .pipeline_parts import PipelineParts, PromptEncoding
from .protocols import DiffusionProtocol
from .structure import JointAttentionPatterns


class CogVideoXStyle(JointStyle):
    """``CogVideoXAttnProcessor2_0``: q, k, v of [text, video], per-head norms, RoPE on the video part only."""

    norm_across_heads = False

    def qkv(self, attn, head_dim, hidden_states, encoder_hidden_states=None, attention_mask=None,
            image_rotary_emb=None):
        context = encoder_hidden_states.shape[1]
        sequence = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (proj(sequence).unflatten(2, (-1, head_dim)).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q, k = (torch.cat([x[:, :, :context], apply_rotary_emb(x[:, :, context:], image_rotary_emb)], dim=2)
                    for x in (q, k))
        return q, k, v, context

    def output(self, attn, heads_out, context):
        out = attn.to_out[1](attn.to_out[0](heads_out))
        return out[:, context:], out[:, :context]  # the block's (video, text)

    def removed_output(self, constant, hidden_states, encoder_hidden_states):
        return constant(hidden_states), constant(encoder_hidden_states)


ROPE_FRAMES = 64  # token frames the graph's rotary table holds: the most a dynamic-frames engine can run


class CogVideoXNet(JointVideoNet):
    style = CogVideoXStyle()
    self_attention = "transformer_blocks.*.attn1"

    @property
    def spatial_patch(self):
        return self.inner.config.patch_size

    @property
    def temporal_patch(self):
        return self.inner.config.patch_size_t or 1

    def rotary_embedding(self, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's 3D RoPE of a latent clip (CogVideoX 1.0 crops the grid to the model's base size,
        1.5 slices it)."""
        config = self.inner.config
        p, p_t = config.patch_size, config.patch_size_t
        grid = (height // p, width // p)
        base_height, base_width = config.sample_height // p, config.sample_width // p
        if p_t is None:
            return get_3d_rotary_pos_embed(config.attention_head_dim,
                                           get_resize_crop_region_for_grid(grid, base_width, base_height),
                                           grid, frames)
        return get_3d_rotary_pos_embed(config.attention_head_dim, None, grid, (frames + p_t - 1) // p_t,
                                       grid_type="slice", max_size=(base_height, base_width))

    def run(self, sample, timestep, encoder_hidden_states):
        rotary = None
        if self.inner.config.use_rotary_positional_embeddings:
            frames, height, width = sample.shape[2:]  # traced sizes while exporting
            table = self.rotary_embedding(max(ROPE_FRAMES * self.temporal_patch, int(frames)), int(height),
                                          int(width))
            patch = self.spatial_patch
            rows = frames // self.temporal_patch * (height // patch) * (width // patch)
            rotary = tuple(part[:rows] for part in table)
        out = self.inner(hidden_states=sample.transpose(1, 2), encoder_hidden_states=encoder_hidden_states,
                         timestep=timestep, image_rotary_emb=rotary, return_dict=False)[0]
        return out.transpose(1, 2)


# The real layouts (transformer/config.json of THUDM/CogVideoX-2b and -5b), for counting on the meta device.
_COGVIDEOX_2B = {
    "num_attention_heads": 30, "attention_head_dim": 64, "in_channels": 16, "out_channels": 16,
    "flip_sin_to_cos": True, "freq_shift": 0, "time_embed_dim": 512, "text_embed_dim": 4096, "num_layers": 30,
    "dropout": 0.0, "attention_bias": True, "sample_width": 90, "sample_height": 60, "sample_frames": 49,
    "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 226, "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu", "norm_elementwise_affine": True, "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": False, "use_learned_positional_embeddings": False,
}
_COGVIDEOX_5B = {**_COGVIDEOX_2B, "num_attention_heads": 48, "num_layers": 42,
                 "use_rotary_positional_embeddings": True}


class CogVideoXAdapter(JointVideoAdapter):
    family = "cogvideox"
    checkpoint = DiffusersFolder("CogVideoXTransformer3DModel", component="transformer", net=CogVideoXNet, presets={
        # CogVideoX-5B's architecture (RoPE, per-head q/k LayerNorm) at a small width
        "tiny": {**_COGVIDEOX_5B, "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4,
                 "out_channels": 4, "time_embed_dim": 32, "text_embed_dim": 32, "num_layers": 2,
                 "sample_width": 16, "sample_height": 16, "sample_frames": 13, "max_text_seq_length": 226},
        "cogvideox-2b": _COGVIDEOX_2B,
        "cogvideox-5b": _COGVIDEOX_5B,
    }, parts=PipelineParts(
        # T5 prompts padded to max_sequence_length (CogVideoXPipeline); CLIP for the reference model trained here
        text_encoders={"T5EncoderModel": PromptEncoding(tokens=226), "CLIPTextModel": PromptEncoding()},
        vaes=("AutoencoderKLCogVideoX",),
        schedulers=("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"), folder_scheduler=True))
    structure = JointAttentionPatterns((CogVideoXNet.self_attention,), "transformer")
    fixed_axes = ("frames", "height", "width")  # sincos positions (2B) are computed from the clip's shape
    text_tokens = 226  # T5 tokens the pipeline pads every prompt to
    protocol = DiffusionProtocol(inversion=False, dynamic_cfg=True, skip_unconditional=True)
    # CogVideoXPipeline holds latents [B, F, C, H, W] and passes the 3D RoPE it computed, which the graph computes
    pipeline_call = PipelineCall(sample="hidden_states", frames_first=True, computed_in_graph=("image_rotary_emb",))
    default_scheduler = {  # THUDM/CogVideoX-2b scheduler/scheduler_config.json
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
        "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing",
    }

    def text_width(self, model):
        return model.inner.config.text_embed_dim

    def fixed_axes_of(self, model):
        if model.inner.config.use_rotary_positional_embeddings:
            return ("height", "width")  # the rotary grid is cropped to the base size when traced
        return self.fixed_axes

    def shape_error(self, model, shape):
        if model.inner.config.use_rotary_positional_embeddings and shape.frames > ROPE_FRAMES * model.temporal_patch:
            return f"frames = {shape.frames}: the graph's rotary table holds {ROPE_FRAMES} token frames"
        return super().shape_error(model, shape)

    def conventions(self, bundle):
        return {**super().conventions(bundle),
                "layout": "the graph takes latents [batch, channels, frames, height, width] and returns the "
                          "prediction so; CogVideoXPipeline holds them as [batch, frames, channels, height, "
                          "width]: transpose dims 1 and 2 on the way in and out"}
