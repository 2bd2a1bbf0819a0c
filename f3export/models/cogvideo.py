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

Checkpoints are SwissArmyTransformer folders: ``model_config.json`` (SAT
arguments), ``latest`` (the iteration) and ``<iter>/mp_rank_00_model_states.pt``
holding ``{'module': state_dict}`` with SAT's key names. The module tree here
keeps SAT's names for everything but the mixins, which live inside each layer
(``SAT_MIXIN_KEYS`` maps them both ways), so a layer owns its temporal channel.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import atomic_path
from ..errors import CheckpointError, RecipeError
from ..weights import NUMPY_ARRAY_GLOBALS, load_into, load_state_dict, read_json
from .attention import AttentionHeads, head_index, head_weight_norms, keep_columns, keep_rows
from .base import ExportSpec, FidelityGate, ModelAdapter, ModelBundle, Run, TemporalSite, Trajectory, cosine
from .configs import check_dataclass_config

MASKED_SCORE = -10000.0  # SwissArmyTransformer's value for masked attention scores

SAT_CONFIG = "model_config.json"
SAT_LATEST = "latest"
SAT_WEIGHTS = "mp_rank_00_model_states.pt"

# (SAT key prefix, our key prefix); {l} is the layer index. All other keys are the same in both.
SAT_MIXIN_KEYS = (
    ("mixins.attention_plus.query_key_value.{l}.", "transformer.layers.{l}.temporal.query_key_value."),
    ("mixins.attention_plus.dense.{l}.", "transformer.layers.{l}.temporal.dense."),
    ("mixins.attention_plus.attn_distribution.{l}", "transformer.layers.{l}.temporal.attn_distribution"),
    ("mixins.extra_position_embedding.position_embeddings.", "extra_position_embeddings."),
)
# SAT's one vocabulary table; here its image rows and the rest (``Vocabulary``).
SAT_VOCABULARY = "transformer.word_embeddings.weight"
VOCABULARY_PARTS = ("transformer.word_embeddings.image", "transformer.word_embeddings.text")


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


@functools.lru_cache(maxsize=8)
def _frame_ids(text_len: int, frame_len: int, length: int) -> torch.Tensor:
    """Frame index of every token; -1 for text."""
    position = torch.arange(length)
    return torch.where(position < text_len, -1, (position - text_len) // frame_len)


@functools.lru_cache(maxsize=8)
def spatial_mask(text_len: int, frame_len: int, length: int) -> torch.Tensor:
    """[S, S] bool: text sees text; a frame token sees text and its own frame up to itself."""
    frame = _frame_ids(text_len, frame_len, length)
    position = torch.arange(length)
    to_text = (frame[None, :] == -1).expand(length, length)
    own_frame = (frame[:, None] == frame[None, :]) & (position[None, :] <= position[:, None]) & (frame[:, None] >= 0)
    return to_text | own_frame


@functools.lru_cache(maxsize=8)
def temporal_mask(text_len: int, length: int) -> torch.Tensor:
    """[S - text, S] bool: a frame token sees the text and every frame token up to itself."""
    position = torch.arange(length)
    query = position[text_len:, None]
    return (position[None, :] < text_len) | (position[None, :] <= query)


def key_mask(text_slots: int, text_len: torch.Tensor, length: int) -> torch.Tensor:
    """[B, S] bool, False at the pads: the text is left-padded, its last ``text_len`` of ``text_slots`` slots are real.

    SAT's ``attention_mask_totxt``; both channels mask these keys for every query.
    """
    position = torch.arange(length, device=text_len.device)
    return position[None, :] >= (text_slots - text_len)[:, None]


def position_ids(config: CogVideoConfig, text_len: torch.Tensor, length: int) -> torch.Tensor:
    """[B, S] position ids as SAT's ``get_masks_and_position_ids_video``: pads 0, the real text 0..L-1, and the
    frame tokens ``frame_position_offset`` on."""
    text_slots = config.text_len
    text = (torch.arange(text_slots, device=text_len.device)[None, :] - (text_slots - text_len)[:, None]).clamp_min(0)
    frames = config.frame_position_offset + torch.arange(length - text_slots, device=text_len.device)
    return torch.cat([text, frames.expand(text.shape[0], -1)], dim=1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with SAT's masking; q [B, H, Sq, d], k/v [B, H, Sk, d]; (probs, context)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(torch.where(allowed.to(scores.device), scores, MASKED_SCORE), dim=-1)
    return probs, probs @ v


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

    def forward(self, hidden_states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``keys``: the [B, S] ``key_mask``."""
        q, k, v = split_qkv(self.query_key_value(hidden_states), self.heads)
        mask = spatial_mask(self.text_len, self.frame_len, hidden_states.shape[1])
        allowed = mask.to(keys.device) & keys[:, None, None, :]
        return self.dense(merge_heads(masked_attention(q, k, v, allowed)[1]))


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


class TemporalChannel(TemporalMix):
    """The ``attention_plus`` channel of one layer (stage 1: full causal attention over all frame tokens)."""

    def __init__(self, hidden: int, heads: int, text_len: int, frame_len: int):
        super().__init__(torch.zeros(hidden), text_len)
        self.heads, self.head_dim, self.frame_len = heads, hidden // heads, frame_len
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def attend(self, hidden_states: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities [B, H, S - text, S] and per-head context [B, H, S - text, d] of the frame tokens."""
        q, k, v = split_qkv(self.query_key_value(hidden_states), self.heads)
        allowed = temporal_mask(self.text_len, hidden_states.shape[1]).to(keys.device) & keys[:, None, None, :]
        return masked_attention(q[:, :, self.text_len:], k, v, allowed)

    def forward(self, hidden_states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self.dense(merge_heads(self.attend(hidden_states, keys)[1])) * (1 - self.spatial_weight())


class RemovedTemporalChannel(TemporalMix):
    """A temporal channel with every head pruned: only ``(1 - sigmoid(a)) * dense.bias`` is left, exactly."""

    def __init__(self, bias: torch.Tensor, attn_distribution: torch.Tensor, text_len: int):
        super().__init__(attn_distribution.detach().clone(), text_len)
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        b, s, c = hidden_states.shape
        return (self.bias * (1 - self.spatial_weight())).expand(b, s - self.text_len, c)


class TemporalChannelHeads(AttentionHeads):
    """Heads of a ``TemporalChannel``: rows h of the q, k and v blocks of the fused ``query_key_value``."""

    module: TemporalChannel

    @property
    def heads(self) -> int:
        return self.module.heads

    @property
    def head_dim(self) -> int:
        return self.module.head_dim

    def _fused_index(self, heads: list[int]) -> torch.Tensor:
        block = self.heads * self.head_dim
        return torch.cat([head_index(self.head_dim, heads, offset) for offset in (0, block, 2 * block)])

    @torch.no_grad()
    def statistics(self, hidden_states, residual_norm, keys):
        """Over the tokens of frames 1 on: stage 1 does not train frame 0 and generates it with the channel off."""
        channel = self.module
        first = channel.text_len + channel.frame_len  # the first token of frame 1
        probs, context = channel.attend(hidden_states, keys)  # [B, H, S1, S], [B, H, S1, d]
        probs, context = probs[:, :, channel.frame_len:], context[:, :, channel.frame_len:]
        weight = channel.dense.weight  # [C, H * d]
        per_head = weight.reshape(weight.shape[0], self.heads, -1).permute(1, 2, 0)  # [H, d, C]
        head_out = torch.einsum("bhsd,hdc->bhsc", context, per_head) * (1 - channel.spatial_weight())
        ratio = head_out.norm(dim=-1) / residual_norm[:, None, first:].clamp_min(1e-12)
        frame = _frame_ids(channel.text_len, channel.frame_len, hidden_states.shape[1])
        other_frames = ((frame[None, :] >= 0) & (frame[None, :] != frame[first:, None])).to(probs.device)
        mixing = (probs * other_frames).sum(dim=-1)  # [B, H, S1]: attention mass on other (earlier) frames
        tokens = probs.shape[0] * probs.shape[2]
        return ratio.sum(dim=(0, 2)).double(), mixing.sum(dim=(0, 2)).double(), tokens

    def magnitude(self):
        fused = self.module.query_key_value.weight
        return head_weight_norms(self.heads, list(fused.chunk(3, dim=0)), self.module.dense.weight)

    def keep(self, heads):
        channel = self.module
        channel.query_key_value = keep_rows(channel.query_key_value, self._fused_index(heads))
        channel.dense = keep_columns(channel.dense, head_index(self.head_dim, heads))
        channel.heads = len(heads)

    @torch.no_grad()
    def mask(self, heads):
        self.module.dense.weight[:, head_index(self.head_dim, heads)] = 0.0

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

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        spatial = self.attention(h, keys)
        text_len = self.temporal.text_len
        frames = spatial[:, text_len:] * self.temporal.spatial_weight() + self.temporal(h, keys)
        x = x + self.third_layernorm(torch.cat([spatial[:, :text_len], frames], dim=1))
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
        c = self.config
        ids = position_ids(c, text_len, length).to(self.transformer.position_embeddings.weight.device)
        first = c.text_len + c.frame_len  # the text and the first frame read CogView2's table, later frames the extra
        embeddings = self.transformer.position_embeddings(ids[:, :first])
        if length > first:
            extra = self.extra_position_embeddings(ids[:, first:] - (c.frame_position_offset + c.frame_len))
            embeddings = torch.cat([embeddings, extra], dim=1)
        return embeddings

    def forward(self, tokens: torch.Tensor, text_len: torch.Tensor) -> torch.Tensor:
        (batch, length), c = tokens.shape, self.config
        # The embedding is tied to the output layer. Both read the same transposed tables, so the exported graph
        # holds every row once (an embedding lookup plus F.linear would fold into two copies).
        image = self.transformer.word_embeddings.image.t()  # [hidden, image_vocab]
        text = self.transformer.word_embeddings.text.t()  # [hidden, vocab - image_vocab]
        flat = tokens.flatten()
        is_image = flat < c.image_vocab_size
        rows = torch.where(is_image, image.index_select(1, flat.clamp(max=c.image_vocab_size - 1)),
                           text.index_select(1, (flat - c.image_vocab_size).clamp(min=0)))
        x = rows.t().reshape(batch, length, -1) + self.position_embeddings(text_len, length)
        keys = key_mask(c.text_len, text_len, length)
        for layer in self.transformer.layers:
            x = layer(x, keys)
        # Position text_len + j holds BOI or image token j - 1 and predicts image token j (training's
        # logits[:, text_len:, :num_image_tokens]).
        return self.transformer.final_layernorm(x[:, c.text_len:]) @ image


# -- SwissArmyTransformer checkpoint folders ---------------------------------------------------------


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for source, target in pairs:
        match = re.match(re.escape(source).replace(re.escape("{l}"), r"(?P<l>\d+)"), key)
        if match:
            return target.format(l=match.groupdict().get("l", "")) + key[match.end():]
    return key


def sat_to_ours(key: str) -> str:
    return _rename(key, list(SAT_MIXIN_KEYS))


def ours_to_sat(key: str) -> str:
    return _rename(key, [(ours, sat) for sat, ours in SAT_MIXIN_KEYS])


def sat_weights_path(folder: Path) -> Path:
    latest = folder / SAT_LATEST
    if not latest.is_file():
        raise CheckpointError(f"{folder}: no '{SAT_LATEST}' file (a SwissArmyTransformer checkpoint folder has "
                              f"{SAT_CONFIG}, {SAT_LATEST} and <iteration>/{SAT_WEIGHTS})")
    iteration = latest.read_text().strip()
    path = folder / iteration / SAT_WEIGHTS
    if not iteration or "/" in iteration or not path.is_file():
        raise CheckpointError(f"{latest}: names iteration {iteration!r}, but {path} does not exist")
    return path


def read_sat_state(path: Path, image_vocab_size: int) -> dict[str, torch.Tensor]:
    """The ``module`` state dict of a SAT checkpoint, renamed to our keys and made float32.

    The file may hold what SAT's ``save_checkpoint`` stores beside it (iteration, numpy/torch RNG states,
    lr-scheduler and optimizer state): it is unpickled without code and left unused.
    """
    checkpoint = load_state_dict(path, container_key="module", allowed_globals=NUMPY_ARRAY_GLOBALS)
    state = {sat_to_ours(k): v.float() for k, v in checkpoint.items()}
    if SAT_VOCABULARY not in state:
        raise CheckpointError(f"{path}: missing key {SAT_VOCABULARY!r}")
    table = state.pop(SAT_VOCABULARY)
    state[VOCABULARY_PARTS[0]], state[VOCABULARY_PARTS[1]] = table[:image_vocab_size], table[image_vocab_size:]
    return state


def save_sat(model: CogVideoModel, folder: Path, iteration: int = 1) -> None:
    """Write ``model`` as a SwissArmyTransformer checkpoint folder (SAT key names)."""
    weights = folder / str(iteration) / SAT_WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {ours_to_sat(k): v.detach().clone() for k, v in model.state_dict().items()}
    state[SAT_VOCABULARY] = torch.cat([state.pop(part) for part in VOCABULARY_PARTS])
    with atomic_path(weights) as tmp:
        torch.save({"module": state}, tmp)
    with atomic_path(folder / SAT_CONFIG) as tmp:
        tmp.write_text(json.dumps(model.config.to_dict(), indent=2))
    with atomic_path(folder / SAT_LATEST) as tmp:
        tmp.write_text(str(iteration))


# -- the adapter -------------------------------------------------------------------------------------


def seeded_sequence(config: CogVideoConfig, frames: int, prompt: str, seed: int) -> tuple[torch.Tensor, int]:
    """CogVideo's input layout with stand-in ids, when no real tokens are given: (tokens [S], text length).

    The prompt seeds a text of 1..text_len tokens, left-padded; the seed the image tokens of every frame block,
    which starts with BOI.
    """
    c = config
    text_rng = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little"))
    text_len = int(torch.randint(1, c.text_len + 1, (), generator=text_rng))
    text_ids = torch.arange(c.image_vocab_size, c.vocab_size)
    text_ids = text_ids[(text_ids != c.boi_token_id) & (text_ids != c.pad_token_id)]
    text = text_ids[torch.randint(len(text_ids), (text_len,), generator=text_rng)]
    image_rng = torch.Generator().manual_seed(seed)
    images = torch.randint(0, c.image_vocab_size, (frames, c.frame_len - 1), generator=image_rng)
    blocks = torch.cat([torch.full((frames, 1), c.boi_token_id), images], dim=1)
    return torch.cat([torch.full((c.text_len - text_len,), c.pad_token_id), text, blocks.flatten()]), text_len


def read_sequence(config: CogVideoConfig, frames: int, tokens: np.ndarray, source: str) -> tuple[torch.Tensor, int]:
    """A token file's row, checked against CogVideo's layout: (tokens [S], text length after the leading pads)."""
    c = config
    length = c.text_len + frames * c.frame_len
    if len(tokens) != length:
        raise RecipeError(f"{source}: {len(tokens)} tokens, but the recipe's shape ({frames} frames) needs {length}")
    if tokens.min() < 0 or tokens.max() >= c.vocab_size:
        raise RecipeError(f"{source}: token ids must lie in [0, {c.vocab_size})")
    pads = tokens[:c.text_len] == c.pad_token_id
    leading = c.text_len if pads.all() else int(pads.argmin())
    if pads[leading:].any():
        raise RecipeError(f"{source}: <pad> ({c.pad_token_id}) at position {leading + int(pads[leading:].argmax())}, "
                          "after the text began: CogVideo's text is left-padded")
    blocks = tokens[c.text_len:].reshape(frames, c.frame_len)
    without_boi = np.flatnonzero(blocks[:, 0] != c.boi_token_id)
    if without_boi.size:
        frame = without_boi[0]
        raise RecipeError(f"{source}: position {c.text_len + frame * c.frame_len} (frame {frame}'s first) holds "
                          f"{blocks[frame, 0]}, not <start_of_image> ({c.boi_token_id}), which begins every frame")
    not_image = np.argwhere(blocks[:, 1:] >= c.image_vocab_size)
    if not_image.size:
        frame, index = not_image[0]
        raise RecipeError(f"{source}: position {c.text_len + frame * c.frame_len + 1 + index} holds "
                          f"{blocks[frame, 1 + index]}, not an image token (< {c.image_vocab_size})")
    return torch.from_numpy(tokens), c.text_len - leading


# The real sizes: CogView2's 48 x 3072 transformer with 48 heads, 64 text tokens + 5 frames of 20 x 20.
FULL_SIZE = {"num_layers": 48, "hidden_size": 3072, "num_attention_heads": 48, "vocab_size": 150010,
             "image_vocab_size": 20000, "boi_token_id": 150000, "pad_token_id": 20003, "layout": [64, 464, 2064],
             "max_sequence_length": 912, "additional_seqlen": 2000, "frame_position_offset": 512}


class CogVideoAdapter(ModelAdapter):
    family = "cogvideo"
    presets = {
        "tiny": {"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 320,
                 "image_vocab_size": 256, "boi_token_id": 310, "pad_token_id": 259, "layout": [8, 72, 328],
                 "max_sequence_length": 80, "additional_seqlen": 256, "frame_position_offset": 16},
        "full": FULL_SIZE,
        # The full preset with 3 of its 48 layers, for machines that cannot hold its 31 GB of fp32 weights:
        # each layer's arithmetic (and its speedup from pruning) is the real one.
        "full-3-layers": {**FULL_SIZE, "num_layers": 3},
    }
    # The masks and position ids are fixed by the sequence layout; only the batch may vary.
    fixed_axes = ("frames", "height", "width")
    run_keys = ("tokens",)
    fidelity_gates = (FidelityGate("logit_cosine", "pruning_min_logit_cosine"),
                      FidelityGate("top1_agreement", "pruning_min_top1_agreement"))
    calibration_note = ("temporal statistics over the tokens of frames 1 on: CogVideo's stage 1 masks frame 0 "
                        "out of its loss and generates it with the temporal channel off")

    def build(self, config):
        return CogVideoModel(CogVideoConfig.from_dict(config, "config"))

    def weights_files(self, folder):
        return [folder / SAT_CONFIG, folder / SAT_LATEST, sat_weights_path(folder)]

    def folder_config(self, folder):
        return CogVideoConfig.from_dict(read_json(folder / SAT_CONFIG), str(folder / SAT_CONFIG)).to_dict()

    def load_folder(self, folder):
        config = self.folder_config(folder)
        model = self.build(config).eval()
        weights = sat_weights_path(folder)
        load_into(model, read_sat_state(weights, model.config.image_vocab_size), weights)
        return ModelBundle(self.family, model, config, f"checkpoint {folder}", random_weights=False)

    def temporal_sites(self, model):
        return [TemporalSite(f"transformer.layers.{i}.temporal", f"transformer.layers.{i}.input_layernorm",
                             shared_norm=True, access=TemporalChannelHeads)
                for i in range(model.config.num_layers)]

    def shape_error(self, model, shape):
        c = model.config
        if (shape.latent_height, shape.latent_width) != (c.frame_resolution, c.frame_resolution):
            return (f"latent_height/latent_width = {shape.latent_height}x{shape.latent_width}, but CogVideo frames "
                    f"are {c.frame_resolution}x{c.frame_resolution} image tokens")
        if shape.frames > c.max_frames:
            return f"frames = {shape.frames}, but the model's layout holds at most {c.max_frames} frames"
        if shape.frames < 2:
            return (f"frames = {shape.frames}, but CogVideo's temporal channel acts from frame 1 on (stage 1 "
                    "generates frame 0 without it): at least 2 frames")
        return None

    def conventions(self, bundle):
        c = CogVideoConfig.from_dict(bundle.config, "config")
        return {
            "kind": "autoregressive token transformer: logits = model(tokens, text_len), one full-sequence forward "
                    "(teacher forcing, as CogVideo trains)",
            "tokens": f"int64 [batch, {c.text_len} + frames x {c.frame_len}]: the text left-padded to {c.text_len} "
                      f"slots (text ids >= {c.image_vocab_size}; the pad slots' ids are ignored), then per frame a "
                      f"block of {c.frame_len}: <start_of_image> ({c.boi_token_id}) followed by the frame's image "
                      f"tokens 0..{c.frame_len - 2} (ids < {c.image_vocab_size}, "
                      f"{c.frame_resolution}x{c.frame_resolution} row by row); its last token is never an input",
            "text_len": f"int64 [batch]: the real text length L (0..{c.text_len}); the first {c.text_len} - L slots "
                        "are pads, masked out of both attention channels, position id 0; the text takes 0..L-1, "
                        f"frame tokens {c.frame_position_offset} on",
            "logits": f"float32 [batch, frames x {c.frame_len}, {c.image_vocab_size}]: row j is position "
                      f"{c.text_len} + j's prediction of image token j (frame j // {c.frame_len}, token "
                      f"j % {c.frame_len}), over the image vocabulary only; causal masks: each row sees its prefix",
            "frame_0": "stage 1 generates frame 0 with the temporal channel off; calibration and pruning fidelity "
                       "read frames 1 on",
            "layout": list(c.layout), "vocab_size": c.vocab_size, "image_vocab_size": c.image_vocab_size,
            "boi_token_id": c.boi_token_id, "pad_token_id": c.pad_token_id,
        }

    def export_spec(self, model, shape, batch, dynamic, seed=0):
        rows = [seeded_sequence(model.config, shape.frames, f"export {seed} row {i}", seed * 1000 + i)
                for i in range(batch)]
        inputs = {"tokens": torch.stack([tokens for tokens, _ in rows]),
                  "text_len": torch.tensor([text_len for _, text_len in rows])}
        axes = {name: {0: "batch"} for name in [*inputs, "logits"]} if "batch" in dynamic else {}
        return ExportSpec(inputs, ["logits"], axes)

    def runs(self, section):
        if section.tokens is None:
            return super().runs(section)
        path = Path(section.tokens)
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{path}: not a readable .npy file ({str(exc).splitlines()[0]})") from None
        if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
            raise RecipeError(f"{path}: expected a non-empty 2-D integer array [runs, sequence], "
                              f"got {rows.dtype} {list(rows.shape)}")
        return [Run(f"{path.name}[{i}]", i, row.astype(np.int64)) for i, row in enumerate(rows)]

    def run_steps(self, steps):
        return 1  # one full-sequence forward: causal masks give every position its prefix's result at once

    @torch.no_grad()
    def trajectory(self, bundle, model, run, shape, steps, guidance_scale, on_step=None):
        config = model.config
        if run.tokens is None:
            tokens, text_len = seeded_sequence(config, shape.frames, run.prompt, run.seed)
        else:
            tokens, text_len = read_sequence(config, shape.frames, run.tokens, run.prompt)
        if on_step is not None:
            on_step(0)
        logits = model(tokens[None], torch.tensor([text_len]))
        return Trajectory(list(logits.split(config.frame_len, dim=1)), logits, [0])  # outputs: one per frame

    def fidelity(self, reference, candidate):
        """Image-vocabulary logits of frames 1 on (stage 1 generates frame 0 with the temporal channel off)."""
        frames, reference_frames = candidate.outputs[1:], reference.outputs[1:]
        same = torch.cat(frames, dim=1).argmax(-1) == torch.cat(reference_frames, dim=1).argmax(-1)
        return {"logit_cosine": [cosine(c, r) for c, r in zip(frames, reference_frames)],
                "top1_agreement": same.double().mean().item()}
