"""Helpers shared by the benchmark scripts: timing, FLOPs targeting for the explorer, machine description.

Nothing here prunes, regrows, allocates channels or counts FLOPs: those stay in ``chex_core``. This module only *asks*
``chex_core`` what a given global sparsity would produce (``chex_core.allocate.keep_counts`` is the same function the
explorer calls at an event) and what it costs (``chex_core.budget.MacsModel``), so a script can choose the sparsity
that lands on a FLOPs budget.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import platform
from collections.abc import Callable, Sequence

import torch
from torch import nn

from chex_core import ChannelExplorer, ChannelGroup
from chex_core.allocate import keep_counts, uniform_keep_counts
from chex_core.budget import MacsModel

log = logging.getLogger(__name__)

__all__ = ["sync", "machine_info", "WidthMacs", "bisect_sparsity", "retarget_explorer",
           "uniform_widths"]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info() -> dict:
    """What the numbers were measured on: CPU count, torch threads, load average, GPU name if any."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:        # not available on every platform
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class WidthMacs:
    """MACs (paper convention) of ``model`` with one width per channel group, as a function of the widths.

    This is ``chex_core.budget.MacsModel`` (one probe forward, then analytic: the same count as ``count_macs`` of the
    masked or the compact model) keyed by the order of ``groups``; downsample groups are never narrowed and are left
    out. ``model`` is left untouched.

    Args:
        model: a dense model.
        groups: its channel groups (e.g. ``resnet_groups(model)``, or ``resnet_groups(model, residual=True)``: the
            residual streams narrow too).
        input_size: ``(C, H, W)`` of one image.
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], input_size: Sequence[int]) -> None:
        self.groups = [g for g in groups if g.kind != "downsample"]
        self.macs_model = MacsModel(copy.deepcopy(model).cpu().float(), self.groups, tuple(input_size))
        self.dense = self.macs_model.dense()

    def __call__(self, widths: Sequence[int]) -> int:
        return self.macs_model.macs({g.name: int(w) for g, w in zip(self.groups, widths)})


def bisect_sparsity(widths_for: Callable[[float], Sequence[int]], macs_of: Callable[[Sequence[int]], int],
                    target: float, lo: float = 0.0, hi: float = 0.99, iters: int = 30) -> tuple[float, int]:
    """Smallest-error global sparsity ``s`` in ``[lo, hi]`` whose widths give ``target`` MACs.

    MACs fall (weakly) as ``s`` grows for every allocation rule used here, so bisection applies; the best point seen is
    returned (a step function cannot always be hit exactly).

    Returns:
        ``(s, macs)`` of the closest point found.
    """
    best = (lo, macs_of(widths_for(lo)))
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = macs_of(widths_for(mid))
        if abs(m - target) < abs(best[1] - target):
            best = (mid, m)
        if abs(best[1] - target) <= 1e-3 * target:        # closer than one narrow channel matters
            break
        if m > target:
            lo = mid
        else:
            hi = mid
    return best


def uniform_widths(groups: Sequence[ChannelGroup], sparsity: float, min_channels: int = 1) -> list[int]:
    """Widths of the explorer's ``uniform`` rule (also its initial sub-model) at ``sparsity``."""
    return uniform_keep_counts([g.size for g in groups], sparsity, min_channels)


def retarget_explorer(explorer: ChannelExplorer, macs_of: WidthMacs, target: float) -> float:
    """Set ``explorer``'s global sparsity S so that its *next* event lands on ``target`` MACs; returns S.

    The explorer's allocation at an event is ``keep_counts(allocation, γ·mask, S)``; this evaluates exactly that rule
    on the current γ for candidate values of S and keeps the one whose widths are closest to the budget. Only the
    schedule's ``sparsity`` field changes (δ0, ΔT and T_max stay); S never drops below δ0 (the schedule requires it).
    """
    ex = explorer
    gammas = [t.detach().cpu() for t in ex.importances()]     # |γ|·mask; a residual group's mean |γ| over its norms

    def widths_for(s: float) -> list[int]:
        return keep_counts(ex.allocation, gammas, s, ex.min_channels)

    s, _ = bisect_sparsity(widths_for, macs_of, target, lo=ex.schedule.delta0)
    ex.schedule = dataclasses.replace(ex.schedule, sparsity=s)
    return s
