"""Intra-layer pruning as column subset selection (CSS) of a conv weight matrix (docs/algorithm.md §3).

A conv weight ``W`` of shape ``(C_out, C_in, k, k)`` is read as ``X = reshape(W, (C_out, -1))ᵀ`` of shape
``(C_in·k·k, C_out)``: column ``j`` is output channel ``j``. Choosing which ``k`` channels to keep is choosing ``k``
columns that best span ``X``. Criteria, behind one function:

- ``qr``: column-pivoted QR (LAPACK ``geqp3`` through scipy, on a CPU float64 copy); the first ``k`` pivots are the
  kept channels. This is the QR-based CSS this project is specified with (the default).
- ``leverage``: top-``k`` leverage scores ``‖(V_k)_{j,:}‖₂`` from a thin SVD, as the official CLS code.
- ``l1``: filter L1 norm. Also the fallback of every criterion when ``X`` is wide (``C_in·k·k < C_out``), as upstream.

Live channels first. Channels that are currently pruned have all-zero columns, but "never preferred over live ones"
only holds while ``k`` is at most the rank of the live columns: past the rank every remaining residual is zero, and
geqp3 breaks those ties by position, leverage scores give null-space columns weight, so a pruned channel could be
"kept" in place of a live one. Given the live set, :func:`select_channels` therefore runs the criterion on the live
columns only, and when ``k`` exceeds the number of live channels it keeps them all and fills the remainder
deterministically: the pruned channels whose remembered (MRU) columns are farthest from the span of the live ones
(the regrowth score of docs/algorithm.md §4, taken greedily instead of sampled), ties to the lower index. Likewise
among the live columns, past their numerical rank the criterion's picks would be rounding noise; those picks follow
the L1 order instead (see ``_choose``).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

__all__ = ["CRITERIA", "weight_matrix", "qr_pivots", "leverage_scores", "l1_scores", "select_channels",
           "projection_residuals"]

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


def projection_residuals(x: torch.Tensor, kept: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``‖(I − P_S) x_j‖₂`` for each candidate column ``j`` of ``x`` (``(m, n)`` float64), ``S`` = ``kept`` columns:
    how badly the kept channels explain each candidate (the regrowth score, and the fill order above)."""
    xc = x[:, candidates]
    if kept.numel() == 0:
        return xc.norm(dim=0)
    xs = x[:, kept]
    coef = torch.linalg.pinv(xs) @ xc          # least-squares coefficients in the kept basis
    return (xc - xs @ coef).norm(dim=0)


#: singular values / QR diagonal entries below this fraction of the largest count as zero (numerical rank)
RANK_RTOL = 1e-10


def _numerical_rank(magnitudes: np.ndarray) -> int:
    """Rank from non-increasing ``|R_ii|`` (pivoted QR) or singular values: entries above ``RANK_RTOL`` × the first."""
    if magnitudes.size == 0 or magnitudes[0] == 0:
        return 0
    return int((magnitudes > RANK_RTOL * magnitudes[0]).sum())


def _choose(weight: torch.Tensor, x: torch.Tensor, cols: torch.Tensor, k: int, criterion: str) -> torch.Tensor:
    """``k`` of the columns ``cols`` of ``x`` by ``criterion`` (wide matrices: L1, decided on the full matrix).

    Past the numerical rank ``r`` of ``x[:, cols]`` QR residuals and null-space leverage are rounding noise, so a
    choice made from them would depend on the CPU's kernels and on the shape of the computation (a compact model
    would choose other channels than the masked one). The criterion therefore picks ``min(k, r)`` columns and the
    rest follow the L1 order of the remaining ones (the wide-matrix fallback), ties to the lower index."""
    l1 = l1_scores(weight)
    if criterion == "l1" or x.shape[0] < weight.shape[0]:
        return cols[_top(l1[cols], k)]
    sub = np.ascontiguousarray(x[:, cols].numpy())
    if criterion == "qr":
        r_mat, piv = scipy.linalg.qr(sub, mode="r", pivoting=True, check_finite=False)
        rank = _numerical_rank(np.abs(np.diag(r_mat)))
        head = torch.from_numpy(np.asarray(piv[:min(k, rank)], dtype=np.int64))
    else:
        sv = np.linalg.svd(sub, compute_uv=False)
        rank = _numerical_rank(sv)
        r = min(k, rank)
        head = _top(leverage_scores(x[:, cols], r), r) if r > 0 else torch.zeros(0, dtype=torch.long)
    if head.numel() == k:
        return cols[head]
    rest = torch.ones(cols.numel(), dtype=torch.bool)
    rest[head] = False
    rest_idx = rest.nonzero().flatten()
    fill = rest_idx[_top(l1[cols][rest_idx], k - head.numel())]
    return cols[torch.cat([head, fill])]


def select_channels(weight: torch.Tensor, k: int, criterion: str = "qr", *, live: torch.Tensor | None = None,
                    restored: torch.Tensor | None = None) -> torch.Tensor:
    """Choose ``k`` output channels of a conv weight to keep.

    Args:
        weight: ``(C_out, C_in, kh, kw)`` (masked entries are zero).
        k: number of channels to keep, ``0 ≤ k ≤ C_out``.
        criterion: one of :data:`CRITERIA`.
        live: bool ``(C_out,)``, the channels of the current sub-model; the criterion chooses among them, and only
            when ``k`` exceeds their number are others added (see the module docstring). None: all channels are
            candidates (the plain criterion on the whole matrix).
        restored: the weight with the pruned channels' remembered values, used to rank the fill; default ``weight``
            (all-zero pruned columns: the fill is then the lowest indices).

    Returns:
        Sorted LongTensor of ``k`` channel indices (CPU).

    Raises:
        ValueError: unknown criterion, ``k`` out of range, or a non-finite weight (QR and SVD would return
            arbitrary choices).
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
    if not bool(torch.isfinite(x).all()):
        raise ValueError("select_channels: the weight has NaN or Inf entries")
    if live is None:
        return torch.sort(_choose(weight, x, torch.arange(c_out), k, criterion)).values
    live_idx = live.to("cpu", torch.bool).nonzero().flatten()
    if k <= live_idx.numel():
        return torch.sort(_choose(weight, x, live_idx, k, criterion)).values
    dead = (~live.to("cpu", torch.bool)).nonzero().flatten()
    xr = x if restored is None else weight_matrix(restored)
    scores = projection_residuals(xr, live_idx, dead)
    fill = dead[_top(scores, k - live_idx.numel())]
    return torch.sort(torch.cat([live_idx, fill])).values
