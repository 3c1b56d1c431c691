"""Which pruned channels come back at an exploration event (docs/algorithm.md §4).

``importance``: each candidate column ``x_j`` (its most-recently-used values, restored before scoring) is scored by its
distance to the span of the kept columns, ``ε_j = ‖(I − P_S) x_j‖₂``; candidates are drawn without replacement with
probabilities ``softmax(ε)``. A channel the kept ones explain poorly is more likely to return.
``random``: uniform draw without replacement (the released DET/SEG variant).

All randomness comes from the caller's ``torch.Generator`` so every rank (and a resumed run) draws the same channels.
"""
from __future__ import annotations

import torch

from .css import projection_residuals, weight_matrix

__all__ = ["REGROW_METHODS", "projection_residuals", "regrow_channels"]

REGROW_METHODS = ("importance", "random")


def regrow_channels(weight: torch.Tensor, kept: torch.Tensor, n: int, generator: torch.Generator,
                    method: str = "importance") -> torch.Tensor:
    """Draw ``n`` channels to regrow among those not in ``kept``.

    Args:
        weight: ``(C_out, C_in, kh, kw)`` producer weight with pruned channels restored to their MRU values.
        kept: LongTensor of the channels kept by the pruning step.
        n: how many to regrow (clipped to the number of candidates; ``n ≤ 0`` regrows nothing).
        generator: CPU generator, seeded identically on every rank.
        method: one of :data:`REGROW_METHODS`.

    Returns:
        Sorted LongTensor of regrown channel indices, disjoint from ``kept``.
    """
    if method not in REGROW_METHODS:
        raise ValueError(f"unknown regrow method {method!r}; choose one of {REGROW_METHODS}")
    c_out = weight.shape[0]
    is_kept = torch.zeros(c_out, dtype=torch.bool)
    is_kept[kept] = True
    candidates = (~is_kept).nonzero().flatten()
    n = min(int(n), candidates.numel())
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    if method == "random":
        pick = torch.randperm(candidates.numel(), generator=generator)[:n]
    else:
        eps = projection_residuals(weight_matrix(weight), kept, candidates)
        if not bool(torch.isfinite(eps).all()):
            raise ValueError("regrow_channels: the weight has NaN or Inf entries")
        probs = torch.softmax(eps, dim=0)
        # underflowed probabilities would make a draw without replacement impossible; keep them tiny but positive
        probs = probs.clamp_min(1e-300)
        pick = torch.multinomial(probs, n, replacement=False, generator=generator)
    return torch.sort(candidates[pick]).values
