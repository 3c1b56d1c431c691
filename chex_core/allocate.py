"""Inter-layer allocation: how many channels each group keeps under a global sparsity (docs/algorithm.md §5).

``global`` (the paper and the official CLS code): rank ``|γ|`` of every prunable channel of every group together and
drop the ``⌊N·s⌋`` smallest; a group keeps the channels left. Currently pruned channels have ``γ = 0`` and go first.
``uniform`` (the released SEG code and the initial sub-model): every group keeps ``C − ⌊C·s⌋``.

Differences from the official code, all deliberate:

- **Exact budget.** The official code thresholds with a strict ``>`` on the value at index ``⌊N·s⌋`` (pruning one
  extra channel plus every tie). Here exactly ``⌊N·s⌋`` channels are dropped.
- **Floor inside the cut.** Every group keeps at least ``m = min_channels`` channels (the official code has no floor;
  a zero-width layer cannot be exported). The floor is part of the cut, not applied after it: each group's ``m``
  largest-``|γ|`` channels are never dropped and the ``⌊N·s⌋`` channels come from the rest. So the total kept is
  exactly ``max(N − ⌊N·s⌋, Σ_g min(C_g, m))``: the budget whenever the floors fit in it, else all floors.
  (Rounding widths up to a multiple of ``round_to`` happens after this and adds at most ``round_to − 1`` per group.)
- **Tie rule.** Equal ``|γ|`` (the zeros of pruned channels; every γ at initialisation) are not cut in position
  order, which would empty the first layers first: ties are ordered by the channel's relative position in its layer
  (``index / C_g``), then by layer order, so a block of equal values is cut from every layer in proportion to its
  size. Deterministic, hence identical on every rank and after a resume.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ALLOCATIONS", "global_order", "global_keep_counts", "uniform_keep_counts", "keep_counts"]

ALLOCATIONS = ("global", "uniform")


def _floor(counts: list[int], sizes: Sequence[int], min_channels: int) -> list[int]:
    return [min(size, max(int(c), min_channels)) for c, size in zip(counts, sizes)]


def global_order(importances: Sequence[torch.Tensor], min_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The order in which the global ranking drops channels, and the channels it never drops.

    Returns:
        ``(order, group_of)``: ``order`` lists flat channel positions (groups concatenated), smallest ``|importance|``
        first with the tie rule of the module docstring, each group's ``min_channels`` largest left out;
        ``group_of[i]`` is the group index of flat position ``i``.
    """
    values, frac, gid, protected = [], [], [], []
    offset = 0
    for g, t in enumerate(importances):
        v = t.detach().abs().flatten().to("cpu", torch.float64).numpy()
        size = v.size
        values.append(v)
        frac.append((np.arange(size) + 0.5) / max(size, 1))
        gid.append(np.full(size, g))
        # the floor: the group's largest |γ| (ties: lower index) are never candidates
        top = np.lexsort((np.arange(size), -v))[:min(size, min_channels)]
        protected.append(offset + top)
        offset += size
    values_a, frac_a, gid_a = np.concatenate(values), np.concatenate(frac), np.concatenate(gid)
    order = np.lexsort((gid_a, frac_a, values_a))
    blocked = np.zeros(values_a.size, dtype=bool)
    blocked[np.concatenate(protected)] = True
    return order[~blocked[order]], gid_a


def global_keep_counts(importances: Sequence[torch.Tensor], sparsity: float, min_channels: int = 1) -> list[int]:
    """Per-group keep counts from one global ranking of ``|importance|`` (usually the norm layers' γ).

    Drops exactly ``⌊N·sparsity⌋`` channels, fewer only where the floors forbid it (module docstring).

    Args:
        importances: one 1-D tensor per group.
        sparsity: fraction of all channels to drop, in [0, 1).
        min_channels: floor per group.
    """
    sizes = [int(t.numel()) for t in importances]
    n_drop = int(sum(sizes) * sparsity)
    order, group_of = global_order(importances, min_channels)
    dropped = np.bincount(group_of[order[:n_drop]], minlength=len(sizes))
    return [size - int(d) for size, d in zip(sizes, dropped)]


def uniform_keep_counts(sizes: Sequence[int], sparsity: float, min_channels: int = 1) -> list[int]:
    """Every group keeps ``C − ⌊C·sparsity⌋`` channels (floored at ``min_channels``)."""
    return _floor([s - int(s * sparsity) for s in sizes], sizes, min_channels)


def keep_counts(policy: str, importances: Sequence[torch.Tensor], sparsity: float, min_channels: int = 1) -> list[int]:
    """Dispatch on ``policy`` (one of :data:`ALLOCATIONS`)."""
    if policy == "global":
        return global_keep_counts(importances, sparsity, min_channels)
    if policy == "uniform":
        return uniform_keep_counts([int(t.numel()) for t in importances], sparsity, min_channels)
    raise ValueError(f"unknown allocation policy {policy!r}; choose one of {ALLOCATIONS}")
