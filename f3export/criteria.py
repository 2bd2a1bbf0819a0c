"""The pruning criteria: small scorers of temporal heads, registered in one place.

A criterion scores every head of a temporal attention, higher meaning more
important; the plan removes the lowest. ``CRITERIA`` is the registry: the
recipe's ``[pruning].criterion`` choices, the columns of ``scores.json`` and
what calibration computes all come from it, so adding a criterion is one
function and one entry here.

Two kinds of scorer:

* ``TokenScorer``: from what a head does on data. The family's
  ``AttentionHeads`` observes each call of the module (``HeadObservation``);
  the scorer sums its quantity over the observed tokens, and calibration
  averages the sums per step and overall.
* ``WeightScorer``: from the head's weights alone (``HeadProjections``), data-free.
* ``OutputScorer``: measured at the model's output, by calibration's extra forward passes with the head
  changed (``sensitivity.py``): costly, so measured only when the recipe ranks by it.

``mixing`` is the design's ``cross_frame_mass``: for a temporal-only attention every key but the query's own
is another frame's; for a joint 3D attention the keys of other frames (not the query's frame, not the text).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

if TYPE_CHECKING:  # torch is imported where a scorer runs: the recipe reads this registry in processes that
    import torch  # must not load torch (``f3export generate`` runs engines only)

    from .models.attention import HeadProjections


@dataclass(frozen=True)
class HeadObservation:
    """A temporal attention's heads on some query tokens of one call.

    Every tensor has the heads on dim 1 and the tokens on all other dims
    (``residual_norm`` broadcasts against the others).
    """

    output_norm: torch.Tensor  # ||W_o[:, h] (A_h V_h)||: what head h writes into the residual stream
    residual_norm: torch.Tensor  # ||x||: the residual stream entering the module, at the same tokens
    cross_frame_mass: torch.Tensor  # the head's attention probability mass on other frames' keys
    cross_output_norm: torch.Tensor  # ||W_o[:, h] ((A_h * M_cross) V_h)||: what its cross-frame part writes
    # Not scores: what a plan's choices read. Each summed over the observation's queries, per head.
    distance_mass: Optional[torch.Tensor] = None  # [heads, frames]: attention mass on keys d frames away
    written: Optional[torch.Tensor] = None  # [heads, C_out]: W_o[:, h] (A_h V_h), what the head writes (removal)
    # [heads, frames, C_out]: what the head's write loses when it reads only w frames on each side (w = 0, 1, ..)
    window_loss: Optional[torch.Tensor] = None
    # the queries ``written`` / ``window_loss`` sum over, where more than the scored ones (a joint attention's
    # text queries also receive the output projection's bias)
    write_queries: Optional[int] = None

    @property
    def tokens(self) -> int:
        return self.output_norm.numel() // self.output_norm.shape[1]


def sum_over_tokens(per_head_and_token: torch.Tensor) -> torch.Tensor:
    """[.., heads, ..] -> [heads]: the sum over every dim but the heads' (dim 1)."""
    return per_head_and_token.sum(dim=[d for d in range(per_head_and_token.dim()) if d != 1])


class TokenScorer(NamedTuple):
    """Per head, the sum of a quantity over one observation's tokens."""

    score: Callable[[HeadObservation], torch.Tensor]


class WeightScorer(NamedTuple):
    """Per head, from the head's weights alone."""

    score: Callable[["HeadProjections"], torch.Tensor]


class OutputScorer(NamedTuple):
    """Per head, measured at the model's output with the head changed by the recipe's action (sensitivity.py)."""

    description: str


def contribution(observed: HeadObservation) -> torch.Tensor:
    """||W_o[:, h] (A_h V_h)|| / ||x||: how much the head writes into the residual stream."""
    return sum_over_tokens(observed.output_norm / observed.residual_norm.clamp_min(1e-12))


def mixing(observed: HeadObservation) -> torch.Tensor:
    """The attention mass on other frames: how much the head moves information across frames."""
    return sum_over_tokens(observed.cross_frame_mass)


def temporal_contribution(observed: HeadObservation) -> torch.Tensor:
    """||W_o[:, h] ((A_h * M_cross) V_h)|| / ||x||: what the head's reading of other frames writes into the
    residual stream, the part of ``contribution`` that frame-local attention takes away."""
    return sum_over_tokens(observed.cross_output_norm / observed.residual_norm.clamp_min(1e-12))


def magnitude(projections: "HeadProjections") -> torch.Tensor:
    """The norm of the head's weights: its q, k and v rows and its output-projection columns."""
    import torch

    heads = projections.heads
    total = torch.zeros(heads, dtype=torch.float64)
    for block in projections.input_blocks():
        total += block.detach().reshape(heads, -1).double().pow(2).sum(dim=1)
    out = projections.output.weight.detach()
    total += out.reshape(out.shape[0], heads, -1).double().pow(2).sum(dim=(0, 2))
    return total.sqrt()


def random_baseline(projections: "HeadProjections") -> torch.Tensor:
    """A baseline that knows nothing: seeded uniform scores, the seed taken from the module's output weights,
    so the same model always gets the same ranking and no two modules share one."""
    import torch

    weights = projections.output.weight.detach().double().contiguous()
    seed = int.from_bytes(hashlib.sha256(weights.numpy().tobytes()).digest()[:8], "little")
    return torch.rand(projections.heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CRITERIA: dict[str, TokenScorer | WeightScorer] = {
    "contribution": TokenScorer(contribution),
    "mixing": TokenScorer(mixing),
    "temporal_contribution": TokenScorer(temporal_contribution),
    "magnitude": WeightScorer(magnitude),
    "random": WeightScorer(random_baseline),
    "sensitivity": OutputScorer("||y(head changed) - y|| / ||y||: the relative change of the model's prediction "
                                "with this head alone pruned by the recipe's action, per step"),
}


def token_scorers() -> dict[str, TokenScorer]:
    """The registered criteria measured on data, in registry order."""
    return {name: scorer for name, scorer in CRITERIA.items() if isinstance(scorer, TokenScorer)}
