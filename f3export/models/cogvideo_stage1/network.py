"""CogVideo (Hong et al., 2022), stage 1: the autoregressive text-to-video transformer of the F3-Pruning paper.

A CogView2 transformer (SwissArmyTransformer layers with sandwich LayerNorm:
48 layers, 3072 wide, 48 heads) over 64 text tokens followed by frames of
20x20 image tokens, whose every layer carries a second attention channel:

* spatial (``attention.query_key_value`` / ``attention.dense``): text tokens
  attend to the text; frame tokens to the text and, causally, to their own frame;
* temporal (the ``attention_plus`` mixin: ``query_key_value[l]``, ``dense[l]``,
  ``attn_distribution[l]``): frame tokens attend to the text and, causally,
  to every earlier frame token (stage 1, sequential generation, window_size -1).

Frame tokens mix the two as ``sigmoid(a) * spatial + (1 - sigmoid(a)) * temporal``
with ``a = attn_distribution[l]``; text tokens use the spatial channel only.
The temporal channel is what F3-Pruning prunes. Stage 2 (3D shifted-window
attention for frame interpolation) is not implemented.

The sequence is laid out as CogVideo trains and samples it (``pretrain_cogvideo.py``,
``cogvideo_pipeline.py``): the text left-padded to ``text_len`` slots, its pads masked
out of both channels and at position id 0, the real text at 0..L-1; then every frame
block of ``frame_len`` tokens starts with ``<start_of_image>`` (BOI), followed by the
frame's first ``frame_len - 1`` image tokens. The logits are those of the positions
``text_len + j``, which predict image token j (BOI rows included), over the image
vocabulary only. Stage 1 masks frame 0 out of its loss and generates it with the temporal
channel off, so calibration statistics and pruning fidelity read frames 1 on.

The checkpoint format is in ``checkpoint``, the adapter in ``adapter``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ...criteria import HeadObservation
from ..attention import AttentionHeads, HeadProjections
from ..configs import check_dataclass_config

MASKED_SCORE = -10000.0  # SwissArmyTransformer's value for masked attention scores


@dataclass(frozen=True)
class SamplingTerms:
    """Where CogVideo's sampling (``cogvideo_pipeline.py`` with ``CogVideoCacheModel``) departs from training.

    ``spatial_text_weight`` / ``temporal_text_weight``: the pipeline's ``log_text_attention_weights`` (1.4),
    added to the scores of frame tokens on text keys in each channel (the cache model adds it in the spatial
    channel always, in the temporal one only in single-token steps). ``frame0_temporal = False`` is its
    ``enforce_no_swin``: frame 0's tokens take the spatial channel alone. Values or (in a step graph) tensors.
    """

    spatial_text_weight: Any = 0.0
    temporal_text_weight: Any = 0.0
    frame0_temporal: Any = True


TRAINING = SamplingTerms()  # what training computes: no text weight, both channels on every frame

@dataclass(frozen=True)
class CogVideoConfig:
    """SwissArmyTransformer's argument names where it has them (``layout`` = [text, text + frame, text + all frames])."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int  # rows of the CogView2 position table (text and the first frame)
    layout: tuple[int, int, int] = (64, 464, 2064)  # CogVideo's defaults from here on
    additional_seqlen: int = field(default=2000, metadata={"low": 0})  # rows of the later frames' position table
    image_vocab_size: int = 20000  # icetk: image tokens are ids [0, 20000), text tokens follow
    boi_token_id: int = 150000  # icetk's <start_of_image>: the first of the tokens CogVideo adds after icetk's 150,000
    pad_token_id: int = 20003  # icetk's <pad> (its text token 3)
    frame_position_offset: int = field(default=512, metadata={"low": 0})  # position id of frame 0's first token
    layernorm_epsilon: float = 1e-5

    @property
    def text_len(self) -> int:
        return self.layout[0]

    @property
    def frame_len(self) -> int:
        return self.layout[1] - self.layout[0]

    @property
    def frame_resolution(self) -> int:
        return math.isqrt(self.frame_len)

    @property
    def max_frames(self) -> int:
        return (self.layout[2] - self.layout[0]) // self.frame_len

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "CogVideoConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        layout = values.get("layout", cls.layout)
        if isinstance(layout, str):  # SAT's command line form, "64, 464, 2064"
            try:
                layout = [int(x) for x in layout.split(",")]
            except ValueError:
                raise CheckpointError(f"{source}: layout = {layout!r} is not comma-separated integers") from None
        if not (isinstance(layout, list | tuple) and len(layout) == 3):
            raise CheckpointError(f"{source}: layout must be [text, text + frame, text + frames x frame]")
        values["layout"] = tuple(layout)
        missing = sorted(f.name for f in fields(cls) if f.name not in values and f.default is MISSING)
        if missing:
            raise CheckpointError(f"{source}: missing key {missing[0]!r}")
        check_dataclass_config(cls, values, source)
        config = cls(**values)
        text, first, total = config.layout
        if not text < first <= total:
            raise CheckpointError(f"{source}: layout {list(layout)} must be increasing: text < text + frame <= "
                                  "text + frames x frame")
        if raw.get("layernorm_order", "sandwich") != "sandwich":
            raise CheckpointError(f"{source}: layernorm_order = {raw['layernorm_order']!r} is not supported "
                                  "(CogVideo's CogView2 layers use 'sandwich')")
        if raw.get("window_size", -1) != -1 or raw.get("cogvideo_stage", 1) != 1:
            raise CheckpointError(f"{source}: only stage 1 with full temporal attention (window_size = -1) is "
                                  "supported; stage 2's 3D window attention is not")
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        for key in ("boi_token_id", "pad_token_id"):
            if not config.image_vocab_size <= getattr(config, key) < config.vocab_size:
                raise CheckpointError(f"{source}: {key} = {getattr(config, key)} is not a text-side token id "
                                      f"[{config.image_vocab_size}, {config.vocab_size})")
        if config.boi_token_id == config.pad_token_id:
            raise CheckpointError(f"{source}: boi_token_id and pad_token_id are the same id")
        if config.frame_resolution ** 2 != config.frame_len or (config.layout[2] - config.text_len) % config.frame_len:
            raise CheckpointError(f"{source}: layout {list(layout)} does not hold whole square frames")
        # Every position the model looks up must have a row: of text and the first frame, and of later frames.
        for key, rows, needed in (
                ("max_sequence_length", config.max_sequence_length,
                 max(text, config.frame_position_offset + config.frame_len)),
                ("additional_seqlen", config.additional_seqlen, total - first)):
            if rows < needed:
                raise CheckpointError(f"{source}: {key} = {rows} is too small for this layout (needs at least "
                                      f"{needed})")
        return config

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layout": list(self.layout), "layernorm_order": "sandwich", "window_size": -1,
                "cogvideo_stage": 1}


def frame_of(position: torch.Tensor, text_len: int, frame_len: int) -> torch.Tensor:
    """Frame index of each position; -1 for text."""
    return torch.where(position < text_len, -1, (position - text_len) // frame_len)


@functools.lru_cache(maxsize=8)
def _frame_ids(text_len: int, frame_len: int, length: int) -> torch.Tensor:
    return frame_of(torch.arange(length), text_len, frame_len)


def spatial_allowed(queries: torch.Tensor, keys: torch.Tensor, text_len: int, frame_len: int) -> torch.Tensor:
    """[Q, K] bool of the positions ``queries`` and ``keys``: text sees text; a frame token sees text and its own
    frame up to itself."""
    query_frame, key_frame = frame_of(queries, text_len, frame_len), frame_of(keys, text_len, frame_len)
    own_frame = (query_frame[:, None] == key_frame[None, :]) & (keys[None, :] <= queries[:, None]) \
        & (query_frame[:, None] >= 0)
    return (key_frame[None, :] == -1) | own_frame


def temporal_allowed(queries: torch.Tensor, keys: torch.Tensor, text_len: int) -> torch.Tensor:
    """[Q, K] bool: a frame token sees the text and every frame token up to itself."""
    return (keys[None, :] < text_len) | (keys[None, :] <= queries[:, None])


def text_bias(queries: torch.Tensor, keys: torch.Tensor, text_len: int, weight: Any) -> torch.Tensor:
    """[Q, K]: ``weight`` on the scores of frame queries for text keys, else 0 (the pipeline's
    ``log_text_attention_weights``; on text queries, whose keys are all text, it would only shift the softmax)."""
    return ((queries[:, None] >= text_len) & (keys[None, :] < text_len)) * torch.as_tensor(weight)


@functools.lru_cache(maxsize=8)
def spatial_mask(text_len: int, frame_len: int, length: int) -> torch.Tensor:
    """[S, S] bool: ``spatial_allowed`` over a whole sequence."""
    position = torch.arange(length)
    return spatial_allowed(position, position, text_len, frame_len)


@functools.lru_cache(maxsize=8)
def temporal_mask(text_len: int, length: int) -> torch.Tensor:
    """[S - text, S] bool: ``temporal_allowed`` of the frame tokens over a whole sequence."""
    position = torch.arange(length)
    return temporal_allowed(position[text_len:], position, text_len)


def key_mask(text_slots: int, text_len: torch.Tensor, length: int) -> torch.Tensor:
    """[B, S] bool, False at the pads: the text is left-padded, its last ``text_len`` of ``text_slots`` slots are real.

    SAT's ``attention_mask_totxt``; both channels mask these keys for every query.
    """
    position = torch.arange(length, device=text_len.device)
    return position[None, :] >= (text_slots - text_len)[:, None]


def position_ids(config: CogVideoConfig, text_len: torch.Tensor, length: int) -> torch.Tensor:
    """[B, S] position ids as SAT's ``get_masks_and_position_ids_video``: pads 0, the real text 0..L-1, and the
    frame tokens ``frame_position_offset`` on."""
    return position_ids_at(config, text_len, torch.arange(length, device=text_len.device))


def position_ids_at(config: CogVideoConfig, text_len: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, T] the ``position_ids`` of the sequence positions ``positions`` [T] (a step's new tokens, or all)."""
    text_slots = config.text_len
    text = (positions[None, :] - (text_slots - text_len)[:, None]).clamp_min(0)
    return torch.where(positions[None, :] < text_slots, text, config.frame_position_offset + positions - text_slots)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with SAT's masking; q [B, H, Sq, d], k/v [B, H, Sk, d]; (probs, context). ``bias``
    [Sq, Sk] is added to the scores before masking (the pipeline's text weight)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    probs = torch.softmax(torch.where(allowed.to(scores.device), scores, MASKED_SCORE), dim=-1)
    return probs, probs @ v


def cached_attention(fused: nn.Linear, heads: int, hidden_states: torch.Tensor, past: torch.Tensor,
                     allowed: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One channel's attention of new tokens over the past and themselves: ``past`` [B, 2, heads, P, d] holds
    the keys and values of earlier positions; returns (merged context [B, T, heads x d], present
    [B, 2, heads, P + T, d])."""
    q, k, v = split_qkv(fused(hidden_states), heads)
    present = torch.cat([past, torch.stack([k, v], dim=1)], dim=3)
    return merge_heads(masked_attention(q, present[:, 0], present[:, 1], allowed, bias)[1]), present


def split_qkv(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAT's fused projection [B, S, 3 * heads * d] -> q, k, v of [B, heads, S, d] (q, k, v blocks, heads inside)."""
    b, s, width = fused.shape
    qkv = fused.reshape(b, s, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(context: torch.Tensor) -> torch.Tensor:
    b, h, s, d = context.shape
    return context.transpose(1, 2).reshape(b, s, h * d)


class SpatialAttention(nn.Module):
    """CogView2's attention (``transformer.layers.{l}.attention``), returns its dense output for every token."""

    def __init__(self, hidden: int, heads: int, text_len: int, frame_len: int):
        super().__init__()
        self.heads, self.text_len, self.frame_len = heads, text_len, frame_len
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor, keys: torch.Tensor, text_weight: float = 0.0) -> torch.Tensor:
        """``keys``: the [B, S] ``key_mask``; ``text_weight``: ``SamplingTerms.spatial_text_weight``."""
        q, k, v = split_qkv(self.query_key_value(hidden_states), self.heads)
        length = hidden_states.shape[1]
        mask = spatial_mask(self.text_len, self.frame_len, length)
        allowed = mask.to(keys.device) & keys[:, None, None, :]
        position = torch.arange(length)
        bias = text_bias(position, position, self.text_len, text_weight) if text_weight else None
        return self.dense(merge_heads(masked_attention(q, k, v, allowed, bias)[1]))

    def step(self, hidden_states: torch.Tensor, past: torch.Tensor, allowed: torch.Tensor, bias: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """New tokens over the cache (``cached_attention``): (dense output [B, T, C], present)."""
        context, present = cached_attention(self.query_key_value, self.heads, hidden_states, past, allowed, bias)
        return self.dense(context), present


class TemporalMix(nn.Module):
    """What the layer's frame tokens take from the temporal channel, weighted by 1 - sigmoid(attn_distribution).

    Called as ``(hidden_states [B, S, C], keys [B, S])`` (``keys``: the ``key_mask``), returns [B, S - text, C].
    """

    def __init__(self, attn_distribution: torch.Tensor, text_len: int):
        super().__init__()
        self.text_len = text_len
        self.attn_distribution = nn.Parameter(attn_distribution)

    def spatial_weight(self) -> torch.Tensor:
        return torch.sigmoid(self.attn_distribution)

    def step(self, hidden_states: torch.Tensor, past: torch.Tensor | None, allowed: torch.Tensor,
             bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New tokens [B, T, C] over the cache: (weighted output [B, T, C], present or None: no cache)."""
        raise NotImplementedError


class TemporalChannel(TemporalMix):
    """The ``attention_plus`` channel of one layer (stage 1: full causal attention over all frame tokens)."""

    def __init__(self, hidden: int, heads: int, text_len: int, frame_len: int):
        super().__init__(torch.zeros(hidden), text_len)
        self.heads, self.head_dim, self.frame_len = heads, hidden // heads, frame_len
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def attend(self, hidden_states: torch.Tensor, keys: torch.Tensor, text_weight: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities [B, H, S - text, S] and per-head context [B, H, S - text, d] of the frame tokens."""
        q, k, v = split_qkv(self.query_key_value(hidden_states), self.heads)
        length = hidden_states.shape[1]
        allowed = temporal_mask(self.text_len, length).to(keys.device) & keys[:, None, None, :]
        position = torch.arange(length)
        bias = text_bias(position[self.text_len:], position, self.text_len, text_weight) if text_weight else None
        return masked_attention(q[:, :, self.text_len:], k, v, allowed, bias)

    def forward(self, hidden_states: torch.Tensor, keys: torch.Tensor, text_weight: float = 0.0) -> torch.Tensor:
        context = self.attend(hidden_states, keys, text_weight)[1]
        return self.dense(merge_heads(context)) * (1 - self.spatial_weight())

    def step(self, hidden_states, past, allowed, bias):
        context, present = cached_attention(self.query_key_value, self.heads, hidden_states, past, allowed, bias)
        return self.dense(context) * (1 - self.spatial_weight()), present


class RemovedTemporalChannel(TemporalMix):
    """A temporal channel with every head pruned: only ``(1 - sigmoid(a)) * dense.bias`` is left, exactly."""

    def __init__(self, bias: torch.Tensor, attn_distribution: torch.Tensor, text_len: int):
        super().__init__(attn_distribution.detach().clone(), text_len)
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor, keys: torch.Tensor, text_weight: float = 0.0) -> torch.Tensor:
        b, s, c = hidden_states.shape
        return (self.bias * (1 - self.spatial_weight())).expand(b, s - self.text_len, c)

    def step(self, hidden_states, past, allowed, bias):
        return (self.bias * (1 - self.spatial_weight())).expand_as(hidden_states), None


class TemporalChannelHeads(AttentionHeads):
    """Heads of a ``TemporalChannel``: rows h of the q, k and v blocks of the fused ``query_key_value``."""

    module: TemporalChannel

    @property
    def heads(self) -> int:
        return self.module.heads

    @property
    def head_dim(self) -> int:
        return self.module.head_dim

    def projections(self):
        channel = self.module
        return HeadProjections(self.heads, self.head_dim, ((channel.query_key_value, 3),), channel.dense)

    def observe(self, hidden_states, residual_norm, keys, **named):
        """Over the tokens of frames 1 on: stage 1 does not train frame 0 and generates it with the channel off."""
        channel = self.module
        first = channel.text_len + channel.frame_len  # the first token of frame 1
        probs, context = channel.attend(hidden_states, keys)  # [B, H, S1, S], [B, H, S1, d]
        probs, context = probs[:, :, channel.frame_len:], context[:, :, channel.frame_len:]
        per_head = self.projections().output_per_head()  # [H, d, C]
        head_out = torch.einsum("bhsd,hdc->bhsc", context, per_head) * (1 - channel.spatial_weight())
        frame = _frame_ids(channel.text_len, channel.frame_len, hidden_states.shape[1])
        other_frames = ((frame[None, :] >= 0) & (frame[None, :] != frame[first:, None])).to(probs.device)
        cross_probs = probs * other_frames  # on other (earlier) frames
        values = split_qkv(channel.query_key_value(hidden_states), channel.heads)[2]
        cross_out = torch.einsum("bhsd,hdc->bhsc", cross_probs @ values, per_head) * (1 - channel.spatial_weight())
        yield HeadObservation(output_norm=head_out.norm(dim=-1),  # [B, H, S1]
                              residual_norm=residual_norm[:, None, first:],
                              cross_frame_mass=cross_probs.sum(dim=-1),
                              cross_output_norm=cross_out.norm(dim=-1))

    def keep(self, heads):
        channel = self.module
        (channel.query_key_value,), channel.dense = self.projections().kept(heads)
        channel.heads = len(heads)

    def removed(self):
        channel = self.module
        return RemovedTemporalChannel(channel.dense.bias, channel.attn_distribution, channel.text_len)


class CogVideoLayer(nn.Module):
    """One SwissArmyTransformer layer with sandwich LayerNorm and both attention channels."""

    def __init__(self, c: CogVideoConfig):
        super().__init__()
        hidden, eps = c.hidden_size, c.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.attention = SpatialAttention(hidden, c.num_attention_heads, c.text_len, c.frame_len)
        self.temporal: TemporalMix = TemporalChannel(hidden, c.num_attention_heads, c.text_len, c.frame_len)
        self.third_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(hidden, 4 * hidden)
        self.mlp.dense_4h_to_h = nn.Linear(4 * hidden, hidden)
        self.fourth_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, terms: SamplingTerms = TRAINING) -> torch.Tensor:
        h = self.input_layernorm(x)
        spatial = self.attention(h, keys, terms.spatial_text_weight)
        text_len, frame_len = self.temporal.text_len, self.attention.frame_len
        frames = spatial[:, text_len:] * self.temporal.spatial_weight() \
            + self.temporal(h, keys, text_weight=terms.temporal_text_weight)
        if not terms.frame0_temporal:  # the pipeline's enforce_no_swin: frame 0 from the spatial channel alone
            frames = torch.cat([spatial[:, text_len:text_len + frame_len], frames[:, frame_len:]], dim=1)
        return self.feed_forward(x, torch.cat([spatial[:, :text_len], frames], dim=1))

    def feed_forward(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after both channels: residual through the sandwich norm, then the MLP."""
        x = x + self.third_layernorm(attended)
        mlp = self.mlp.dense_4h_to_h(F.gelu(self.mlp.dense_h_to_4h(self.post_attention_layernorm(x)),
                                            approximate="tanh"))
        return x + self.fourth_layernorm(mlp)


class Vocabulary(nn.Module):
    """SAT's ``word_embeddings.weight`` [vocab, hidden], held as its image rows (icetk's image tokens) and the rest.

    The embedding reads every row, the logits the image rows only; as one table, the exported graph would hold
    the image rows twice (a slice of a constant folds into a second constant).
    """

    def __init__(self, vocab_size: int, image_vocab_size: int, hidden: int):
        super().__init__()
        self.image = nn.Parameter(torch.empty(image_vocab_size, hidden))
        self.text = nn.Parameter(torch.empty(vocab_size - image_vocab_size, hidden))


class CogVideoModel(nn.Module):
    """(tokens [B, S], text_len [B]) -> logits [B, S - text, image_vocab]: row j is position text + j's prediction
    of image token j (the layout is in the module's docstring).

    Position ids as CogVideo's stage 1: text 0..L-1 after pads at 0, frame tokens from ``frame_position_offset``
    on; the text and the first frame read CogView2's table, later frames the extra table.
    """

    def __init__(self, config: CogVideoConfig):
        super().__init__()
        self.config = config
        c = config
        self.transformer = nn.Module()
        self.transformer.word_embeddings = Vocabulary(c.vocab_size, c.image_vocab_size, c.hidden_size)
        self.transformer.position_embeddings = nn.Embedding(c.max_sequence_length, c.hidden_size)
        self.transformer.layers = nn.ModuleList(CogVideoLayer(c) for _ in range(c.num_layers))
        self.transformer.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_epsilon)
        self.extra_position_embeddings = nn.Embedding(c.additional_seqlen, c.hidden_size)
        # Fresh weights: SAT's N(0, 0.02), and random biases and mixing weights rather than zeros, so that a
        # preset exercises every term (and no two tensors are identical, which the ONNX exporter would merge).
        # The tied vocabulary table is at unit scale so that logits spread as a trained model's do, instead of
        # being near-uniform (which would make top-1 agreement a coin toss).
        for name, parameter in self.named_parameters():
            if name.endswith("attn_distribution") or ".word_embeddings." in name:
                nn.init.normal_(parameter)
            elif "layernorm" not in name:
                nn.init.normal_(parameter, std=0.02)

    def position_embeddings(self, text_len: torch.Tensor, length: int) -> torch.Tensor:
        """[B, S, C]: SAT's ``position_embedding_forward`` of ``position_ids``."""
        return self.position_embeddings_at(text_len, torch.arange(length, device=text_len.device))

    def position_embeddings_at(self, text_len: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, C] of the sequence positions ``positions`` [T] (a step's tokens, or all): the text and the first
        frame read CogView2's table, later frames the extra one."""
        c = self.config
        ids = position_ids_at(c, text_len, positions)
        first_table = positions < c.text_len + c.frame_len
        cogview = self.transformer.position_embeddings(torch.where(first_table, ids, 0))
        extra = self.extra_position_embeddings((ids - (c.frame_position_offset + c.frame_len)).clamp_min(0))
        return torch.where(first_table[None, :, None], cogview, extra)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, S, C] word embeddings of image and text ids.

        The embedding is tied to the output layer. Both read the same transposed tables, so the exported graph
        holds every row once (an embedding lookup plus F.linear would fold into two copies)."""
        c = self.config
        image = self.transformer.word_embeddings.image.t()  # [hidden, image_vocab]
        text = self.transformer.word_embeddings.text.t()  # [hidden, vocab - image_vocab]
        flat = tokens.flatten()
        is_image = flat < c.image_vocab_size
        rows = torch.where(is_image, image.index_select(1, flat.clamp(max=c.image_vocab_size - 1)),
                           text.index_select(1, (flat - c.image_vocab_size).clamp(min=0)))
        return rows.t().reshape(*tokens.shape, -1)

    def image_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden states -> logits over the image vocabulary (the tied table's image rows)."""
        return self.transformer.final_layernorm(hidden_states) @ self.transformer.word_embeddings.image.t()

    def forward(self, tokens: torch.Tensor, text_len: torch.Tensor) -> torch.Tensor:
        return self.logits(tokens, text_len, TRAINING)

    def logits(self, tokens: torch.Tensor, text_len: torch.Tensor, terms: SamplingTerms) -> torch.Tensor:
        """The forward under ``terms``: training's, or the pipeline's sampling conventions for the whole sequence
        at once (``incremental.CogVideoStep`` computes them token by token)."""
        length, c = tokens.shape[1], self.config
        x = self.embed(tokens) + self.position_embeddings(text_len, length)
        keys = key_mask(c.text_len, text_len, length)
        for layer in self.transformer.layers:
            x = layer(x, keys, terms)
        # Position text_len + j holds BOI or image token j - 1 and predicts image token j (training's
        # logits[:, text_len:, :num_image_tokens]).
        return self.image_logits(x[:, c.text_len:])
