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
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import atomic_path
from ..errors import CheckpointError, RecipeError
from ..weights import load_into, load_state_dict, read_json
from .attention import AttentionHeads, head_index, head_weight_norms, keep_columns, keep_rows
from .base import ExportSpec, FidelityGate, ModelAdapter, ModelBundle, Run, TemporalSite, Trajectory, cosine

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


@dataclass(frozen=True)
class CogVideoConfig:
    """SwissArmyTransformer's argument names where it has them (``layout`` = [text, text + frame, text + all frames])."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int  # rows of the CogView2 position table (text and the first frame)
    layout: tuple[int, int, int] = (64, 464, 2064)  # CogVideo's defaults from here on
    additional_seqlen: int = 2000  # rows of the extra position table (every later frame)
    image_vocab_size: int = 20000  # icetk: image tokens are ids [0, 20000), text tokens follow
    frame_position_offset: int = 512  # position id of the first frame's first token
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
            layout = [int(x) for x in layout.split(",")]
        if not (isinstance(layout, list | tuple) and len(layout) == 3):
            raise CheckpointError(f"{source}: layout must be [text, text + frame, text + frames x frame]")
        values["layout"] = tuple(layout)
        missing = sorted(f.name for f in fields(cls) if f.name not in values and f.default is MISSING)
        if missing:
            raise CheckpointError(f"{source}: missing key {missing[0]!r}")
        config = cls(**values)
        if raw.get("layernorm_order", "sandwich") != "sandwich":
            raise CheckpointError(f"{source}: layernorm_order = {raw['layernorm_order']!r} is not supported "
                                  "(CogVideo's CogView2 layers use 'sandwich')")
        if raw.get("window_size", -1) != -1 or raw.get("cogvideo_stage", 1) != 1:
            raise CheckpointError(f"{source}: only stage 1 with full temporal attention (window_size = -1) is "
                                  "supported; stage 2's 3D window attention is not")
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        if config.frame_resolution ** 2 != config.frame_len or (config.layout[2] - config.text_len) % config.frame_len:
            raise CheckpointError(f"{source}: layout {list(layout)} does not hold whole square frames")
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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = split_qkv(self.query_key_value(hidden_states), self.heads)
        allowed = spatial_mask(self.text_len, self.frame_len, hidden_states.shape[1])
        return self.dense(merge_heads(masked_attention(q, k, v, allowed)[1]))


class TemporalMix(nn.Module):
    """What the layer's frame tokens take from the temporal channel, weighted by 1 - sigmoid(attn_distribution)."""

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

    def attend(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities [B, H, S - text, S] and per-head context [B, H, S - text, d] of the frame tokens."""
        q, k, v = split_qkv(self.query_key_value(hidden_states), self.heads)
        allowed = temporal_mask(self.text_len, hidden_states.shape[1])
        return masked_attention(q[:, :, self.text_len:], k, v, allowed)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(merge_heads(self.attend(hidden_states)[1])) * (1 - self.spatial_weight())


class RemovedTemporalChannel(TemporalMix):
    """A temporal channel with every head pruned: only ``(1 - sigmoid(a)) * dense.bias`` is left, exactly."""

    def __init__(self, bias: torch.Tensor, attn_distribution: torch.Tensor, text_len: int):
        super().__init__(attn_distribution.detach().clone(), text_len)
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
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
    def statistics(self, hidden_states, residual_norm):
        channel = self.module
        text_len = channel.text_len
        probs, context = channel.attend(hidden_states)  # [B, H, S1, S], [B, H, S1, d]
        weight = channel.dense.weight  # [C, H * d]
        per_head = weight.reshape(weight.shape[0], self.heads, -1).permute(1, 2, 0)  # [H, d, C]
        head_out = torch.einsum("bhsd,hdc->bhsc", context, per_head) * (1 - channel.spatial_weight())
        ratio = head_out.norm(dim=-1) / residual_norm[:, None, text_len:].clamp_min(1e-12)
        frame = _frame_ids(text_len, channel.frame_len, hidden_states.shape[1])
        other_frames = ((frame[None, :] >= 0) & (frame[None, :] != frame[text_len:, None])).to(probs.device)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        spatial = self.attention(h)
        text_len = self.temporal.text_len
        frames = spatial[:, text_len:] * self.temporal.spatial_weight() + self.temporal(h)
        x = x + self.third_layernorm(torch.cat([spatial[:, :text_len], frames], dim=1))
        mlp = self.mlp.dense_4h_to_h(F.gelu(self.mlp.dense_h_to_4h(self.post_attention_layernorm(x)),
                                            approximate="tanh"))
        return x + self.fourth_layernorm(mlp)


class CogVideoModel(nn.Module):
    """tokens [B, text + frames x frame_len] -> logits [B, frames x frame_len, vocab] predicting every image token.

    Position ids as CogVideo's stage 1: text 0..T-1, frame tokens from ``frame_position_offset`` on; the text
    and the first frame read CogView2's table, later frames the extra table.
    """

    def __init__(self, config: CogVideoConfig):
        super().__init__()
        self.config = config
        c = config
        self.transformer = nn.Module()
        self.transformer.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.transformer.position_embeddings = nn.Embedding(c.max_sequence_length, c.hidden_size)
        self.transformer.layers = nn.ModuleList(CogVideoLayer(c) for _ in range(c.num_layers))
        self.transformer.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_epsilon)
        self.extra_position_embeddings = nn.Embedding(c.additional_seqlen, c.hidden_size)
        # Fresh weights: SAT's N(0, 0.02), and random biases and mixing weights rather than zeros, so that a
        # preset exercises every term (and no two tensors are identical, which the ONNX exporter would merge).
        # The tied vocabulary table is at unit scale so that logits spread as a trained model's do, instead of
        # being near-uniform (which would make top-1 agreement a coin toss).
        for name, parameter in self.named_parameters():
            if name.endswith("attn_distribution") or name.endswith("word_embeddings.weight"):
                nn.init.normal_(parameter)
            elif "layernorm" not in name:
                nn.init.normal_(parameter, std=0.02)

    def position_embeddings(self, length: int) -> torch.Tensor:
        c = self.config
        first = min(length, c.text_len + c.frame_len)
        ids = torch.cat([torch.arange(c.text_len), c.frame_position_offset + torch.arange(first - c.text_len)])
        table = self.transformer.position_embeddings
        embeddings = table(ids.to(table.weight.device))
        if length > first:
            extra = self.extra_position_embeddings
            embeddings = torch.cat([embeddings, extra(torch.arange(length - first, device=extra.weight.device))])
        return embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        (batch, length), text_len = tokens.shape, self.config.text_len
        # The embedding is tied to the output layer. Both read one transposed table, so the exported graph
        # holds the vocabulary matrix once (an embedding lookup plus F.linear would fold into two copies).
        table = self.transformer.word_embeddings.weight.t()  # [hidden, vocab]
        x = table.index_select(1, tokens.flatten()).t().reshape(batch, length, -1)
        x = x + self.position_embeddings(length)
        for layer in self.transformer.layers:
            x = layer(x)
        # Position i predicts token i + 1: the image tokens are predicted at text_len - 1 ... length - 2.
        return self.transformer.final_layernorm(x[:, text_len - 1:length - 1]) @ table


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


def read_sat_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``module`` state dict of a SAT checkpoint, renamed to our keys and made float32."""
    checkpoint = load_state_dict(path, container_key="module")
    return {sat_to_ours(k): v.float() for k, v in checkpoint.items()}


def save_sat(model: CogVideoModel, folder: Path, iteration: int = 1) -> None:
    """Write ``model`` as a SwissArmyTransformer checkpoint folder (SAT key names)."""
    weights = folder / str(iteration) / SAT_WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {ours_to_sat(k): v.detach().clone() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        torch.save({"module": state}, tmp)
    with atomic_path(folder / SAT_CONFIG) as tmp:
        tmp.write_text(json.dumps(model.config.to_dict(), indent=2))
    with atomic_path(folder / SAT_LATEST) as tmp:
        tmp.write_text(str(iteration))


# -- the adapter -------------------------------------------------------------------------------------


def seeded_tokens(config: CogVideoConfig, frames: int, prompt: str, seed: int) -> torch.Tensor:
    """A sequence with the real layout when no real tokens are given: text ids from the prompt, image ids from the seed."""
    text_seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    text = torch.randint(config.image_vocab_size, config.vocab_size, (config.text_len,),
                         generator=torch.Generator().manual_seed(text_seed))
    images = torch.randint(0, config.image_vocab_size, (frames * config.frame_len,),
                           generator=torch.Generator().manual_seed(seed))
    return torch.cat([text, images])


# The real sizes: CogView2's 48 x 3072 transformer with 48 heads, 64 text tokens + 5 frames of 20 x 20.
FULL_SIZE = {"num_layers": 48, "hidden_size": 3072, "num_attention_heads": 48, "vocab_size": 150010,
             "image_vocab_size": 20000, "layout": [64, 464, 2064], "max_sequence_length": 912,
             "additional_seqlen": 2000, "frame_position_offset": 512}


class CogVideoAdapter(ModelAdapter):
    family = "cogvideo"
    presets = {
        "tiny": {"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 320,
                 "image_vocab_size": 256, "layout": [8, 72, 328], "max_sequence_length": 80, "additional_seqlen": 256,
                 "frame_position_offset": 16},
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

    def build(self, config):
        return CogVideoModel(CogVideoConfig.from_dict(config, "config"))

    def weights_files(self, folder):
        return [folder / SAT_CONFIG, folder / SAT_LATEST, sat_weights_path(folder)]

    def load_folder(self, folder):
        config = CogVideoConfig.from_dict(read_json(folder / SAT_CONFIG), str(folder / SAT_CONFIG)).to_dict()
        model = self.build(config).eval()
        weights = sat_weights_path(folder)
        load_into(model, read_sat_state(weights), weights)
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
        return None

    def sequence_length(self, model: CogVideoModel, frames: int) -> int:
        return model.config.text_len + frames * model.config.frame_len

    def export_spec(self, model, shape, batch, dynamic, seed=0):
        tokens = torch.stack([seeded_tokens(model.config, shape.frames, f"export {seed}", seed * 1000 + i)
                              for i in range(batch)])
        axes = {"tokens": {0: "batch"}, "logits": {0: "batch"}} if "batch" in dynamic else {}
        return ExportSpec({"tokens": tokens}, ["logits"], axes)

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
        length = self.sequence_length(model, shape.frames)
        if run.tokens is None:
            tokens = seeded_tokens(config, shape.frames, run.prompt, run.seed)
        else:
            if len(run.tokens) != length:
                raise RecipeError(f"{run.prompt}: {len(run.tokens)} tokens, but the recipe's shape "
                                  f"({shape.frames} frames) needs {length}")
            if run.tokens.min() < 0 or run.tokens.max() >= config.vocab_size:
                raise RecipeError(f"{run.prompt}: token ids must lie in [0, {config.vocab_size})")
            tokens = torch.from_numpy(run.tokens)
        if on_step is not None:
            on_step(0)
        logits = model(tokens[None])
        return Trajectory(list(logits.split(config.frame_len, dim=1)), logits, [0])  # outputs: one per frame

    def fidelity(self, reference, candidate):
        same = candidate.final.argmax(-1) == reference.final.argmax(-1)
        return {"logit_cosine": [cosine(c, r) for c, r in zip(candidate.outputs, reference.outputs)],
                "top1_agreement": same.double().mean().item()}
