"""Intra-layer pruning as column subset selection (CSS) of a conv weight matrix (ALGORITHM.md §2).

A conv weight ``W`` of shape ``(C_out, C_in, k, k)`` is read as ``X = reshape(W, (C_out, -1))ᵀ`` of shape
``(C_in·k·k, C_out)``: column ``j`` is output channel ``j``. Choosing which ``k`` channels to keep is choosing ``k``
columns that best span ``X``. Criteria, behind one function:

- ``qr``: column-pivoted QR (LAPACK ``geqp3`` through scipy, on a CPU float64 copy); the first ``k`` pivots are the
  kept channels. This is the QR-based CSS this project is specified with (the default).
- ``leverage``: top-``k`` leverage scores ``‖(V_k)_{j,:}‖₂`` from a thin SVD, as the official CLS code (``CSS``).
- ``l1``: filter L1 norm. Also the fallback of every criterion when ``X`` is wide (``C_in·k·k < C_out``), as upstream.

Channels that are currently pruned have all-zero columns, so they are never preferred over live ones.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

__all__ = ["CRITERIA", "weight_matrix", "qr_pivots", "leverage_scores", "l1_scores", "select_channels"]

CRITERIA = ("qr", "leverage", "l1")


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in, kh, kw)`` conv weight → ``(C_in·kh·kw, C_out)`` float64 CPU matrix whose columns are channels."""
    return weight.detach().reshape(weight.shape[0], -1).t().to(device="cpu", dtype=torch.float64)


def qr_pivots(x: torch.Tensor) -> torch.Tensor:
    """Column order chosen by pivoted QR of ``x`` (``(m, n)``; LAPACK geqp3). Returns a LongTensor permutation of n."""
    _, piv = scipy.linalg.qr(np.ascontiguousarray(x.numpy()), mode="r", pivoting=True, check_finite=False)
    return torch.from_numpy(np.asarray(piv, dtype=np.int64))


def leverage_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """Row norms of the top-``k`` right singular vectors of ``x`` (``(m, n)``) → ``(n,)`` scores."""
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:k].t().norm(dim=1)


def l1_scores(weight: torch.Tensor) -> torch.Tensor:
    """Filter L1 norms ``Σ|W_j|`` → ``(C_out,)``."""
    return weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1).to("cpu", torch.float64)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    # stable descending sort: ties keep the lower channel index, so the choice is deterministic
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def select_channels(weight: torch.Tensor, k: int, criterion: str = "qr") -> torch.Tensor:
    """Choose ``k`` output channels of a conv weight to keep.

    Args:
        weight: ``(C_out, C_in, kh, kw)`` (masked entries are zero).
        k: number of channels to keep, ``0 ≤ k ≤ C_out``.
        criterion: one of :data:`CRITERIA`.

    Returns:
        Sorted LongTensor of ``k`` channel indices (CPU).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown CSS criterion {criterion!r}; choose one of {CRITERIA}")
    c_out = weight.shape[0]
    if not 0 <= k <= c_out:
        raise ValueError(f"cannot keep {k} of {c_out} channels")
    if k == c_out:
        return torch.arange(c_out)
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    x = weight_matrix(weight)
    if criterion == "l1" or x.shape[0] < c_out:
        chosen = _top(l1_scores(weight), k)
    elif criterion == "qr":
        chosen = qr_pivots(x)[:k]
    else:
        chosen = _top(leverage_scores(x, k), k)
    return torch.sort(chosen).values
