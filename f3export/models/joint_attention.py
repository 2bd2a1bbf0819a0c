"""Joint 3D attention (CogVideoX, Wan): every head attends over all frames' tokens at once.

There is no temporal module to remove; F3's idea applies per head (DESIGN.md, "Beyond the paper"). A head's
temporal value is what it reads from *other* frames' keys; the heads ranked below the ratio are either made
**frame-local** (they keep their weights and attend within their own frame, plus the text tokens a model
concatenates into the sequence) or **removed** as F3 removes temporal heads.

``FrameAttentionProcessor`` is the attention processor of every joint self-attention of these families, the
original model's too: with no local heads it computes exactly what diffusers' own processor computes, in
operations an export keeps shape-dynamic. Frame-local heads are a contiguous group at the end (the heads are
permuted there, which does not change the function); the group runs as attention over
``[batch, heads, frames, tokens per frame (+ text), head_dim]``, so it never builds an [S, S] matrix.
A family supplies its ``JointStyle``: how its attention makes q, k and v of the sequence and what it returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..criteria import HeadObservation
from .attention import (_CHUNK_ELEMENTS, AttentionHeads, HeadProjections, RemovedAttention, head_index, keep_columns,
                        keep_rows, mass_by_distance)


@dataclass
class FrameLayout:
    """How the sequence the network runs now splits into frames: set by the network's forward from its input's
    shape, for every attention of the network to read (an export traces it with the input, frames stay dynamic)."""

    tokens_per_frame: Any = 0  # an int (a traced size while exporting)


class JointStyle(ABC):
    """How a family's joint attention makes its q, k, v and returns its output."""

    norm_across_heads: ClassVar[bool]  # q/k norms over every head's channels at once (Wan), not per head

    @abstractmethod
    def qkv(self, attn: nn.Module, head_dim: int, hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            image_rotary_emb: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """q, k, v as [batch, heads, sequence, head_dim] (normed, rotated) and the count of context (text)
        tokens that lead the sequence and belong to no frame."""

    @abstractmethod
    def output(self, attn: nn.Module, heads_out: torch.Tensor, context: int) -> Any:
        """What the attention returns, from the heads' outputs [batch, sequence, heads * head_dim]."""

    @abstractmethod
    def removed_output(self, constant: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor,
                       encoder_hidden_states: torch.Tensor | None) -> Any:
        """What the attention returns once every head is gone (``constant``: its output for some tokens)."""


def frame_ids(context: int, video_tokens: int, tokens_per_frame: int) -> torch.Tensor:
    """The frame of every token of a joint sequence: -1 for the context tokens that lead it."""
    return torch.cat([torch.full((context,), -1), torch.arange(video_tokens) // tokens_per_frame])


def cross_frame_keys(frame: torch.Tensor, queries: slice, window: int = 0) -> torch.Tensor:
    """[queries, keys]: True where the key is a video token of a frame more than ``window`` frames from the
    query's (``window`` 0: of any other frame)."""
    query_frame = frame[queries, None]
    return (query_frame >= 0) & (frame[None, :] >= 0) & ((frame[None, :] - query_frame).abs() > window)


def neighbour_frames(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, F, T, d] -> [B, H, F, (2w + 1) T, d]: for every frame, the tokens of frames f - w .. f + w (zeros
    past either end), gathered by slicing a padded copy: static for any frame count, no [S, S] index."""
    return torch.cat(_shifted(F.pad(x, (0, 0, 0, 0, window, window)), window, dim=2), dim=3)


def _shifted(padded: torch.Tensor, window: int, dim: int) -> list[torch.Tensor]:
    """The 2w + 1 frame-long slices of ``padded`` (w extra on each side along ``dim``), offsets -w .. w. The
    slices' ends count from the end: constants whatever the frame count, so a traced export keeps it dynamic."""
    span = 2 * window
    index = [slice(None)] * dim
    return [padded[(*index, slice(i, (i - span) or None))] for i in range(span + 1)]


def neighbour_valid(frames_like: torch.Tensor, window: int) -> torch.Tensor:
    """[F, 2w + 1]: False for the frames ``neighbour_frames`` padded in past the clip's ends (``frames_like``:
    any [F] tensor, so the frame count stays a graph value)."""
    present = F.pad(frames_like * 0 + 1, (window, window))  # computed, not ones_like: an export folds that
    return torch.stack(_shifted(present, window, dim=0), dim=1) > 0


def frame_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int,
                          tokens_per_frame: Any, window: int = 0) -> torch.Tensor:
    """Attention of heads that read only their own frame, the ``window`` frames on each side and the context
    tokens, [B, H, S, d] -> [B, H, S, d].

    Video queries attend per frame over [context keys, the window's keys] (scores [B, H, F, T, C + (2w + 1) T],
    keys past the clip's ends at -inf); context queries belong to no frame and attend over every key, as in the
    original attention."""
    scale = q.shape[-1] ** -0.5
    qf, kf, vf = (x[:, :, context:].unflatten(2, (-1, tokens_per_frame)) for x in (q, k, v))  # [B, H, F, T, d]
    if window:
        kf, vf = neighbour_frames(kf, window), neighbour_frames(vf, window)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if window:
        valid = neighbour_valid(qf[0, 0, :, 0, 0], window)[:, None, :, None]  # [F, 1, 2w + 1, 1]
        scores = scores.unflatten(-1, (2 * window + 1, -1)).masked_fill(~valid, float("-inf")).flatten(-2)
    if not context:
        return (scores.softmax(dim=-1) @ vf).flatten(2, 3)
    kc, vc = k[:, :, None, :context], v[:, :, None, :context]  # [B, H, 1, C, d], broadcast over frames
    probs = torch.cat([(qf @ kc.transpose(-1, -2)) * scale, scores], dim=-1).softmax(dim=-1)
    video = (probs[..., :context] @ vc + probs[..., context:] @ vf).flatten(2, 3)
    text = F.scaled_dot_product_attention(q[:, :, :context], k, v)
    return torch.cat([text, video], dim=2)


class FrameAttentionProcessor:
    """The attention of a joint self-attention module with its heads in groups (see the module docstring).

    ``local_heads``: the last heads attend within their frame and ``window`` frames on each side;
    ``selected``: the q/k heads kept after a norm over every head's channels (Wan's heads removed: their q and k
    still count in that norm, exactly); ``masked``: the exactness reference, those heads' scores of keys beyond
    the window at -inf in the full attention."""

    def __init__(self, style: JointStyle, layout: FrameLayout, head_dim: int):
        self.style, self.layout, self.head_dim = style, layout, head_dim
        self.local_heads = 0
        self.window = 0
        self.varied: torch.Tensor | None = None  # [copies, heads] bool, see JointAttentionHeads.vary
        self.varied_window = 0
        self.selected: list[int] | None = None
        self.masked: list[int] | None = None

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        if attention_mask is not None:
            raise ValueError("joint self-attention with an attention mask is not supported")
        q, k, v, context = self.qkv(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)
        out = self.attend(q, k, v, context)
        return self.style.output(attn, out.transpose(1, 2).flatten(2, 3).type_as(q), context)

    def qkv(self, attn: nn.Module, *inputs: Any, **named: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The family's q, k, v of a call (``inputs``/``named``: the module's, as its caller passed them), the
        heads that still have outputs only."""
        q, k, v, context = self.style.qkv(attn, self.head_dim, *inputs, **named)
        if self.selected is not None:
            q, k = q[:, self.selected], k[:, self.selected]
        return q, k, v, context

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
        if self.varied is not None:  # the sensitivity passes: copy v of the batch with heads varied[v] windowed
            return self.windowed_reference(q, k, v, context, self.varied, self.varied_window)
        if self.masked is not None:
            heads = torch.zeros(1, q.shape[1], dtype=torch.bool)
            heads[0, self.masked] = True
            return self.windowed_reference(q, k, v, context, heads, self.window)
        if not self.local_heads:
            return F.scaled_dot_product_attention(q, k, v)
        full = q.shape[1] - self.local_heads
        local = frame_local_attention(q[:, full:], k[:, full:], v[:, full:], context, self.layout.tokens_per_frame,
                                      self.window)
        if not full:
            return local
        return torch.cat([F.scaled_dot_product_attention(q[:, :full], k[:, :full], v[:, :full]), local], dim=1)


    def windowed_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int,
                           heads: torch.Tensor, window: int) -> torch.Tensor:
        """The full attention with the scores of keys beyond ``window`` frames at -inf for the ``heads``
        [copies, heads] bool of each copy of the batch (copy-major): the exactness reference (one copy) and the
        sensitivity passes."""
        frame = frame_ids(context, q.shape[2] - context, self.layout.tokens_per_frame)
        beyond = cross_frame_keys(frame, slice(None), window).to(q.device)
        masked = heads.to(q.device)[:, :, None, None] & beyond  # [copies, heads, S, S]
        masked = masked.repeat_interleave(q.shape[0] // heads.shape[0], dim=0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)


class RemovedJointAttention(RemovedAttention):
    """A joint attention with every head pruned: its output bias for every token, in the family's return form."""

    def __init__(self, out_features: int, bias: torch.Tensor | None, style: JointStyle):
        super().__init__(out_features, bias)
        self.style = style

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return self.style.removed_output(super().forward, hidden_states, encoder_hidden_states)


class JointAttentionHeads(AttentionHeads):
    """The heads of a joint self-attention run by ``FrameAttentionProcessor``: separate to_q/to_k/to_v and
    to_out.0, as diffusers' ``Attention`` and ``WanAttention`` both have them."""

    @property
    def processor(self) -> FrameAttentionProcessor:
        return self.module.processor

    @property
    def head_dim(self) -> int:
        return self.processor.head_dim

    @property
    def heads(self) -> int:
        return self.module.to_out[0].in_features // self.head_dim

    def unsupported(self):
        if not isinstance(getattr(self.module, "processor", None), FrameAttentionProcessor):
            return "joint attention without f3export's frame-aware processor"
        return None

    def projections(self):
        attn = self.module
        return HeadProjections(self.heads, self.head_dim, ((attn.to_q, 1), (attn.to_k, 1), (attn.to_v, 1)),
                               attn.to_out[0])

    def keep(self, heads):
        attn, processor = self.module, self.processor
        if processor.style.norm_across_heads:  # q and k stay whole: every head's channels enter their norm
            attn.to_v = keep_rows(attn.to_v, head_index(self.head_dim, heads))
            attn.to_out[0] = keep_columns(attn.to_out[0], head_index(self.head_dim, heads))
            processor.selected = list(heads)
            return
        (attn.to_q, attn.to_k, attn.to_v), attn.to_out[0] = self.projections().kept(heads)
        attn.heads = len(heads)

    @torch.no_grad()
    def localize(self, heads: list[int], window: int = 0) -> None:
        """Make the listed heads frame-local (``window`` frames on each side), in place: permute them to the end
        (q/k/v rows, output columns and, for a norm over every head's channels, its weights), then run them as
        the local group."""
        attn = self.module
        order = [h for h in range(self.heads) if h not in heads] + list(heads)
        rows = head_index(self.head_dim, order)
        (attn.to_q, attn.to_k, attn.to_v), attn.to_out[0] = self.projections().kept(order)
        if self.processor.style.norm_across_heads:
            for norm in (attn.norm_q, attn.norm_k):
                norm.weight.copy_(norm.weight[rows])
        self.processor.local_heads, self.processor.window = len(heads), window

    def mask_cross_frame(self, heads: list[int], window: int = 0) -> None:
        """The reference of frame-local heads: their scores of keys beyond the window at -inf in the full
        attention."""
        self.processor.masked, self.processor.window = list(heads), window

    def vary(self, changed, action, window):
        if action == "remove":
            return super().vary(changed, action, window)
        processor = self.processor
        processor.varied, processor.varied_window = changed, (window if action == "temporal-window" else 0)

        def restore() -> None:
            processor.varied = None
        return restore

    def removed(self):
        out = self.module.to_out[0]
        return RemovedJointAttention(out.out_features, out.bias, self.processor.style)

    @torch.no_grad()
    def observe(self, hidden_states, residual_norm, *inputs, **named):
        """Over the video queries: context (text) queries belong to no frame. ``residual_norm`` is the video
        tokens' [batch, video tokens]."""
        processor = self.processor
        q, k, v, context = processor.qkv(self.module, hidden_states, *inputs, **named)
        q, k, v = q.float(), k.float(), v.float()
        per_head_out = self.projections().output_per_head().float()  # [heads, d, C_out]
        batch, heads, sequence, _ = q.shape
        frame = frame_ids(context, sequence - context, processor.layout.tokens_per_frame)
        frames = (sequence - context) // processor.layout.tokens_per_frame
        widest = max(sequence, per_head_out.shape[2], frames * self.head_dim)
        chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * widest))
        scale = self.head_dim ** -0.5
        # the context (text) queries: they read every key whatever the action, but receive the output bias too
        text_written = torch.einsum("hd,hdc->hc", (torch.softmax((q[:, :, :context] @ k.transpose(-1, -2)) * scale,
                                                                 dim=-1) @ v).sum(dim=(0, 2)), per_head_out)
        for start in range(context, sequence, chunk):
            queries = slice(start, min(start + chunk, sequence))
            probs = torch.softmax((q[:, :, queries] @ k.transpose(-1, -2)) * scale, dim=-1)
            cross = probs * cross_frame_keys(frame, queries).to(probs.device)
            head_out, cross_out = (torch.einsum("bhsd,hdc->bhsc", p @ v, per_head_out) for p in (probs, cross))
            # |f_q - f_k| for video keys, -1 for the context keys (which every window keeps)
            distance = torch.where(frame[None, :] >= 0, (frame[None, :] - frame[queries, None]).abs(), -1
                                   ).to(probs.device)
            first = queries.start == context
            yield HeadObservation(output_norm=head_out.norm(dim=-1),  # [batch, heads, queries]
                                  residual_norm=residual_norm[:, None, queries.start - context:queries.stop - context],
                                  cross_frame_mass=cross.sum(dim=-1), cross_output_norm=cross_out.norm(dim=-1),
                                  distance_mass=mass_by_distance(probs, distance, frames),
                                  written=head_out.sum(dim=(0, 2)) + (text_written if first else 0),
                                  window_loss=self._window_loss(probs, v, distance, per_head_out, frames),
                                  write_queries=batch * (queries.stop - queries.start + (context if first else 0)))

    @staticmethod
    def _window_loss(probs: torch.Tensor, v: torch.Tensor, distance: torch.Tensor, per_head_out: torch.Tensor,
                     frames: int) -> torch.Tensor:
        """[heads, frames, C_out]: for w = 0 .. frames - 1, what the heads' writes lose (summed over the queries)
        when each reads only keys within w frames, its probabilities renormalised as the windowed head's are."""
        losses = []
        for window in range(frames):
            kept = probs * (distance <= window)
            lost = (probs - kept / kept.sum(dim=-1, keepdim=True)) @ v  # [B, H, Q, d]
            losses.append(torch.einsum("hd,hdc->hc", lost.sum(dim=(0, 2)), per_head_out))
        return torch.stack(losses, dim=1)


def install_processors(model: nn.Module, names: list[str], style: JointStyle, layout: FrameLayout) -> None:
    """Give every listed joint self-attention of ``model`` a ``FrameAttentionProcessor`` reading ``layout``."""
    for name in names:
        attn = model.get_submodule(name)
        attn.set_processor(FrameAttentionProcessor(style, layout, attn.to_q.out_features // attn.heads))
