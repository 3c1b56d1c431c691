"""Orchestration of physically compact training: :class:`PhysicalTraining` narrows the model around the explorer,
widens it for each exploration event and narrows it again, then rebuilds the optimizer, re-points the scheduler and
trainer, and re-wraps (see the package docstring for the design)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..explorer import ChannelExplorer, EventReport
from ..masking import MaskCache, fill_regrown_second_moments, liveness
from .optimizer import rebuild_optimizer
from .scheduler import repoint_scheduler
from .surgery import Index, channel_layout, expand_state_dict, full_index, remap_channels, resize_

__all__ = ["MODES", "PhysicalTraining"]

log = logging.getLogger(__name__)

MODES = ("explore", "frozen")
_STATE_VERSION = 1


class PhysicalTraining:
    """Keep the training model physically compact around a :class:`ChannelExplorer`.

    Use it in place of the explorer's hook: ``TrainStep(..., explorer=phys)`` or ``phys.after_step(step)`` after
    every optimizer step. Read the current objects from ``phys.optimizer`` and ``phys.train_model`` (they change at
    every rebuild; ``on_rebuild`` tells you when).

    Args:
        model: the unwrapped model the explorer was built on (``explorer.model``).
        explorer: the explorer; ``start()`` or ``load_state_dict()`` it before :meth:`start`.
        optimizer: the optimizer over ``model``'s parameters.
        mode: ``explore`` (compact from the start, rebuilt at every event) or ``frozen`` (masked until the last
            event, compact after).
        lr_scheduler: re-pointed at each new optimizer.
        trainer: anything with an ``optimizer`` attribute (``chex_core.engine.TrainStep``), re-pointed too.
        wrap: ``model → training module`` applied after every rebuild (``ddp_wrapper(...)``, ``torch.compile``…);
            default: the model itself.
        param_groups: optional param-group policy for :func:`rebuild_optimizer`.
        on_rebuild: called as ``on_rebuild(self)`` after every rebuild (e.g. to update a loop's model reference).
        root: the whole network when ``model`` is a part of it (an SSD feature extractor, a Mask R-CNN backbone body):
            the optimizer covers ``root``'s parameters and ``wrap`` wraps ``root``. Default: ``model``.
    """

    def __init__(self, model: nn.Module, explorer: ChannelExplorer, optimizer: torch.optim.Optimizer, *,
                 mode: str = "explore", lr_scheduler=None, trainer=None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None,
                 param_groups: Callable[[nn.Module], Sequence[Sequence[nn.Parameter]]] | None = None,
                 on_rebuild: Callable[[PhysicalTraining], None] | None = None,
                 root: nn.Module | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown compact-training mode {mode!r}; choose one of {MODES}")
        if explorer.model is not model:
            raise ValueError("PhysicalTraining needs the unwrapped model the explorer was built on")
        self.model, self.explorer, self.optimizer, self.mode = model, explorer, optimizer, mode
        self.root = root if root is not None else model
        if not any(m is model for m in self.root.modules()):
            raise ValueError("PhysicalTraining: model is not a sub-module of root")
        self.groups = list(explorer.groups)
        self.lr_scheduler, self.trainer = lr_scheduler, trainer
        self.wrap = wrap or (lambda m: m)
        self.param_groups, self.on_rebuild = param_groups, on_rebuild
        self._dense_layouts = [lay for lay in explorer.layouts if not lay.narrowable]   # kept full width, masked
        self.held: dict[str, torch.Tensor] = full_index(self.groups)
        self.compact = False
        self.rebuilds = 0
        self._dense = MaskCache()
        self.train_model: nn.Module = self.root    # wrapped by start() / load_state_dict()

    # ----------------------------------------------------------------- public
    def start(self, step: int = 0) -> None:
        """Narrow the model now (``explore`` mode, or ``frozen`` past the last event). Call once after
        ``explorer.start(optimizer)`` on a fresh run (a resume goes through :meth:`load_state_dict`)."""
        if not self.explorer.started:
            raise RuntimeError("PhysicalTraining.start() before explorer.start() or explorer.load_state_dict()")
        if self.mode == "explore" or self.explorer.schedule.frozen(step):
            self._rebuild(None, self._active())
        else:
            self.train_model = self.wrap(self.root)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> EventReport | None:
        """Call after every optimizer step (``step`` = optimizer steps completed). Returns the event report or None."""
        if optimizer is not None and optimizer is not self.optimizer:
            raise RuntimeError("after_step() got an optimizer that is not PhysicalTraining.optimizer: a training "
                               "loop still holds an optimizer from before a rebuild (pass trainer=/on_rebuild=)")
        schedule = self.explorer.schedule
        if not self.compact:
            report = self.explorer.after_step(step, self.optimizer)
            if schedule.frozen(step):
                self._rebuild(None, self._active())
            return report
        if schedule.is_event(step) and step > self.explorer.last_event_step:
            return self._rebuild(step, None)
        self._mask_dense_groups()
        return None

    def width_spec(self) -> dict[str, int]:
        """``{group name: width}`` of the model as it is now (the input of ``chex_core.apply_width_spec``)."""
        return {g.name: int(self.held[g.name].numel()) for g in self.groups if g.kind != "downsample"}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """``model``'s ``state_dict`` (names relative to ``model``) at full size, pruned channels zero: what the
        masked model would hold."""
        return expand_state_dict(self.model.state_dict(), self.groups, self.held)

    def state_dict(self) -> dict:
        """Width spec and held channel positions (tensors and plain containers). The explorer, model and optimizer
        states are saved by the caller next to it, as in masked training."""
        return {"version": _STATE_VERSION, "mode": self.mode, "compact": self.compact,
                "width_spec": self.width_spec(), "held": {k: v.clone() for k, v in self.held.items()},
                "rebuilds": self.rebuilds}

    def load_state_dict(self, state: Mapping, *, explorer_state: Mapping,
                        model_state: Mapping[str, torch.Tensor] | None = None,
                        optimizer_state: Mapping | None = None) -> None:
        """Resume: load the explorer on the freshly built dense model, narrow the model by slicing to the saved
        channels, then load the compact ``root`` and optimizer states (strictly).

        Raises:
            ValueError: the state is not a compact-training state, or does not fit this model/explorer.
        """
        if "held" not in state or "compact" not in state:
            raise ValueError("not a compact-training state (missing 'held'/'compact'); was the checkpoint written "
                             "without --compact-training?")
        if self.compact:
            raise RuntimeError("load_state_dict() on a model that is already compact: build a fresh dense model")
        self.explorer.load_state_dict(dict(explorer_state), self.optimizer)
        held = {k: v.to(torch.long).cpu() for k, v in state["held"].items()}
        if set(held) != set(self.held):
            raise ValueError(f"compact-training state has groups {sorted(held)[:3]}…, the model "
                             f"{sorted(self.held)[:3]}…")
        self.rebuilds = int(state.get("rebuilds", 0))
        if state["compact"]:
            active = self._active()
            if self.mode == "explore" and any(not torch.equal(held[k], active[k]) for k in held):
                raise ValueError("compact-training state and explorer masks disagree on the active channels")
            self._rebuild(None, held, count=False)
        else:
            self.train_model = self.wrap(self.root)
        if model_state is not None:
            self.root.load_state_dict(model_state, strict=True)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    # ----------------------------------------------------------------- internals
    def _active(self) -> dict[str, torch.Tensor]:
        return {g.name: self.explorer.masks[g.name].nonzero().flatten() for g in self.groups if g.kind != "downsample"}

    def _named_params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def _rebuild(self, step: int | None, target: Index | None, count: bool = True) -> EventReport | None:
        """Resize to ``target``, or (``step`` given) widen → explore → narrow to the new active channels; then
        rebuild the optimizer, re-point scheduler/trainer and re-wrap."""
        before = self._named_params()
        held, old_masks = self.held, dict(self.explorer.masks)
        report = None
        if step is not None:
            full = full_index(self.groups)
            resize_(self.model, self.groups, held, full)
            # the model now equals the masked model; the explorer decides on it exactly as in masked training.
            # optimizer=None: the optimizer state is transplanted below, from the compact state directly.
            report = self.explorer.explore(step, None)
            target = self._active()
            resize_(self.model, self.groups, full, target)
        else:
            resize_(self.model, self.groups, held, target)
        # explore() leaves the explorer's per-step mask cache pointing at the full-size parameters it saw; in compact
        # mode that masking is never used, and those tensors must not stay alive (a dense copy of every pruned layer)
        self.explorer.release_cache()
        self._rebuild_optimizer(before, held, target, old_masks)
        self.held = {k: v.clone() for k, v in target.items()}
        self.compact = True
        self._dense.build(self._modules(), self._dense_layouts, self.explorer.masks)
        self._mask_dense_groups()
        self._repoint_and_wrap(step, count)
        return report

    def _rebuild_optimizer(self, before: dict[str, nn.Parameter], held: Index, target: Index,
                           old_masks: Mapping[str, torch.Tensor]) -> None:
        """New optimizer over the new parameters: state moved by channel index, regrown second moments filled."""
        after = self._named_params()
        param_map = {before[k]: after[k] for k in after if before[k] is not after[k]}
        layout = channel_layout(self.groups)
        sizes = {g.name: g.size for g in self.groups}
        key_of = {id(p): k for k, p in before.items()}

        def transplant(old: nn.Parameter, v: torch.Tensor) -> torch.Tensor:
            mname, _, attr = key_of[id(old)].rpartition(".")
            return remap_channels(v, {d: (held[g], target[g], sizes[g]) for d, g in layout[(mname, attr)].items()
                                      if not torch.equal(held[g], target[g])})

        self.optimizer = rebuild_optimizer(self.optimizer, param_map, transplant, model=self.root,
                                           param_groups=self.param_groups)
        fill_regrown_second_moments(self.optimizer, self._liveness_changes(after, held, target, old_masks))

    def _liveness_changes(self, params: Mapping[str, nn.Parameter], held: Index, target: Index,
                          old_masks: Mapping[str, torch.Tensor]) -> list:
        """``(parameter, live before, live after)`` per new parameter, in its own (compact) coordinates: a narrowed
        dim was live where its channel was held; a full-width (downsample) dim follows the explorer's masks."""
        narrow = channel_layout(self.groups)
        dense = {(s.module, s.tensor, s.dim): lay.name for lay in self._dense_layouts for s in lay.slices}
        out = []
        for key, p in params.items():
            mname, _, attr = key.rpartition(".")
            was, now = {}, {}
            for d, g in narrow.get((mname, attr), {}).items():
                was[d] = torch.isin(target[g], held[g])
                now[d] = torch.ones(target[g].numel(), dtype=torch.bool)
            for d in range(p.dim()):
                g = dense.get((mname, attr, d))
                if g is not None:
                    was[d], now[d] = old_masks[g], self.explorer.masks[g]
            if was:
                out.append((p, liveness(p.shape, was), liveness(p.shape, now)))
        return out

    def _repoint_and_wrap(self, step: int | None, count: bool) -> None:
        if self.lr_scheduler is not None:
            repoint_scheduler(self.lr_scheduler, self.optimizer)
        if self.trainer is not None:
            self.trainer.optimizer = self.optimizer
        self.train_model = self.wrap(self.root)
        if count:
            self.rebuilds += 1
        log.info("compact training: rebuilt at step %s to %d/%d prunable channels (%d params)", step,
                 sum(v.numel() for v in self.held.values()), sum(g.size for g in self.groups),
                 sum(p.numel() for p in self.root.parameters()))
        if self.on_rebuild is not None:
            self.on_rebuild(self)

    def _modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    @torch.no_grad()
    def _mask_dense_groups(self) -> None:
        """Per-step masking of the full-width downsample groups (the only masking left in compact mode)."""
        if not self._dense.is_current():
            self._dense.build(self._modules(), self._dense_layouts, self.explorer.masks)
        self._dense.apply(self.optimizer)
