"""What is left of an attention module once pruning removed all of its heads."""

from __future__ import annotations

import torch
from torch import nn


class RemovedAttention(nn.Module):
    """Stands in for an attention whose heads were all pruned.

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
