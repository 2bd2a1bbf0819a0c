"""The heads of a temporal attention module, as calibration and pruning see them.

The core never touches a family's attention code directly: it asks the
module's ``AttentionHeads`` for per-head statistics and weight norms, and to
keep, mask or remove heads. ``DiffusersAttentionHeads`` serves every family
built on diffusers' ``Attention``; a family with its own attention layout
(CogVideo's fused query_key_value) brings its own subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

HeadStatistics = tuple[torch.Tensor, torch.Tensor, int]  # summed contribution [H], summed mixing [H], tokens

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


def head_weight_norms(heads: int, input_projections: list[torch.Tensor], output_weight: torch.Tensor) -> list[float]:
    """Per-head norm of the q, k, v rows ([heads * d, C] each) and output columns ([C, heads * d])."""
    total = torch.zeros(heads, dtype=torch.float64)
    for weight in input_projections:
        total += weight.detach().reshape(heads, -1).double().pow(2).sum(dim=1)
    out = output_weight.detach()
    total += out.reshape(out.shape[0], heads, -1).double().pow(2).sum(dim=(0, 2))
    return total.sqrt().tolist()


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
    def statistics(self, hidden_states: torch.Tensor, residual_norm: torch.Tensor, *inputs: torch.Tensor
                   ) -> HeadStatistics:
        """Per-head contribution and mixing summed over the tokens of one call, and the token count.

        ``hidden_states`` is the module's input; ``residual_norm`` the norm of the residual stream
        at the same tokens (its shape is the input's without the channel axis); ``inputs`` the module's
        further positional inputs, for a module that takes some (CogVideo's key mask).
        """

    @abstractmethod
    def magnitude(self) -> list[float]:
        """Per-head norm of the head's weights (q, k, v rows and output-projection columns)."""

    @abstractmethod
    def keep(self, heads: list[int]) -> None:
        """Physically keep only the listed heads (at least one), in place."""

    @abstractmethod
    def mask(self, heads: list[int]) -> None:
        """Zero the output-projection columns of the listed heads (the reference for exactness)."""

    @abstractmethod
    def removed(self) -> nn.Module:
        """What replaces the module once every head is gone: its constant remainder, exactly."""


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
        if self.bias is None:
            return hidden_states.new_zeros(shape)
        return self.bias.expand(shape)


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

    @torch.no_grad()
    def statistics(self, hidden_states, residual_norm):
        attn = self.module
        heads = attn.heads
        weight_out = attn.to_out[0].weight  # [C_out, heads * head_dim]
        per_head_out = weight_out.reshape(weight_out.shape[0], heads, -1).permute(1, 2, 0)  # [heads, d, C_out]
        n, frames, _ = hidden_states.shape
        chunk = max(1, _CHUNK_ELEMENTS // (heads * frames * weight_out.shape[0]))
        contribution = torch.zeros(heads, dtype=torch.float64)
        mixing = torch.zeros(heads, dtype=torch.float64)
        for start in range(0, n, chunk):
            x = hidden_states[start:start + chunk]
            q, k, v = (self._split(proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
            head_out = torch.einsum("nhfd,hdc->nhfc", probs @ v.float(), per_head_out.float())
            head_out = head_out / attn.rescale_output_factor
            ratio = head_out.norm(dim=-1) / residual_norm[start:start + chunk, None, :].float().clamp_min(1e-12)
            contribution += ratio.sum(dim=(0, 2)).double()
            mixing += (1.0 - probs.diagonal(dim1=-2, dim2=-1)).sum(dim=(0, 2)).double()
        return contribution, mixing, n * frames

    def magnitude(self):
        attn = self.module
        return head_weight_norms(self.heads, [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight],
                                 attn.to_out[0].weight)

    def keep(self, heads):
        attn = self.module
        if attn.inner_kv_dim != attn.inner_dim or attn.added_kv_proj_dim is not None:
            raise ValueError("grouped-query or added-KV attention is not supported by head pruning")
        head_dim = self.head_dim
        index = head_index(head_dim, heads)
        attn.to_q, attn.to_k, attn.to_v = (keep_rows(p, index) for p in (attn.to_q, attn.to_k, attn.to_v))
        attn.to_out[0] = keep_columns(attn.to_out[0], index)
        attn.heads = attn.sliceable_head_dim = len(heads)
        attn.inner_dim = attn.inner_kv_dim = len(heads) * head_dim

    @torch.no_grad()
    def mask(self, heads):
        self.module.to_out[0].weight[:, head_index(self.head_dim, heads)] = 0.0

    def removed(self):
        out = self.module.to_out[0]
        return RemovedAttention(out.out_features, out.bias)
