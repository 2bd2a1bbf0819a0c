"""Sizing a network before allocating it: its weights, and a bound of one forward's memory on the meta device.

Checked against what the machine has, so a recipe that cannot fit is refused in one line before any stage.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def size_text(n: int) -> str:
    for unit, power in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30)):
        if n >= 2**power:
            return f"{n / 2**power:.1f} {unit}"
    return f"{n / 2**20:.0f} MiB"


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclass(frozen=True)
class ForwardMemory:
    """A lower bound of one forward's memory: the weights, plus the activations its most demanding op
    holds at once (its inputs and outputs); ``largest_activation`` is the largest single tensor made."""

    weights: int
    largest_activation: int
    working_set: int

    @property
    def needed(self) -> int:
        return self.weights + self.working_set


def _storages(tree: Any) -> dict[int, int]:
    """Storage identity -> bytes of every tensor in a pytree (a view shares its base's storage)."""
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


class _ActivationSizes(TorchDispatchMode):
    """Op by op (on meta tensors: shapes only), the largest new tensor and the largest set of activations one
    op holds at once. Weights are left out (counted once, apart); views and in-place results are not new."""

    def __init__(self, weights: set[int]):
        super().__init__()
        self.weights = weights
        self.largest = self.working_set = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, outputs = _storages((args, kwargs)), _storages(out)
        held = {k: n for k, n in {**inputs, **outputs}.items() if k not in self.weights}
        self.working_set = max(self.working_set, sum(held.values()))
        self.largest = max([self.largest] + [n for k, n in held.items() if k not in inputs])
        return out


def forward_memory(model: nn.Module, meta_inputs: Callable[[], dict[str, torch.Tensor]], floor: int) -> ForwardMemory:
    """What one forward of ``model`` (a skeleton) on ``meta_inputs()`` needs at least, sized on the meta device.

    Where the forward cannot run on meta tensors (an op without a meta kernel, a value read back), the part
    that ran and ``floor`` (the bytes of the input latents) stand for the activations: a weaker bound rather
    than a crash.
    """
    tensors = [*model.parameters(), *model.buffers()]
    sizes = _ActivationSizes({t.untyped_storage()._cdata for t in tensors})
    try:
        inputs = meta_inputs()
        with torch.no_grad(), sizes:
            model.eval()(*inputs.values())
        floor = 0
    except Exception:  # sizing is advice: whatever a meta forward raises, the bounds fall back
        pass
    return ForwardMemory(weight_bytes(model), max(sizes.largest, floor), max(sizes.working_set, floor))


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None




def peak_rss_mib() -> int | None:
    """This process's resident high-water mark since start or the last ``reset_peak_rss`` (Linux); else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Start a new high-water mark at the current resident size (Linux >= 4.0), so a stage's own peak shows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps what freed tensors of a forward pass left in
    its arenas: gigabytes after a large model's forward), so the next step's peak does not stack on them."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
