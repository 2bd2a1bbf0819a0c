"""Tune-A-Video (showlab, 2023): a Stable Diffusion 1.x UNet inflated to video.

Our own implementation of the published architecture, with the original
checkpoint key names so that real Tune-A-Video folders load strictly:

* every 2D convolution runs per frame (frames folded into the batch);
* GroupNorms of the ResNet blocks and of ``conv_norm_out`` normalise over
  channels x frames x pixels of the 5D tensor (as in the original), the
  transformer's input GroupNorm per frame;
* each ``BasicTransformerBlock`` runs sparse-causal self-attention (keys and
  values from frame 0 and frame i-1), text cross-attention, the feed-forward,
  then temporal attention over frames at every spatial position:
  ``h = attn_temp(norm_temp(h)) + h`` with frames folded ``(b f) d c -> (b d) f c``
  and no positional encoding;
* config ``attention_head_dim`` is the number of heads (the SD-1.x naming quirk),
  so every block has 8 heads of width C/8.

Diffusers supplies the building blocks (``Attention``, ``FeedForward``,
timestep embeddings); the blocks that differ from the 2D UNet live here.
Checkpoint folders are read by ``checkpoint``; presets and the adapter are in ``adapter``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ...errors import CheckpointError
from ..attention import RemovedAttention
from ..configs import check_dataclass_config

CROSS_ATTN_DOWN = ("CrossAttnDownBlock3D", "CrossAttnDownBlock2D")
PLAIN_DOWN = ("DownBlock3D", "DownBlock2D")
CROSS_ATTN_UP = ("CrossAttnUpBlock3D", "CrossAttnUpBlock2D")
PLAIN_UP = ("UpBlock3D", "UpBlock2D")


@dataclass
class TuneAVideoConfig:
    """The fields of a Tune-A-Video / SD-1.x ``unet/config.json`` that shape the network."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"]
    )
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3)
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = field(default=0, metadata={"low": 0})
    downsample_padding: int = field(default=1, metadata={"low": 0})
    mid_block_scale_factor: float = 1.0
    sample_size: int = 64

    # Options of the diffusers config that SD-1.x checkpoints leave at these values;
    # any other value means a network this implementation does not build.
    _FIXED = {
        "act_fn": "silu",
        "center_input_sample": False,
        "dual_cross_attention": False,
        "only_cross_attention": False,
        "upcast_attention": False,
        "use_linear_projection": False,
        "num_class_embeds": None,
        "class_embed_type": None,
        "resnet_time_scale_shift": "default",
    }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "TuneAVideoConfig":
        """Read a diffusers-style UNet config, ignoring bookkeeping keys (``_class_name`` ...)."""
        known = {f.name for f in fields(cls)}
        for key, expected in cls._FIXED.items():
            if key in raw and raw[key] != expected and not (key == "act_fn" and raw[key] == "swish"):
                raise CheckpointError(f"{source}: {key} = {raw[key]!r} is not supported (Tune-A-Video uses {expected!r})")
        values = {k: v for k, v in raw.items() if k in known}
        head_dim = values.get("attention_head_dim")
        if isinstance(head_dim, list):
            if len(set(head_dim)) != 1:
                raise CheckpointError(f"{source}: per-block attention_head_dim {head_dim} is not supported")
            values["attention_head_dim"] = head_dim[0]
        check_dataclass_config(cls, values, source)
        config = cls(**values)
        if not config.block_out_channels:
            raise CheckpointError(f"{source}: block_out_channels must not be empty")
        for name in config.down_block_types:
            if name not in CROSS_ATTN_DOWN + PLAIN_DOWN:
                raise CheckpointError(f"{source}: unknown down block type {name!r}")
        for name in config.up_block_types:
            if name not in CROSS_ATTN_UP + PLAIN_UP:
                raise CheckpointError(f"{source}: unknown up block type {name!r}")
        if len(config.down_block_types) != len(config.block_out_channels) or len(config.up_block_types) != len(
            config.block_out_channels
        ):
            raise CheckpointError(f"{source}: block_out_channels and the block type lists differ in length")
        for i, channels in enumerate(config.block_out_channels):
            for key in ("norm_num_groups", "attention_head_dim"):  # groups of the GroupNorms, heads of attention
                if channels % getattr(config, key):
                    raise CheckpointError(f"{source}: block_out_channels[{i}] = {channels} is not a multiple of "
                                          f"{key} = {getattr(config, key)}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "UNet3DConditionModel", **asdict(self)}


def _fold_frames(x: torch.Tensor) -> torch.Tensor:
    """[b, c, f, h, w] -> [(b f), c, h, w]"""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _unfold_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[(b f), c, h, w] -> [b, c, f, h, w]"""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


class InflatedConv3d(nn.Conv2d):
    """A 2D convolution applied to every frame; a plain Conv2d in the state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _unfold_frames(super().forward(_fold_frames(x)), x.shape[2])


class ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = InflatedConv3d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = InflatedConv3d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = InflatedConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (shortcut + h) / self.output_scale_factor


class Downsample3D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = InflatedConv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=(x.shape[2], *size), mode="nearest"))


class SparseCausalAttnProcessor:
    """Self-attention where frame i attends to the tokens of frame 0 and frame i-1."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, video_length: int = 1) -> torch.Tensor:
        bf, tokens, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = query.shape[-1] // heads

        previous = torch.clamp(torch.arange(video_length, device=hidden_states.device) - 1, min=0)
        first = torch.zeros_like(previous)

        def sparse_causal(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(bf // video_length, video_length, tokens, -1)
            x = torch.cat([x[:, first], x[:, previous]], dim=2)
            return x.reshape(bf, 2 * tokens, -1)

        key, value = sparse_causal(key), sparse_causal(value)
        query = query.reshape(bf, tokens, heads, head_dim).transpose(1, 2)
        key = key.reshape(bf, 2 * tokens, heads, head_dim).transpose(1, 2)
        value = value.reshape(bf, 2 * tokens, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(bf, tokens, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cross_attention_dim: int):
        super().__init__()
        head_dim = dim // heads
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, processor=SparseCausalAttnProcessor())
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)
        self.attn_temp: Attention | RemovedAttention = Attention(dim, heads=heads, dim_head=head_dim)
        self.norm_temp: nn.Module = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        """x: [(b f), d, c] tokens of each frame; context: [(b f), n, c_text]."""
        x = self.attn1(self.norm1(x), video_length=frames) + x
        x = self.attn2(self.norm2(x), encoder_hidden_states=context) + x
        x = self.ff(self.norm3(x)) + x
        if isinstance(self.attn_temp, RemovedAttention):
            return self.attn_temp.add_to(x)  # every head pruned: only the output bias is left
        bf, d, c = x.shape
        x = x.reshape(bf // frames, frames, d, c).transpose(1, 2).reshape(-1, frames, c)
        x = self.attn_temp(self.norm_temp(x)) + x
        return x.reshape(bf // frames, d, frames, c).transpose(1, 2).reshape(bf, d, c)


class Transformer3DModel(nn.Module):
    def __init__(self, channels: int, heads: int, cross_attention_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        residual = _fold_frames(x)
        bf, c, h, w = residual.shape
        context = context.repeat_interleave(frames, dim=0)
        tokens = self.proj_in(self.norm(residual)).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, frames)
        out = self.proj_out(tokens.reshape(bf, h, w, c).permute(0, 3, 1, 2)) + residual
        return _unfold_frames(out, frames)


def _transformers(cfg: TuneAVideoConfig, channels: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(
        Transformer3DModel(channels, cfg.attention_head_dim, cfg.cross_attention_dim, cfg.norm_num_groups)
        for _ in range(count)
    )


class DownBlock3D(nn.Module):
    def __init__(self, cfg: TuneAVideoConfig, in_ch: int, out_ch: int, temb_ch: int, with_attention: bool,
                 add_downsample: bool):
        super().__init__()
        layers = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_ch if i == 0 else out_ch, out_ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(layers)
        )
        if with_attention:
            self.attentions = _transformers(cfg, out_ch, layers)
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample3D(out_ch, cfg.downsample_padding)])

    def forward(self, x, temb, context):
        skips = []
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attention in zip(self.resnets, attentions):
            x = resnet(x, temb)
            if attention is not None:
                x = attention(x, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock3D(nn.Module):
    def __init__(self, cfg: TuneAVideoConfig, in_ch: int, prev_ch: int, out_ch: int, temb_ch: int,
                 with_attention: bool, add_upsample: bool):
        super().__init__()
        layers = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock3D((prev_ch if i == 0 else out_ch) + (in_ch if i == layers - 1 else out_ch), out_ch,
                          temb_ch, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(layers)
        )
        if with_attention:
            self.attentions = _transformers(cfg, out_ch, layers)
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample3D(out_ch)])

    def forward(self, x, temb, context, skips, upsample_size):
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attention in zip(self.resnets, attentions):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if attention is not None:
                x = attention(x, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock3D(nn.Module):
    def __init__(self, cfg: TuneAVideoConfig, ch: int, temb_ch: int):
        super().__init__()
        self.attentions = _transformers(cfg, ch, 1)
        self.resnets = nn.ModuleList(
            ResnetBlock3D(ch, ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor)
            for _ in range(2)
        )

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class TuneAVideoUNet(nn.Module):
    """noise_pred = unet(sample [B, 4, F, H, W], timestep [B] or scalar, encoder_hidden_states [B, 77, C])."""

    def __init__(self, config: TuneAVideoConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        temb_ch = channels[0] * 4
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)
        self.conv_in = InflatedConv3d(config.in_channels, channels[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            self.down_blocks.append(DownBlock3D(config, in_ch, out_ch, temb_ch, block_type in CROSS_ATTN_DOWN,
                                                add_downsample=i < len(channels) - 1))
        self.mid_block = MidBlock3D(config, channels[-1], temb_ch)

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(channels))
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, len(channels) - 1)]
            self.up_blocks.append(UpBlock3D(config, in_ch, prev_ch, out_ch, temb_ch, block_type in CROSS_ATTN_UP,
                                            add_upsample=i < len(channels) - 1))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = InflatedConv3d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        temb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)

        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # Upsampling always targets the size of the next skip connection (the same as 2x where the
            # latent size divides evenly), so one exported graph serves every latent size.
            size = tuple(skips[-1].shape[-2:]) if skips else None
            x = block(x, temb, context, block_skips, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))
