"""Structure: where a network's temporal attention is, the units F3-Pruning ranks and prunes heads of.

A family says it once, as a ``TemporalStructure`` over its module tree; calibration, pruning, bench and
``inspect`` all read the same list of ``TemporalSite``.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from dataclasses import dataclass

from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import CheckpointError
from .attention import AttentionHeads, DiffusersAttentionHeads
from .joint_attention import JointAttentionHeads


@dataclass(frozen=True)
class TemporalSite:
    """A temporal attention module: the unit F3-Pruning ranks and prunes heads of.

    ``attention`` is the module path; ``access`` how its heads are read and cut
    (a diffusers ``Attention`` unless the family says otherwise). ``norm`` is
    the path of the norm feeding it, whose input is the residual stream; it is
    removed together with the attention when all heads go, unless
    ``shared_norm`` says other modules read it too.
    """

    attention: str
    norm: str | None = None
    shared_norm: bool = False
    access: type[AttentionHeads] = DiffusersAttentionHeads

    def heads_of(self, model: nn.Module) -> AttentionHeads:
        heads = self.access(model.get_submodule(self.attention))
        problem = heads.unsupported()
        if problem is not None:
            raise CheckpointError(f"{self.attention}: {problem}")
        return heads

    @property
    def own_norm(self) -> str | None:
        """The norm that belongs to this attention alone (goes with it), if any."""
        return None if self.shared_norm else self.norm


class TemporalStructure(ABC):
    # what [pruning].action may do to the heads of its sites; the first is the family's default
    actions: tuple[str, ...] = ("remove",)

    @abstractmethod
    def temporal_sites(self, model: nn.Module) -> list[TemporalSite]:
        """The temporal attention modules of ``model`` (loaded, pruned or a skeleton), in a stable order."""


def unmatched_pattern(key: str, patterns: list[str], names: list[str], what: str) -> str | None:
    """The first glob of a recipe's pattern key that matches none of ``names``, as an error showing a real name."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            example = f"e.g. {names[0]!r}" if names else f"the model has no {what}"
            return f"{key}: pattern {pattern!r} matches no {what} ({example})"
    return None


class AttentionPatterns(TemporalStructure):
    """Temporal sites of a diffusers model: its attention modules whose names match glob patterns, each
    ``...attnN`` paired with its block's ``...normN``. ``prefix`` is where the diffusers model sits in ours;
    ``access`` reads the heads of every site."""

    kinds: tuple[type[nn.Module], ...] = (Attention,)  # the module classes that are attention
    access: type[AttentionHeads] = DiffusersAttentionHeads
    shared_norm = False  # whether each site's norm feeds more than its attention

    def __init__(self, patterns: tuple[str, ...], prefix: str):
        self.patterns, self.prefix = patterns, prefix

    def attention_names(self, model: nn.Module) -> list[str]:
        inner = model.get_submodule(self.prefix)
        return [name for name, module in inner.named_modules() if isinstance(module, self.kinds)]

    def temporal_sites(self, model):
        modules = dict(model.get_submodule(self.prefix).named_modules())
        sites = []
        for name in self.attention_names(model):
            if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
                parent, _, leaf = name.rpartition(".")
                norm = f"{parent}.norm{leaf.removeprefix('attn')}" if leaf.startswith("attn") else None
                norm_path = f"{self.prefix}.{norm}" if norm in modules else None
                sites.append(TemporalSite(f"{self.prefix}.{name}", norm_path, self.shared_norm, self.access))
        return sites

    def unmatched(self, model: nn.Module, key: str) -> str | None:
        """Why a recipe's patterns (``key``) do not all name an ``Attention`` module of ``model``, or None."""
        return unmatched_pattern(key, list(self.patterns), self.attention_names(model), "Attention module")


class JointAttentionPatterns(AttentionPatterns):
    """The joint self-attention modules of a video transformer, whose every head attends over all frames: their
    heads can go frame-local (the default), keep a window of frames, or be removed. Their norm feeds the rest of
    the block too."""

    actions = ("frame-local", "temporal-window", "remove")
    kinds = (Attention, AttentionModuleMixin)  # CogVideoX's is the former, Wan's the latter
    access = JointAttentionHeads
    shared_norm = True
