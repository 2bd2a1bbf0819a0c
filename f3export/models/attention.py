"""The heads of a temporal attention module, as calibration and pruning see them.

The core never touches a family's attention code directly: it asks the
module's ``AttentionHeads`` to observe a call head by head (what the criteria
score), where each head's weights are (``HeadProjections``: separate or fused
q/k/v, written once), and to keep, mask or remove heads.
``DiffusersAttentionHeads`` serves every family built on diffusers'
``Attention``; a family with its own attention layout (CogVideo's fused
query_key_value) brings its own subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..criteria import HeadObservation, token_scorers



@dataclass
class WriteSums:
    """What a plan's choices read, summed over one call's queries (``HeadObservation``'s optional fields):
    attention mass by frame distance, and what each head writes and loses to a window (compensation)."""

    distance_mass: torch.Tensor | None = None  # [heads, frames]
    written: torch.Tensor | None = None  # [heads, C_out]
    window_loss: torch.Tensor | None = None  # [heads, frames, C_out]
    write_queries: int = 0

    def add(self, observed: HeadObservation) -> None:
        for name in ("distance_mass", "written", "window_loss"):
            value = getattr(observed, name)
            if value is not None:
                total = getattr(self, name)
                setattr(self, name, value.double().cpu() if total is None else total + value.double().cpu())
        self.write_queries += observed.write_queries if observed.write_queries is not None else observed.tokens


class HeadStatistics(NamedTuple):
    sums: dict[str, torch.Tensor]  # per token criterion: summed per head [H]
    tokens: int  # the queries they sum over
    writes: WriteSums

_CHUNK_ELEMENTS = 1 << 24  # bound on the [tokens, heads, frames, channels] tensor of one statistics chunk


def head_index(head_dim: int, heads: list[int], offset: int = 0) -> torch.Tensor:
    """Channel indices of the listed heads in a [heads * head_dim] layout starting at ``offset``."""
    return torch.cat([torch.arange(offset + h * head_dim, offset + (h + 1) * head_dim) for h in heads])


def keep_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new Linear with only the listed output rows (weights and bias)."""
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    out.weight.data.copy_(linear.weight.data[index])
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data[index])
    return out


def keep_columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new Linear reading only the listed input columns (the bias is unchanged)."""
    out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    out.weight.data.copy_(linear.weight.data[:, index])
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data)
    return out


@dataclass(frozen=True)
class HeadProjections:
    """Where the heads of an attention live in its weights, for separate and fused projections alike.

    Each input projection holds ``blocks`` consecutive [heads * head_dim]-row blocks (q, k and v as
    separate Linears: one block each; fused into one Linear: three); head h owns rows [h*d:(h+1)*d] of
    every block, and reads columns [h*d:(h+1)*d] of the output projection.
    """

    heads: int
    head_dim: int
    inputs: tuple[tuple[nn.Linear, int], ...]  # (projection, blocks)
    output: nn.Linear

    def rows(self, heads: list[int], blocks: int) -> torch.Tensor:
        width = self.heads * self.head_dim
        return torch.cat([head_index(self.head_dim, heads, block * width) for block in range(blocks)])

    def columns(self, heads: list[int]) -> torch.Tensor:
        return head_index(self.head_dim, heads)

    def input_blocks(self) -> list[torch.Tensor]:
        """The q, k and v weights, one [heads * head_dim, C] block each."""
        return [block for linear, blocks in self.inputs for block in linear.weight.chunk(blocks, dim=0)]

    def output_per_head(self) -> torch.Tensor:
        """The output projection's weight as [heads, head_dim, C_out]: head h's columns."""
        weight = self.output.weight
        return weight.reshape(weight.shape[0], self.heads, -1).permute(1, 2, 0)

    def kept(self, heads: list[int]) -> tuple[list[nn.Linear], nn.Linear]:
        """New input projections and output projection holding only the listed heads."""
        return ([keep_rows(linear, self.rows(heads, blocks)) for linear, blocks in self.inputs],
                keep_columns(self.output, self.columns(heads)))

    @torch.no_grad()
    def mask(self, heads: list[int]) -> None:
        self.output.weight[:, self.columns(heads)] = 0.0


def frame_distance(frames: int, device: torch.device) -> torch.Tensor:
    """[frames, frames]: |f_q - f_k|."""
    index = torch.arange(frames, device=device)
    return (index[:, None] - index[None, :]).abs()


def mass_by_distance(probs: torch.Tensor, distance: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """[heads, frames]: the attention mass ``probs`` [batch, heads, queries, keys] puts on keys d frames from the
    query (``distance`` [queries, keys]; negative for keys of no frame), summed over batch and queries."""
    frames = frames if frames is not None else int(distance.max()) + 1
    return torch.stack([(probs * (distance == d)).sum(dim=(0, 2, 3)) for d in range(frames)], dim=1)


class AttentionHeads(ABC):
    """One temporal attention module seen head by head."""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    @abstractmethod
    def heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @abstractmethod
    def projections(self) -> HeadProjections:
        """Where each head's q, k, v rows and output-projection columns are."""

    @abstractmethod
    def observe(self, hidden_states: torch.Tensor, residual_norm: torch.Tensor, *inputs: torch.Tensor,
                **named: object) -> Iterator[HeadObservation]:
        """One call of the module seen head by head, over the query tokens the statistics count (in chunks).

        ``hidden_states`` is the module's input; ``residual_norm`` the norm of the residual stream
        at the same tokens (its shape is the input's without the channel axis); ``inputs`` and ``named`` the
        module's further inputs as its caller passed them (CogVideo's key mask, a joint attention's text and
        rotary embedding).
        """

    @abstractmethod
    def keep(self, heads: list[int]) -> None:
        """Physically keep only the listed heads (at least one), in place."""

    @abstractmethod
    def removed(self) -> nn.Module:
        """What replaces the module once every head is gone: its constant remainder, exactly."""

    def unsupported(self) -> str | None:
        """Why head pruning cannot serve this module, if it cannot."""
        return None

    @torch.no_grad()
    def statistics(self, hidden_states: torch.Tensor, residual_norm: torch.Tensor, *inputs: torch.Tensor,
                   **named: object) -> HeadStatistics:
        """Every token criterion summed per head over the tokens of one call, and the token count."""
        scorers = token_scorers()
        sums = {name: torch.zeros(self.heads, dtype=torch.float64) for name in scorers}
        tokens, writes = 0, WriteSums()
        for observed in self.observe(hidden_states, residual_norm, *inputs, **named):
            for name, scorer in scorers.items():
                sums[name] += scorer.score(observed).double()
            tokens += observed.tokens
            writes.add(observed)
        return HeadStatistics(sums, tokens, writes)

    def mask(self, heads: list[int]) -> None:
        """Zero the output-projection columns of the listed heads (the reference for exactness)."""
        self.projections().mask(heads)

    def vary(self, changed: torch.Tensor, action: str, window: int) -> Callable[[], None]:
        """Until the returned function is called, run copy v of a batch made of ``changed.shape[0]`` copies
        (copy-major) with the heads ``changed[v]`` [heads] bool pruned by ``action`` (the sensitivity passes).
        Removal zeroes their output-projection columns per copy; other actions are the subclass's."""
        if action != "remove":
            raise ValueError(f"{type(self).__name__}: heads cannot be {action!r}")
        keep = (~changed).repeat_interleave(self.head_dim, dim=1)  # [copies, heads * head_dim]

        def zero_changed_heads(module, args):
            x = args[0].unflatten(0, (keep.shape[0], -1))
            mask = keep.to(x.device, x.dtype).reshape(keep.shape[0], *[1] * (x.dim() - 2), keep.shape[1])
            return ((x * mask).flatten(0, 1), *args[1:])
        return self.projections().output.register_forward_pre_hook(zero_changed_heads).remove

    @torch.no_grad()
    def add_output_bias(self, shift: torch.Tensor) -> None:
        """Add ``shift`` [C_out] to what the module writes for every token (compensation)."""
        output = self.projections().output
        if output.bias is None:
            raise ValueError("its output projection has no bias to fold compensation into")
        output.bias += shift.to(output.bias)


class RemovedAttention(nn.Module):
    """Stands in for a diffusers attention whose heads were all pruned.

    With no heads the module's output is the output projection's bias alone, a
    constant; keeping it as a parameter keeps the pruned model exactly equal to
    the original with those heads masked.
    """

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def add_to(self, residual: torch.Tensor) -> torch.Tensor:
        """residual + what the removed module wrote into it."""
        return residual if self.bias is None else residual + self.bias

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], self.out_features)
        zeros = hidden_states.new_zeros(shape)
        # an operation, not a view of the parameter: a view made under no_grad would require grad with no
        # gradient function, which torch's module tracker (FlopCounterMode, so bench and sweep) refuses
        return zeros if self.bias is None else zeros + self.bias


class DiffusersAttentionHeads(AttentionHeads):
    """A diffusers ``Attention`` over frames: input [N, F, C], N sequences of F frames each."""

    module: Attention

    @property
    def heads(self) -> int:
        return self.module.heads

    @property
    def head_dim(self) -> int:
        return self.module.inner_dim // self.module.heads

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, f, _ = x.shape
        return x.reshape(n, f, self.heads, -1).transpose(1, 2)  # [n, heads, frames, head_dim]

    def projections(self):
        attn = self.module
        return HeadProjections(self.heads, self.head_dim, ((attn.to_q, 1), (attn.to_k, 1), (attn.to_v, 1)),
                               attn.to_out[0])

    def observe(self, hidden_states, residual_norm, *inputs, **named):
        attn = self.module
        heads = attn.heads
        per_head_out = self.projections().output_per_head()  # [heads, d, C_out]
        n, frames, _ = hidden_states.shape
        chunk = max(1, _CHUNK_ELEMENTS // (heads * frames * per_head_out.shape[2]))
        for start in range(0, n, chunk):
            x = hidden_states[start:start + chunk]
            q, k, v = (self._split(proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
            cross = probs * (1.0 - torch.eye(frames, device=probs.device))  # every key but the query's own frame
            head_out, cross_out = (torch.einsum("nhfd,hdc->nhfc", p @ v.float(), per_head_out.float())
                                   / attn.rescale_output_factor for p in (probs, cross))
            yield HeadObservation(output_norm=head_out.norm(dim=-1),  # [n, heads, frames]
                                  residual_norm=residual_norm[start:start + chunk, None, :].float(),
                                  cross_frame_mass=cross.sum(dim=-1),
                                  cross_output_norm=cross_out.norm(dim=-1),
                                  distance_mass=mass_by_distance(probs, frame_distance(frames, probs.device)),
                                  # in the output projection's own space (before any rescale): its bias's
                                  written=head_out.sum(dim=(0, 2)) * attn.rescale_output_factor)

    def unsupported(self):
        attn = self.module
        if attn.added_kv_proj_dim is not None:
            return "attention with added key/value projections is not supported by head pruning"
        if attn.inner_kv_dim != attn.inner_dim:
            return (f"grouped-query attention ({attn.inner_kv_dim // self.head_dim} key/value heads for "
                    f"{self.heads} query heads) is not supported by head pruning")
        return None

    def keep(self, heads):
        attn, head_dim = self.module, self.head_dim
        (attn.to_q, attn.to_k, attn.to_v), attn.to_out[0] = self.projections().kept(heads)
        attn.heads = attn.sliceable_head_dim = len(heads)
        attn.inner_dim = attn.inner_kv_dim = len(heads) * head_dim

    def removed(self):
        out = self.module.to_out[0]
        return RemovedAttention(out.out_features, out.bias)
