"""Inter-layer allocation: how many channels each group keeps under a global sparsity (ALGORITHM.md §4).

``global`` (the paper and the official CLS code): rank ``|γ|`` of every prunable channel of every group together and
drop the ``⌊N·s⌋`` smallest; a group keeps the channels left. Currently pruned channels have ``γ = 0`` and go first.
The official code thresholds with a strict ``>`` on the value at index ``⌊N·s⌋`` (pruning one extra channel plus
ties); here exactly ``⌊N·s⌋`` are dropped, ties broken by position, so budgets are exact and deterministic.
``uniform`` (the released SEG code and the initial sub-model): every group keeps ``C − ⌊C·s⌋``.

Both apply a floor of ``min_channels`` per group (the official code has none; a zero-width layer cannot be exported).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ALLOCATIONS", "global_keep_counts", "uniform_keep_counts", "keep_counts"]

ALLOCATIONS = ("global", "uniform")


def _floor(counts: list[int], sizes: Sequence[int], min_channels: int) -> list[int]:
    return [min(size, max(int(c), min_channels)) for c, size in zip(counts, sizes)]


def global_keep_counts(importances: Sequence[torch.Tensor], sparsity: float, min_channels: int = 1) -> list[int]:
    """Per-group keep counts from one global ranking of ``|importance|`` (usually the norm layers' γ).

    Args:
        importances: one 1-D tensor per group.
        sparsity: fraction of all channels to drop, in [0, 1).
        min_channels: floor per group.
    """
    sizes = [int(t.numel()) for t in importances]
    flat = torch.cat([t.detach().abs().flatten().to("cpu", torch.float64) for t in importances])
    n_drop = int(flat.numel() * sparsity)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_drop > 0:
        keep[torch.sort(flat, stable=True).indices[:n_drop]] = False
    counts = [int(c.sum()) for c in torch.split(keep, sizes)]
    return _floor(counts, sizes, min_channels)


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
