"""Latte (diffusers ``LatteTransformer3DModel``): a transformer text-to-video model.

Spatial and temporal transformer blocks alternate; temporal attention is the
``attn1`` of every ``temporal_transformer_blocks.*`` (16 heads in the real
model). Its output is gated by the timestep (adaLN-single), and its variance
channels follow the noise prediction in the output.
"""

from .diffusers_video import DiffusersFolder, DiffusersVideoAdapter
from .structure import AttentionPatterns


class LatteAdapter(DiffusersVideoAdapter):
    family = "latte"
    checkpoint = DiffusersFolder("LatteTransformer3DModel", component="transformer", presets={
        "tiny": {
            "num_attention_heads": 8, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
            "num_layers": 2, "sample_size": 16, "patch_size": 2, "norm_type": "ada_norm_single",
            "caption_channels": 32, "cross_attention_dim": 64, "video_length": 8,
            "activation_fn": "gelu-approximate", "norm_elementwise_affine": False, "norm_eps": 1e-6,
        },
    })
    structure = AttentionPatterns(("temporal_transformer_blocks.*.attn1",), "transformer")

    fixed_axes = ("frames",)  # temporal positions are a table of exactly video_length rows

    def shape_error(self, model, shape):
        config = model.inner.config
        if shape.frames != config.video_length:
            return f"frames = {shape.frames}, but this Latte model's temporal positions cover exactly " \
                   f"video_length = {config.video_length} frames"
        if shape.latent_height % config.patch_size or shape.latent_width % config.patch_size:
            return f"latent size {shape.latent_height}x{shape.latent_width} is not a multiple of " \
                   f"patch_size = {config.patch_size}"
        return None

    def text_width(self, model):
        return model.inner.config.caption_channels
