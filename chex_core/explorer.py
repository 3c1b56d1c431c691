"""ChannelExplorer: the one stateful object of CHEX (ALGORITHM.md §1–§5).

It owns the channel masks, the most-recently-used (MRU) values of pruned channels and the event counter. Training code
calls :meth:`ChannelExplorer.start` once at the beginning of a fresh run and :meth:`ChannelExplorer.after_step`
after every optimizer step; everything else happens inside.

One event, at the start of every ΔT-th unit up to T_max (the order of the official ``IS_update_channel_mask``):

1. δ_t from the cosine schedule; per-group keep counts at sparsity S (``keep``) and S − δ_t (``active``) from the
   global ``|γ|`` ranking (or uniform);
2. CSS on each producer's current (masked) weights chooses the ``keep`` channels;
3. every pruned channel gets its MRU values back (producer filter, norm γ/β and running stats, consumer input slice);
4. ``active − keep`` channels regrow by importance sampling on the restored weights;
5. rank 0's masks are broadcast; the values of every channel outside the new masks are stored as the new MRU values;
6. masks are applied: pruned weights, γ/β and their optimizer state become exactly zero.
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
from .css import CRITERIA, l1_scores, select_channels
from .groups import ChannelGroup
from .regrow import REGROW_METHODS, regrow_channels
from .schedule import ExplorationSchedule

__all__ = ["ChannelExplorer", "EventReport"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_NORM_BUFFERS = ("running_mean", "running_var")


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
        for g in self.groups:
            for name in (g.producer, g.norm, *g.consumers):
                if name not in modules:
                    raise ValueError(f"group {g.name!r} refers to {name!r}, which is not a module of the model")
        self._mods = modules
        self.masks: dict[str, torch.Tensor] = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        self.mru: dict[str, dict[str, torch.Tensor]] = {}
        self.event_count = 0
        self.last_event_step = 0
        self.started = False
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._build_cache()

    # ------------------------------------------------------------------ masks
    def _slices(self, g: ChannelGroup) -> list[tuple[str, torch.Tensor, int]]:
        """Every tensor a group's channels live in: (key, tensor, channel dim)."""
        prod, norm = self._mods[g.producer], self._mods[g.norm]
        out = [("producer.weight", prod.weight.data, 0)]
        if getattr(prod, "bias", None) is not None:
            out.append(("producer.bias", prod.bias.data, 0))
        out += [("norm.weight", norm.weight.data, 0), ("norm.bias", norm.bias.data, 0)]
        for buf in _NORM_BUFFERS:
            t = getattr(norm, buf, None)
            if t is not None:
                out.append((f"norm.{buf}", t, 0))
        for i, c in enumerate(g.consumers):
            out.append((f"consumer{i}.weight", self._mods[c].weight.data, 1))
        return out

    def _params(self, g: ChannelGroup) -> list[tuple[nn.Parameter, int]]:
        """The parameters masking touches (not the running statistics), with their channel dim."""
        prod, norm = self._mods[g.producer], self._mods[g.norm]
        ps = [(prod.weight, 0)]
        if getattr(prod, "bias", None) is not None:
            ps.append((prod.bias, 0))
        ps += [(norm.weight, 0), (norm.bias, 0)]
        ps += [(self._mods[c].weight, 1) for c in g.consumers]
        return ps

    def _build_cache(self) -> None:
        """One full-shape multiplier per masked parameter (the product of its output- and input-side masks), so the
        per-step re-application is a single fused ``_foreach_mul_`` over parameters (and one over optimizer state)."""
        mult: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for g in self.groups:
            m = self.masks[g.name]
            for p, dim in self._params(g):
                shape = [1] * p.dim()
                shape[dim] = -1
                view = m.to(device=p.device, dtype=p.dtype).view(shape)
                if id(p) in mult:
                    mult[id(p)] = (p, mult[id(p)][1] * view)
                else:
                    mult[id(p)] = (p, view.expand_as(p).clone())
        self._cache = list(mult.values())
        self._params_list = [p.data for p, _ in self._cache]
        self._mult_list = [m for _, m in self._cache]

    def release_cache(self) -> None:
        """Drop the per-step multipliers and the parameter references they hold (compact training rebuilds the
        model after each event and masks it by other means; the cache would keep the old dense tensors alive).
        ``apply_masks`` must not be called until the cache is rebuilt (``_build_cache``)."""
        self._cache, self._params_list, self._mult_list = [], [], []

    @torch.no_grad()
    def apply_masks(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned channels in weights, norm γ/β, consumer inputs and (if given) the optimizer's state."""
        torch._foreach_mul_(self._params_list, self._mult_list)
        if optimizer is None or not optimizer.state:
            return
        states, mults = [], []
        for p, m in self._cache:
            state = optimizer.state.get(p)
            if state:
                for v in state.values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        states.append(v)
                        mults.append(m)
        if states:
            torch._foreach_mul_(states, mults)

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
        for g in self.groups:
            idx = (~self.masks[g.name]).nonzero().flatten()
            entry = {"index": idx.clone()}
            for key, t, dim in self._slices(g):
                entry[key] = t.index_select(dim, idx.to(t.device)).detach().clone().cpu()
            self.mru[g.name] = entry

    @torch.no_grad()
    def _restore_mru(self) -> None:
        """Write the remembered values back into every currently pruned channel (ALGORITHM.md §3.2)."""
        for g in self.groups:
            entry = self.mru.get(g.name)
            if entry is None or entry["index"].numel() == 0:
                continue
            for key, t, dim in self._slices(g):
                idx = entry["index"].to(t.device)
                t.index_copy_(dim, idx, entry[key].to(device=t.device, dtype=t.dtype))

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
        if not dist_utils.is_dist():
            return
        for g in self.groups:
            norm = self._mods[g.norm]
            for buf in _NORM_BUFFERS:
                t = getattr(norm, buf, None)
                if t is not None:
                    dist_utils.broadcast_tensor_(t)

    @torch.no_grad()
    def start(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Initial sub-model: each group keeps its top-L1 ``1 − (S − δ0)`` share (of the random init)."""
        self._sync_norm_buffers()
        sizes = [g.size for g in self.groups]
        counts = self._rounded(uniform_keep_counts(sizes, self.schedule.sparsity - self.schedule.delta0,
                                                   self.min_channels))
        for g, k in zip(self.groups, counts):
            keep = select_channels(self._mods[g.producer].weight, k, "l1")
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
    def explore(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> EventReport:
        """Run one prune/regrow/re-allocate event now (normally called by :meth:`after_step`)."""
        self._sync_norm_buffers()
        delta = self.schedule.regrow_fraction(step)
        gammas = [self._mods[g.norm].weight.detach() * self.masks[g.name].to(self._mods[g.norm].weight.device)
                  for g in self.groups]
        if self.target_macs is not None:
            keep, sparsity = keep_counts_for_macs(self.allocation, gammas, [g.name for g in self.groups],
                                                  self.macs_model, self.target_macs, self.min_channels,
                                                  self.round_to)
        else:
            sparsity = self.schedule.sparsity
            keep = self._rounded(keep_counts(self.allocation, gammas, sparsity, self.min_channels))
        active = self._rounded(keep_counts(self.allocation, gammas, max(sparsity - delta, 0.0), self.min_channels))
        active = [max(a, k) for a, k in zip(active, keep)]
        kept = [select_channels(self._mods[g.producer].weight, k, self.criterion) for g, k in zip(self.groups, keep)]
        self._restore_mru()
        gen = self._generator(step)
        n_regrown = 0
        for g, k_idx, k, a in zip(self.groups, kept, keep, active):
            grown = regrow_channels(self._mods[g.producer].weight, k_idx, a - k, gen, self.regrow)
            n_regrown += grown.numel()
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[k_idx] = True
            mask[grown] = True
            self.masks[g.name] = mask
        self._broadcast_masks()
        self._store_mru()
        self._build_cache()
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
                             "was it saved for another architecture or with other CHEX options?")
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
