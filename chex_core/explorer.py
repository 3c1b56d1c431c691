"""ChannelExplorer: the one stateful object of CHEX (docs/algorithm.md §1–§6).

It owns the channel masks, the most-recently-used (MRU) values of pruned channels and the event counter. Training code
calls :meth:`ChannelExplorer.start` once at the beginning of a fresh run and :meth:`ChannelExplorer.after_step`
after every optimizer step; everything else happens inside.

One event, at the start of every ΔT-th unit up to T_max (the order of the official ``IS_update_channel_mask``):

0. every tensor the groups live in is checked for NaN/Inf (one error naming the tensors, the same on every rank);
1. δ_t from the cosine schedule; per-group keep counts at sparsity S (``keep``) and S − δ_t (``active``) from the
   global ``|γ|`` ranking (or uniform; a coupled group's channel ranks by the mean ``|γ|`` of its norms);
2. CSS on each group's current (masked) channel matrix chooses the ``keep`` channels among the live ones (the
   producer's weight; for a coupled group its producers' weights side by side, :meth:`ChannelExplorer.channel_weight`);
3. every pruned channel gets its MRU values back (every tensor of the group's :mod:`~chex_core.layout`);
4. ``active − keep`` channels regrow by importance sampling on the restored weights;
5. rank 0's masks are broadcast; the values of every channel outside the new masks are stored as the new MRU values;
6. masks are applied: pruned weights, γ/β and their optimizer state become exactly zero; regrown entries of Adam-like
   second moments get the layer's mean (:func:`chex_core.masking.fill_regrown_second_moments`).

The model may be moved or cast at any time (``model.to(device)``, ``.double()``, ``.half()``, a parameter
replaced): the per-step mask multipliers are rebuilt whenever a masked parameter's storage is no longer the one they
were built for (a per-parameter identity check, no per-step work proportional to the parameters' sizes).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed as dist_utils
from .allocate import ALLOCATIONS, keep_counts, uniform_keep_counts
from .budget import MacsModel, keep_counts_for_macs
from .css import CRITERIA, select_channels
from .groups import ChannelGroup
from .layout import GroupLayout, model_layout, tensor_dims
from .masking import MaskCache, fill_regrown_second_moments, liveness
from .regrow import REGROW_METHODS, regrow_channels
from .schedule import ExplorationSchedule

__all__ = ["ChannelExplorer", "EventReport", "NonFiniteWeightError"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_NORM_BUFFERS = ("running_mean", "running_var")


class NonFiniteWeightError(RuntimeError):
    """A tensor CHEX decides from holds NaN or Inf at an exploration event (raised on every rank alike)."""


@dataclass
class EventReport:
    """What one exploration event decided."""

    step: int
    delta: float
    keep: dict[str, int]
    active: dict[str, int]
    n_regrown: int
    density: float
    widths: dict[str, int] = field(default_factory=dict)


class ChannelExplorer:
    """Prune/regrow/re-allocate channels of ``groups`` in ``model`` on ``schedule``.

    Args:
        model: the unwrapped module the group names refer to (not the DDP wrapper).
        groups: channel groups, e.g. from :func:`chex_core.resnet_groups`.
        schedule: when events happen and how much regrows.
        criterion: intra-layer CSS criterion (``qr``, ``leverage``, ``l1``).
        regrow: ``importance`` (paper) or ``random``.
        allocation: ``global`` (paper, |γ| ranking) or ``uniform``.
        min_channels: floor on every group's width.
        seed: seed of the exploration RNG; the same on every rank (not the per-rank data seed).
        round_to: every group's width is rounded up to a multiple of this (tensor-core friendly; 1 = paper).
        target_macs: if set, each event's final-budget allocation is the global ranking cut that meets this many
            MACs (measured by ``macs_model``) instead of the channel sparsity S.
        macs_model: :class:`chex_core.budget.MacsModel` of ``model`` (required with ``target_macs``).
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], schedule: ExplorationSchedule, *,
                 criterion: str = "qr", regrow: str = "importance", allocation: str = "global",
                 min_channels: int = 1, seed: int = 0, round_to: int = 1, target_macs: int | None = None,
                 macs_model: MacsModel | None = None) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
        if regrow not in REGROW_METHODS:
            raise ValueError(f"unknown regrow method {regrow!r}; choose one of {REGROW_METHODS}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
        if min_channels < 1:
            raise ValueError(f"min_channels must be >= 1, got {min_channels}")
        if not groups:
            raise ValueError("no channel groups to explore")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        if target_macs is not None and macs_model is None:
            raise ValueError("target_macs needs a macs_model")
        self.model = model
        self.groups = list(groups)
        self.schedule = schedule
        self.criterion, self.regrow, self.allocation = criterion, regrow, allocation
        self.min_channels, self.seed = int(min_channels), int(seed)
        self.round_to, self.target_macs, self.macs_model = int(round_to), target_macs, macs_model
        modules = dict(model.named_modules())
        self.layouts: list[GroupLayout] = model_layout(self.groups)
        self._layout_of = {lay.name: lay for lay in self.layouts}
        for lay in self.layouts:
            for name in lay.modules():
                if name not in modules:
                    raise ValueError(f"group {lay.name!r} refers to {name!r}, which is not a module of the model")
        if len(self._layout_of) != len(self.layouts):
            raise ValueError("two channel groups have the same name")
        tensor_dims(self.layouts, narrowable_only=False)       # raises if two groups claim the same channels
        self._mods = modules
        self.masks: dict[str, torch.Tensor] = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        self.mru: dict[str, dict[str, torch.Tensor]] = {}
        self.event_count = 0
        self.last_event_step = 0
        self.started = False
        self._masker = MaskCache()
        self._build_cache()

    # ------------------------------------------------------------------ masks
    def _build_cache(self) -> None:
        """(Re)build the per-step mask multipliers for the current masks and the model's current tensors."""
        self._masker.build(self._mods, self.layouts, self.masks)

    def release_cache(self) -> None:
        """Drop the per-step multipliers and the parameter references they hold (compact training rebuilds the
        model after each event and masks it by other means; the cache would keep the old dense tensors alive).
        The next :meth:`apply_masks` rebuilds it (and raises ``ValueError`` if the model is narrower than the masks)."""
        self._masker.clear()

    @torch.no_grad()
    def apply_masks(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned channels in weights, norm γ/β, consumer inputs and (if given) the optimizer's state.

        If the model was moved, cast or had a masked parameter replaced since the last call, the multipliers are
        rebuilt first (:class:`chex_core.masking.MaskCache`), so masks apply in any order of calls."""
        if not self._masker.is_current():
            log.debug("CHEX: masked parameters were moved or replaced; rebuilding the mask multipliers")
            self._build_cache()
        self._masker.apply(optimizer)

    def _rounded(self, counts: list[int]) -> list[int]:
        if self.round_to == 1:
            return counts
        r = self.round_to
        return [min(g.size, -(-c // r) * r) for c, g in zip(counts, self.groups)]

    # ------------------------------------------------------------------ reports
    def widths(self) -> dict[str, int]:
        return {name: int(m.sum()) for name, m in self.masks.items()}

    def density(self) -> float:
        kept = sum(int(m.sum()) for m in self.masks.values())
        return kept / sum(g.size for g in self.groups)

    # ------------------------------------------------------------------ MRU store
    @torch.no_grad()
    def _store_mru(self) -> None:
        """Remember the current values of every channel outside the masks (called before they are zeroed)."""
        self.mru = {}
        for lay in self.layouts:
            idx = (~self.masks[lay.name]).nonzero().flatten()
            entry = {"index": idx.clone()}
            for s, t in lay.resolve(self._mods):
                entry[s.key] = t.detach().index_select(s.dim, idx.to(t.device)).clone().cpu()
            self.mru[lay.name] = entry

    @torch.no_grad()
    def _restore_mru(self) -> None:
        """Write the remembered values back into every currently pruned channel (docs/algorithm.md §4)."""
        for lay in self.layouts:
            entry = self.mru.get(lay.name)
            if entry is None or entry["index"].numel() == 0:
                continue
            for s, t in lay.resolve(self._mods):
                idx = entry["index"].to(t.device)
                t.index_copy_(s.dim, idx, entry[s.key].to(device=t.device, dtype=t.dtype))

    def _producer_weights(self, lay: GroupLayout, restored: bool) -> list[torch.Tensor]:
        """Each producer's weight as the model holds it now, or (``restored``) a copy with every pruned channel's
        MRU filter put back (the model is untouched)."""
        entry = self.mru.get(lay.name) if restored else None
        out = []
        for s in lay.slices:
            if s.role != "producer" or s.tensor != "weight":
                continue
            w = self._mods[s.module].weight.detach()
            if entry is not None and entry["index"].numel():
                w = w.clone().index_copy_(0, entry["index"].to(w.device),
                                          entry[s.key].to(device=w.device, dtype=w.dtype))
            out.append(w)
        return out

    def channel_weight(self, group: str | GroupLayout, restored: bool = False) -> torch.Tensor:
        """The matrix CSS and regrowth read for a group (by name), as a ``(C, …)`` tensor whose row ``j`` describes
        channel ``j`` (see :func:`chex_core.css.weight_matrix`).

        One producer: its weight itself (so internal groups decide exactly as upstream). Several producers (a
        coupled residual group): their weights flattened to ``(C, C_in·k·k)``, each divided by its Frobenius norm,
        side by side — the stacked channel matrix of docs/algorithm.md §2.1. Each producer is followed by its own
        norm layer, so a conv's weight scale does not change what the network computes; normalising stops the
        producer with the largest weights from deciding alone. ``restored``: pruned channels carry their MRU
        filters."""
        lay = group if isinstance(group, GroupLayout) else self._layout_of[group]
        weights = self._producer_weights(lay, restored)
        if len(weights) == 1:
            return weights[0]
        blocks = []
        for w in weights:
            w = w.reshape(w.shape[0], -1).to("cpu", torch.float64)
            norm = float(w.norm())
            blocks.append(w / norm if norm > 0 else w)
        return torch.cat(blocks, dim=1)

    def _select(self, lay: GroupLayout, k: int) -> torch.Tensor:
        """CSS among the live channels; past their number, the fill is ranked on the remembered filters."""
        live = self.masks[lay.name]
        restored = self.channel_weight(lay, restored=True) if k > int(live.sum()) else None
        return select_channels(self.channel_weight(lay), k, self.criterion, live=live, restored=restored)

    @torch.no_grad()
    def _check_finite(self, step: int) -> None:
        """Raise :class:`NonFiniteWeightError` naming every group tensor with NaN/Inf on any rank (flags are
        all-reduced, so every rank raises the same error at the same event instead of one rank hanging)."""
        names, flags = [], []
        for lay in self.layouts:
            for s, t in lay.resolve(self._mods):
                names.append(f"{s.module}.{s.tensor}")
                flags.append(torch.isfinite(t).all().logical_not())
        bad = dist_utils.all_reduce_max(torch.stack(flags).to(torch.int32).cpu())
        found = [n for n, b in zip(names, bad.tolist()) if b]
        if found:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise NonFiniteWeightError(
                f"CHEX event at step {step}: non-finite values (NaN/Inf) in {', '.join(found[:3])}{more}; training "
                "diverged before this event (lower the learning rate or loss scale, or resume from an earlier "
                "checkpoint)")

    def _liveness_changes(self, old: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        """``(parameter, live before, live after)`` full-shape bools for every masked parameter."""
        found: dict[int, tuple[nn.Parameter, dict, dict]] = {}
        for lay in self.layouts:
            for s, p in lay.parameters(self._mods):
                entry = found.setdefault(id(p), (p, {}, {}))
                entry[1][s.dim] = old[lay.name]
                entry[2][s.dim] = self.masks[lay.name]
        return [(p, liveness(p.shape, a), liveness(p.shape, b)) for p, a, b in found.values()]

    # ------------------------------------------------------------------ events
    def _generator(self, step: int) -> torch.Generator:
        # seeded from (seed, step): identical on every rank and after a resume, with no RNG state to carry
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))

    @torch.no_grad()
    def _broadcast_masks(self) -> None:
        """Rank 0 is the authority for masks and norm running stats (ranks see different data)."""
        if not dist_utils.is_dist():
            return
        packed = torch.cat([self.masks[g.name] for g in self.groups]).to(torch.uint8)
        dist_utils.broadcast_tensor_(packed)
        for g, chunk in zip(self.groups, torch.split(packed.bool(), [g.size for g in self.groups])):
            self.masks[g.name] = chunk.clone()

    @torch.no_grad()
    def _sync_norm_buffers(self) -> None:
        """Rank 0's running statistics of the groups' norms (they are stored in the MRU store and restored)."""
        if not dist_utils.is_dist():
            return
        for lay in self.layouts:
            for s, t in lay.resolve(self._mods):
                if s.role == "norm" and s.tensor in _NORM_BUFFERS:
                    dist_utils.broadcast_tensor_(t)

    @torch.no_grad()
    def start(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Initial sub-model: each group keeps its top-L1 ``1 − (S − δ0)`` share (of the random init)."""
        self._check_finite(0)
        self._sync_norm_buffers()
        sizes = [g.size for g in self.groups]
        counts = self._rounded(uniform_keep_counts(sizes, self.schedule.sparsity - self.schedule.delta0,
                                                   self.min_channels))
        for g, lay, k in zip(self.groups, self.layouts, counts):
            keep = select_channels(self.channel_weight(lay), k, "l1")
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[keep] = True
            self.masks[g.name] = mask
        self._broadcast_masks()
        self._store_mru()
        self._build_cache()
        self.apply_masks(optimizer)
        self.started = True
        log.info("CHEX start: %d groups, density %.3f (S=%.3f, delta0=%.3f), %d events planned",
                 len(self.groups), self.density(), self.schedule.sparsity, self.schedule.delta0,
                 len(self.schedule.event_steps()))

    @torch.no_grad()
    def importances(self) -> list[torch.Tensor]:
        """One importance per channel of each group, what the global ranking compares (docs/algorithm.md §5):
        ``|γ|`` of the group's norm, times the mask (pruned channels are 0). A coupled group has one norm per producer;
        its channel's importance is the mean of ``|γ|`` over them (docs/algorithm.md §2.1 says why the mean)."""
        out = []
        for g in self.groups:
            mask = self.masks[g.name]
            if len(g.norms) == 1:
                w = self._mods[g.norm].weight.detach()
                out.append(w * mask.to(w.device))
                continue
            # at least float32 (a half-precision mean could tie channels), never less than the weights' own
            gam = torch.stack([self._mods[n].weight.detach().abs() for n in g.norms])
            gam = gam.to(torch.promote_types(gam.dtype, torch.float32))
            out.append(gam.mean(dim=0) * mask.to(gam.device))
        return out

    def _budgets(self, delta: float) -> tuple[list[int], list[int]]:
        """Per-group ``keep`` (final budget) and ``active`` (keep + regrowth) counts from the current γ."""
        gammas = self.importances()
        if self.target_macs is not None:
            keep, sparsity = keep_counts_for_macs(self.allocation, gammas, [g.name for g in self.groups],
                                                  self.macs_model, self.target_macs, self.min_channels,
                                                  self.round_to)
        else:
            sparsity = self.schedule.sparsity
            keep = self._rounded(keep_counts(self.allocation, gammas, sparsity, self.min_channels))
        active = self._rounded(keep_counts(self.allocation, gammas, max(sparsity - delta, 0.0), self.min_channels))
        return keep, [max(a, k) for a, k in zip(active, keep)]

    @torch.no_grad()
    def explore(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> EventReport:
        """Run one prune/regrow/re-allocate event now (normally called by :meth:`after_step`).

        Raises:
            NonFiniteWeightError: a group tensor holds NaN/Inf (on any rank); nothing is changed.
        """
        self._check_finite(step)
        self._sync_norm_buffers()
        delta = self.schedule.regrow_fraction(step)
        keep, active = self._budgets(delta)
        kept = [self._select(lay, k) for lay, k in zip(self.layouts, keep)]
        self._restore_mru()
        gen = self._generator(step)
        old_masks, n_regrown = dict(self.masks), 0
        for g, lay, k_idx, k, a in zip(self.groups, self.layouts, kept, keep, active):
            # after _restore_mru the model holds every pruned channel's remembered values
            grown = regrow_channels(self.channel_weight(lay), k_idx, a - k, gen, self.regrow)
            n_regrown += grown.numel()
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[k_idx] = True
            mask[grown] = True
            self.masks[g.name] = mask
        self._broadcast_masks()
        self._store_mru()
        self._build_cache()
        if optimizer is not None and optimizer.state:
            fill_regrown_second_moments(optimizer, self._liveness_changes(old_masks))
        self.apply_masks(optimizer)
        self.event_count += 1
        self.last_event_step = step
        report = EventReport(step, delta, dict(zip(self.masks, keep)), dict(zip(self.masks, active)), n_regrown,
                             self.density(), self.widths())
        log.info("CHEX event %d at step %d: delta=%.4f regrown=%d density=%.4f", self.event_count, step, delta,
                 n_regrown, report.density)
        return report

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> EventReport | None:
        """Call after every optimizer step (``step`` = optimizer steps completed, from 1).

        Re-applies the masks (pruned weights, γ/β and momentum stay exactly zero under momentum and weight decay) and
        runs an exploration event when the schedule says so. Returns the event's report, or None.
        """
        if not self.started:
            raise RuntimeError("ChannelExplorer.after_step() before start() (or load_state_dict() on resume)")
        if self.schedule.is_event(step) and step > self.last_event_step:
            return self.explore(step, optimizer)
        self.apply_masks(optimizer)
        return None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Masks, MRU store, counters and config: tensors and plain containers only (``weights_only`` loadable)."""
        return {
            "version": _STATE_VERSION,
            "groups": [[g.name, g.size] for g in self.groups],
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "mru": {k: {kk: vv.clone() for kk, vv in e.items()} for k, e in self.mru.items()},
            "event_count": self.event_count,
            "last_event_step": self.last_event_step,
            "started": self.started,
            "config": {"criterion": self.criterion, "regrow": self.regrow, "allocation": self.allocation,
                       "min_channels": self.min_channels, "seed": self.seed, "round_to": self.round_to,
                       "target_macs": self.target_macs,
                       "interval": self.schedule.interval, "t_max": self.schedule.t_max,
                       "sparsity": self.schedule.sparsity, "delta0": self.schedule.delta0,
                       "steps_per_unit": self.schedule.steps_per_unit},
        }

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore from :meth:`state_dict`. Raises ``ValueError`` naming what does not match this model."""
        missing = [k for k in ("groups", "masks", "mru", "event_count", "last_event_step") if k not in state]
        if missing:
            raise ValueError(f"explorer state is missing {missing}: not a CHEX explorer checkpoint")
        theirs = {name: int(size) for name, size in state["groups"]}
        ours = {g.name: g.size for g in self.groups}
        if theirs != ours:
            diff = sorted(set(theirs.items()) ^ set(ours.items()))[:4]
            raise ValueError(f"explorer state does not match the model's channel groups (e.g. {diff}); "
                             "was it saved for another architecture or with other CHEX options (--chex-residual, "
                             "--chex-prune-downsample)?")
        for name, m in state["masks"].items():
            if m.numel() != ours[name]:
                raise ValueError(f"explorer mask for {name!r} has {m.numel()} channels, model has {ours[name]}")
        self.masks = {g.name: state["masks"][g.name].to(torch.bool).cpu().clone() for g in self.groups}
        self.mru = {k: {kk: vv.clone() for kk, vv in e.items()} for k, e in state["mru"].items()}
        self.event_count = int(state["event_count"])
        self.last_event_step = int(state["last_event_step"])
        self.started = bool(state.get("started", True))
        self._build_cache()
        self.apply_masks(optimizer)
