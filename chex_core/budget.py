"""Budgets by FLOPs instead of by channel sparsity, and channel rounding.

:class:`MacsModel` probes a model once (one batch-1 forward with hooks) and afterwards gives the paper-convention MACs
of any width assignment analytically: every conv contributes ``k²·H_out·W_out / groups · C_in · C_out`` (a linear
layer ``rows · C_in · C_out``) where ``C_in`` and ``C_out`` are the widths of the groups it reads and writes (or the
dense width). That is exactly :func:`chex_core.count_macs` of the masked model (zero-aware) and of the compact one,
without a forward pass, so a bisection over the global ranking can hit a FLOPs target to within one channel.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .allocate import keep_counts
from .groups import ChannelGroup
from .layout import model_layout

__all__ = ["MacsModel", "parse_flops", "keep_counts_for_macs", "sparsity_for_macs", "FeasibilityReport"]


@dataclass(frozen=True)
class _Term:
    coeff: float            # k²·H·W/groups (or rows for linear)
    in_group: str | None
    c_in: int
    out_group: str | None
    c_out: int


class MacsModel:
    """Analytic MACs of ``module`` as a function of the groups' widths.

    Args:
        module: the module the groups' names refer to (whole classifier, SSD, Mask R-CNN, or a backbone).
        groups: its channel groups.
        input_size: ``(C, H, W)`` of the image the FLOPs are quoted at (224 px for ImageNet, 300 px for SSD).
        within: dotted path of the sub-module whose MACs are counted and that is run on the image (``"backbone"``,
            ``"backbone.body"``: the papers quote detection/segmentation FLOPs of the backbone only); default the
            whole ``module``. Layers outside it (an FPN lateral reading a residual group) do not count.

    A residual group's width enters every conv that writes or reads the stream (and the classifier), each through
    its own term, so narrowing one residual group is credited in all of them.
    """

    def __init__(self, module: nn.Module, groups: Sequence[ChannelGroup], input_size: Sequence[int], *,
                 within: str = "") -> None:
        layouts = model_layout(groups)
        out_of = {m: lay.name for lay in layouts for m in lay.modules("producer")}
        in_of = {m: lay.name for lay in layouts for m in lay.modules("consumer")}
        self.sizes = {g.name: g.size for g in groups}
        self.residual = any(g.kind == "residual" for g in groups)
        terms: list[_Term] = []
        hooks = []

        def hook(name):
            def fn(m, _inp, out):
                if isinstance(m, nn.Conv2d):
                    coeff = m.kernel_size[0] * m.kernel_size[1] * out.shape[-1] * out.shape[-2] / m.groups
                    terms.append(_Term(coeff, in_of.get(name), m.in_channels, out_of.get(name), m.out_channels))
                else:
                    rows = out.numel() / out.shape[0] / m.out_features
                    terms.append(_Term(rows, in_of.get(name), m.in_features, None, m.out_features))
            return fn

        probe = module.get_submodule(within) if within else module
        prefix = f"{within}." if within else ""
        for name, m in probe.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_hook(hook(prefix + name)))
        was_training = probe.training
        probe.eval()
        p = next(probe.parameters())
        try:
            with torch.no_grad():
                probe(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
        finally:
            probe.train(was_training)
            for h in hooks:
                h.remove()
        self.terms = terms

    def macs(self, widths: Mapping[str, int] | None = None) -> int:
        """MACs with the given group widths (missing groups dense)."""
        widths = widths or {}
        total = 0.0
        for t in self.terms:
            c_in = widths.get(t.in_group, t.c_in) if t.in_group else t.c_in
            c_out = widths.get(t.out_group, t.c_out) if t.out_group else t.c_out
            total += t.coeff * c_in * c_out
        return int(round(total))

    def dense(self) -> int:
        return self.macs()

    def floor(self, min_channels: int = 1, round_to: int = 1) -> int:
        """The smallest reachable MACs: every group at its floor."""
        return self.macs({g: min(s, _round(min_channels, round_to)) for g, s in self.sizes.items()})


def _round(c: int, round_to: int) -> int:
    return int(math.ceil(c / round_to) * round_to) if round_to > 1 else int(c)


_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_flops(text: str, dense: int) -> int:
    """``"2G"``, ``"500M"``, ``"2e9"`` → MACs; a number ≤ 1 (``"0.5"``) is a fraction of ``dense``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGT]?)(?:FLOPS|MACS)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot read a FLOPs target from {text!r} (examples: 2G, 500M, 2e9, 0.5)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise ValueError(f"FLOPs target must be positive, got {text!r}")
    return int(round(value * dense)) if value <= 1 and not m.group(2) else int(round(value))


def _counts(policy: str, importances: Sequence[torch.Tensor], n_drop: int, n_total: int, min_channels: int,
            round_to: int) -> list[int]:
    counts = keep_counts(policy, importances, n_drop / n_total, min_channels)
    sizes = [int(t.numel()) for t in importances]
    return [min(s, _round(c, round_to)) for c, s in zip(counts, sizes)]


def keep_counts_for_macs(policy: str, importances: Sequence[torch.Tensor], names: Sequence[str], model: MacsModel,
                         target: int, min_channels: int = 1, round_to: int = 1) -> tuple[list[int], float]:
    """Keep counts whose MACs are the largest ≤ ``target`` (bisection over how many channels the ranking drops).

    Returns the counts and the channel sparsity they correspond to (dropped / total before floors)."""
    n_total = sum(int(t.numel()) for t in importances)

    def macs(n_drop):
        return model.macs(dict(zip(names, _counts(policy, importances, n_drop, n_total, min_channels, round_to))))

    lo, hi = 0, n_total - 1
    if macs(lo) <= target:
        return _counts(policy, importances, lo, n_total, min_channels, round_to), 0.0
    while lo < hi:                      # smallest n_drop with macs ≤ target (macs is non-increasing in n_drop)
        mid = (lo + hi) // 2
        if macs(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return _counts(policy, importances, lo, n_total, min_channels, round_to), lo / n_total


@dataclass(frozen=True)
class FeasibilityReport:
    dense: int
    floor: int
    target: int
    sparsity: float
    achieved: int

    def __str__(self) -> str:
        g = 1e9
        return (f"FLOPs target {self.target / g:.3f} G: dense {self.dense / g:.3f} G, reachable minimum "
                f"{self.floor / g:.3f} G (every layer at its floor); uniform channel sparsity {self.sparsity:.4f} "
                f"gives {self.achieved / g:.3f} G ({100 * self.achieved / self.dense:.1f} % of dense)")


def sparsity_for_macs(model: MacsModel, target: int, min_channels: int = 1, round_to: int = 1) -> FeasibilityReport:
    """The uniform channel sparsity that meets ``target`` (used to set S before training), or ``ValueError`` when the
    target is outside what the prunable layers can reach."""
    floor, dense = model.floor(min_channels, round_to), model.dense()
    if target >= dense:
        raise ValueError(f"FLOPs target {target / 1e9:.3f} G is not below the dense model's {dense / 1e9:.3f} G")
    if target < floor:
        never = "only the image input and the classifier's outputs are fixed" if model.residual else \
            "stem, residual stream and classifier are not explored; --chex-residual explores the residual stream"
        raise ValueError(f"FLOPs target {target / 1e9:.3f} G cannot be met: with every prunable layer at "
                         f"{min_channels} channel(s) the model still needs {floor / 1e9:.3f} G ({never})")
    names = list(model.sizes)
    ones = [torch.ones(model.sizes[n]) for n in names]
    counts, _ = keep_counts_for_macs("uniform", ones, names, model, target, min_channels, round_to)
    kept = sum(counts)
    total = sum(model.sizes.values())
    achieved = model.macs(dict(zip(names, counts)))
    return FeasibilityReport(dense, floor, target, 1 - kept / total, achieved)
