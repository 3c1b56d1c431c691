"""Physically compact CHEX training: the live model holds only the active channels (issue 9).

Upstream CHEX trains the dense network and zeroes pruned channels with masks, so a 70 %-sparse run costs what dense
training costs. Here the training model is *narrowed* to the active (kept + regrown) channels, and the values of the
pruned channels live only in the explorer's MRU store, off the model.

How it works (:class:`PhysicalTraining`):

- ``mode="explore"`` (default): right after ``explorer.start()`` the model is narrowed. At every exploration event it is
  widened back to full size *in place* (live channels at their full-size positions, pruned slots zero — exactly the
  masked model), the unchanged :meth:`ChannelExplorer.explore` runs on it (CSS, MRU restore, regrowth, re-allocation,
  MRU store of the newly pruned channels), and the model is narrowed again to the new active channels. The algorithm
  stays in one place (``explorer.py``); this module only moves tensors.
- ``mode="frozen"``: masked training (``explorer.after_step``) until the last event, then the model is narrowed once
  and training continues on it. Fewer savings, but at most one shape change (the cheap option with ``torch.compile``).

Resizing keeps the *module objects* (the explorer, module hooks and module names stay valid) and swaps their
parameters and buffers for new tensors (hooks registered on the old *parameters* do not carry over), so after every
resize:

- the optimizer is rebuilt (:func:`rebuild_optimizer`): the same class, the same ``param_groups`` hyper-parameters
  and group membership (e.g. the no-weight-decay BN group), state tensors shaped like their parameter (SGD momentum,
  Adam ``exp_avg``/``exp_avg_sq``) transplanted by channel index; regrown channels start at zero — what the masked
  mode has too (masking zeroes a pruned channel's momentum, and its gradient is exactly zero while it is masked);
- the LR scheduler and ``TrainStep`` are re-pointed at the new optimizer (:func:`repoint_scheduler`);
- ``wrap`` is called again: DDP must be re-wrapped (:func:`ddp_wrapper`), since its reducer hooks and buckets
  belong to the old parameters (PyTorch #12603: no error, the ranks silently drift);
- a ``GradScaler`` needs nothing (its per-optimizer state is reset by ``update()``, before the rebuild).

Downsample groups (``--chex-prune-downsample``) cannot be narrowed (the shortcut adds into the full residual stream),
so they stay full width and are masked after every step, as in the masked mode. GroupNorm layers are rejected (their
statistics span channel groups). For detection/segmentation, build the explorer on the backbone and pass the whole
network as ``root``: the optimizer and ``wrap`` then cover the whole network.

With the same seed, compact and masked training follow the same trajectory up to float rounding (a narrower conv
sums fewer exact zeros; tests/test_physical.py checks ``allclose`` in fp32 across several events). Rounding-level
differences grow like any perturbation of the run: on badly conditioned toy settings (tiny ResNets at 1×1–2×2
spatial size, batch 8) a 1e-7 difference reaches 1e-3 within a few steps, exactly as two masked runs do when one is
perturbed by 1e-8, after which CSS may pick other channels.

``torch.compile``: parameters are static in Dynamo's guards (``force_parameter_static_shapes``), so every resize
recompiles the forward once: at most ``events + 1`` compilations in ``mode="explore"``, 2 in ``mode="frozen"``.
Dynamo's default ``recompile_limit`` (8) is far below the ~90 events of the ImageNet recipe, and hitting it falls back
to eager with only a warning. :func:`configure_compile` raises the limit to ``events + 2`` and sets
``fail_on_recompile_limit_hit`` so that a fallback is an error, never silent. The test counts compilations with a
counting backend (``eager`` semantics: Inductor is too slow to compile on the 2-core CI machine); the guards and
recompile logic are Dynamo's, independent of the backend. Compile through ``wrap`` (``lambda m: torch.compile(m)``,
or ``torch.compile(DDP(m))`` when distributed) so each rebuild hands Dynamo the new module.

Checkpoints: :meth:`PhysicalTraining.state_dict` holds the width spec and the held channel indices (tensors and plain
containers); save the explorer state, the compact model ``state_dict`` and the optimizer next to it. On resume build
the dense model and its explorer, then :meth:`PhysicalTraining.load_state_dict` loads the explorer, narrows the model
by slicing and loads the model and optimizer states strictly.
"""
from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .explorer import ChannelExplorer, EventReport
from .groups import ChannelGroup

__all__ = ["PhysicalTraining", "channel_layout", "remap_channels", "resize_", "rebuild_optimizer",
           "repoint_scheduler", "ddp_wrapper", "configure_compile", "expand_state_dict", "MODES"]

log = logging.getLogger(__name__)

MODES = ("explore", "frozen")
_STATE_VERSION = 1
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")

Index = Mapping[str, torch.Tensor]          # group name -> sorted LongTensor of full-size channel positions


# --------------------------------------------------------------------------------------------------- tensors
def channel_layout(groups: Sequence[ChannelGroup]) -> dict[tuple[str, str], dict[int, str]]:
    """Which dims of which tensors follow which group: ``{(module name, attr): {dim: group name}}``.

    Producer weight/bias dim 0, norm γ/β/running stats dim 0, consumer weight dim 1. A Bottleneck ``conv2`` is both
    the consumer of ``conv1``'s group (dim 1) and the producer of its own (dim 0). Downsample groups are left out:
    they are never narrowed.
    """
    layout: dict[tuple[str, str], dict[int, str]] = {}
    for g in groups:
        if g.kind == "downsample":
            continue
        for attr in ("weight", "bias"):
            layout.setdefault((g.producer, attr), {})[0] = g.name
        for attr in _NORM_TENSORS:
            layout.setdefault((g.norm, attr), {})[0] = g.name
        for c in g.consumers:
            layout.setdefault((c, "weight"), {})[1] = g.name
    return layout


def remap_channels(t: torch.Tensor, spec: Mapping[int, tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
    """Move ``t`` from one channel set to another along each dim in ``spec``.

    Args:
        t: a tensor whose dim ``d`` holds the channels ``held`` (full-size positions) for each ``d`` in ``spec``.
        spec: ``{dim: (held, target, full_size)}``; ``held``/``target`` sorted LongTensors of positions in
            ``range(full_size)``.

    Returns:
        A new tensor whose dim ``d`` holds the ``target`` channels: values of channels in both sets are copied,
        channels only in ``target`` are zero.
    """
    out = t.detach()
    for dim, (held, target, size) in spec.items():
        if held.numel() != size:                      # scatter into full size (zeros elsewhere)
            shape = list(out.shape)
            shape[dim] = size
            full = out.new_zeros(shape)
            full.index_copy_(dim, held.to(out.device), out)
            out = full
        if target.numel() != size:                    # gather the target channels
            out = out.index_select(dim, target.to(out.device))
    return out.clone() if out is t else out


def _full(groups: Sequence[ChannelGroup]) -> dict[str, torch.Tensor]:
    return {g.name: torch.arange(g.size) for g in groups if g.kind != "downsample"}


@torch.no_grad()
def resize_(model: nn.Module, groups: Sequence[ChannelGroup], held: Index, target: Index) -> int:
    """Narrow or widen (in place) every tensor of the inner groups of ``model`` from ``held`` to ``target`` channels.

    Module objects are kept; their affected parameters and buffers are replaced by new tensors (parameters stay
    ``nn.Parameter`` with the same ``requires_grad``), and ``in_channels``/``out_channels``/``num_features`` follow.
    Tensors whose groups do not change keep their identity. Returns the number of tensors replaced.
    """
    sizes = {g.name: g.size for g in groups}
    mods = dict(model.named_modules())
    touched: set[str] = set()
    n = 0
    for (mname, attr), dims in channel_layout(groups).items():
        mod = mods[mname]
        t = getattr(mod, attr, None)
        if t is None:
            continue
        spec = {d: (held[g], target[g], sizes[g]) for d, g in dims.items() if not torch.equal(held[g], target[g])}
        if not spec:
            continue
        for d, (h, _, _) in spec.items():
            if t.shape[d] != h.numel():
                raise ValueError(f"{mname}.{attr} has {t.shape[d]} channels in dim {d}, expected {h.numel()}: "
                                 "the model is not at the widths this resize assumes")
        new = remap_channels(t, spec)
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            new = new.contiguous(memory_format=torch.channels_last)      # keep NHWC (--memory-format nhwc) fast
        if isinstance(t, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            setattr(mod, attr, new)                   # a registered buffer: Module.__setattr__ keeps it one
        touched.add(mname)
        n += 1
    for mname in touched:
        mod = mods[mname]
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise ValueError(f"cannot resize grouped convolution {mname!r}")
            mod.out_channels, mod.in_channels = int(mod.weight.shape[0]), int(mod.weight.shape[1])
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            mod.num_features = int(mod.weight.shape[0])
        elif isinstance(mod, nn.GroupNorm):
            raise ValueError(f"cannot narrow {mname!r}: GroupNorm statistics span channel groups, so removing "
                             "channels changes the function; use masked training for GroupNorm models")
    return n


def expand_state_dict(state: Mapping[str, torch.Tensor], groups: Sequence[ChannelGroup], held: Index) -> dict:
    """A compact model's ``state_dict`` mapped back to full size (pruned channels zero), e.g. to compare it with the
    masked run or to load it into the dense architecture."""
    sizes = {g.name: g.size for g in groups}
    layout = channel_layout(groups)
    out = {}
    for key, t in state.items():
        mname, _, attr = key.rpartition(".")
        dims = layout.get((mname, attr), {})
        spec = {d: (held[g], torch.arange(sizes[g]), sizes[g]) for d, g in dims.items()}
        out[key] = remap_channels(t, spec) if spec else t
    return out


# --------------------------------------------------------------------------------------------------- optimizer
def _constructor_kwargs(optimizer: torch.optim.Optimizer) -> dict:
    # optimizer.defaults may hold keys the constructor does not take (AdamW inherits Adam's); every group carries
    # its own hyper-parameters anyway, so only constructor arguments are passed
    params = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in params}


def rebuild_optimizer(optimizer: torch.optim.Optimizer, param_map: Mapping[nn.Parameter, nn.Parameter],
                      transplant: Callable[[nn.Parameter, torch.Tensor], torch.Tensor] | None = None, *,
                      model: nn.Module | None = None,
                      param_groups: Callable[[nn.Module], Sequence[Sequence[nn.Parameter]]] | None = None
                      ) -> torch.optim.Optimizer:
    """A new optimizer of the same class over new parameters, with the old hyper-parameters and transplanted state.

    Args:
        optimizer: the optimizer over the old parameters.
        param_map: old parameter → its replacement; parameters not in the map are carried over as they are.
        transplant: ``(old parameter, state tensor shaped like it) → state tensor shaped like the new parameter``
            (channel-index transplant); default: the tensor unchanged. Other state (Adam's ``step``) is copied.
        model: the model the new parameters belong to (needed with ``param_groups``; also used to check that the
            optimizer covers exactly the model's trainable parameters).
        param_groups: the param-group *policy*: ``model → one list of parameters per group``, in the order of
            ``optimizer.param_groups`` (e.g. "BN γ/β" and "the rest"). Default: each group keeps its members
            through ``param_map``. Each group's hyper-parameters (lr as set by the scheduler, momentum, weight
            decay, ``initial_lr``…) are copied from the old group of the same position.

    Raises:
        ValueError: the policy returns another number of groups, or the groups do not cover the model's trainable
            parameters exactly once.
    """
    if param_groups is not None:
        if model is None:
            raise ValueError("rebuild_optimizer: a param_groups policy needs the model")
        members = [list(ps) for ps in param_groups(model)]
        if len(members) != len(optimizer.param_groups):
            raise ValueError(f"param-group policy returned {len(members)} groups, the optimizer has "
                             f"{len(optimizer.param_groups)}")
    else:
        by_id = {id(old): new for old, new in param_map.items()}
        members = [[by_id.get(id(p), p) for p in g["params"]] for g in optimizer.param_groups]
    if model is not None:
        ids = [id(p) for ps in members for p in ps]
        want = {id(p) for p in model.parameters() if p.requires_grad}
        if len(ids) != len(set(ids)) or set(ids) != want:
            raise ValueError("the rebuilt optimizer's parameters are not exactly the model's trainable parameters "
                             f"({len(set(ids))} in groups, {len(want)} in the model, {len(ids) - len(set(ids))} "
                             "duplicated)")
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
              for g, ps in zip(optimizer.param_groups, members)]
    new = type(optimizer)(groups, **_constructor_kwargs(optimizer))
    old_of = {id(new_p): old_p for old_p, new_p in param_map.items()}
    for ps in members:
        for p in ps:
            old = old_of.get(id(p), p)
            state = optimizer.state.get(old)
            if not state:
                continue
            moved = {}
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == old.shape and v.dim() > 0:
                    moved[k] = transplant(old, v) if transplant is not None and old is not p else v
                else:
                    moved[k] = v.clone() if torch.is_tensor(v) else v
            new.state[p] = moved
    if getattr(optimizer, "_opt_called", False):
        new._opt_called = True
    return new


def _track_step(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` as LR-scheduler-tracked, as ``LRScheduler.__init__`` does for its optimizer, so a
    scheduler re-pointed right after its creation does not warn that ``step`` was overridden."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__
    ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        opt = ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def repoint_scheduler(scheduler, optimizer: torch.optim.Optimizer) -> None:
    """Make an LR scheduler drive ``optimizer`` (a rebuilt one with the same groups); its counters and base LRs stay.

    Raises:
        ValueError: the new optimizer has another number of param groups than the scheduler's base LRs.
    """
    base = getattr(scheduler, "base_lrs", None)
    if base is not None and len(base) != len(optimizer.param_groups):
        raise ValueError(f"LR scheduler has {len(base)} base LRs but the new optimizer has "
                         f"{len(optimizer.param_groups)} param groups")
    scheduler.optimizer = optimizer
    _track_step(optimizer)


# --------------------------------------------------------------------------------------------------- DDP, compile
def ddp_wrapper(**ddp_kwargs) -> Callable[[nn.Module], nn.Module]:
    """``wrap`` callable for :class:`PhysicalTraining`: a fresh ``DistributedDataParallel`` around the (unwrapped)
    model after every rebuild — a new reducer and bucket plan for the new parameters; its construction also
    broadcasts rank 0's parameters and buffers. Pass e.g. ``device_ids=[local_rank]`` on CUDA."""
    def wrap(model: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    return wrap


def configure_compile(n_events: int, slack: int = 2) -> int:
    """Let ``torch.compile`` recompile once per shape change without falling back to eager, and make a fallback an
    error: ``recompile_limit ≥ n_events + slack`` and ``fail_on_recompile_limit_hit = True``. Returns the limit.

    Process-wide Dynamo settings; call it once before training with the number of rebuilds to expect
    (``len(schedule.event_steps())`` in ``mode="explore"``, 1 in ``mode="frozen"``)."""
    import torch._dynamo.config as dcfg

    limit = max(int(dcfg.recompile_limit), int(n_events) + int(slack))
    dcfg.recompile_limit = limit
    dcfg.accumulated_recompile_limit = max(int(dcfg.accumulated_recompile_limit), limit)
    dcfg.fail_on_recompile_limit_hit = True
    return limit


# --------------------------------------------------------------------------------------------------- orchestration
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
        self.held: dict[str, torch.Tensor] = _full(self.groups)
        self.compact = False
        self.rebuilds = 0
        self._dense_masks: list[tuple[nn.Parameter, torch.Tensor]] = []
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
        """``{producer name: width}`` of the model as it is now (the input of ``chex_core.apply_width_spec``)."""
        return {g.producer: int(self.held[g.name].numel()) for g in self.groups if g.kind != "downsample"}

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
        held = self.held
        report = None
        if step is not None:
            full = _full(self.groups)
            resize_(self.model, self.groups, held, full)
            # the model now equals the masked model; the explorer decides on it exactly as in masked training.
            # optimizer=None: the optimizer state is transplanted below, from the compact state directly.
            report = self.explorer.explore(step, None)
            target = self._active()
            resize_(self.model, self.groups, full, target)
        else:
            resize_(self.model, self.groups, held, target)
        self._drop_explorer_cache()
        after = self._named_params()
        param_map = {before[k]: after[k] for k in after if before[k] is not after[k]}
        layout = channel_layout(self.groups)
        sizes = {g.name: g.size for g in self.groups}
        key_of = {id(p): k for k, p in before.items()}

        def transplant(old: nn.Parameter, v: torch.Tensor) -> torch.Tensor:
            mname, _, attr = key_of[id(old)].rpartition(".")
            dims = layout[(mname, attr)]
            return remap_channels(v, {d: (held[g], target[g], sizes[g]) for d, g in dims.items()
                                      if not torch.equal(held[g], target[g])})

        self.optimizer = rebuild_optimizer(self.optimizer, param_map, transplant, model=self.root,
                                           param_groups=self.param_groups)
        self.held = {k: v.clone() for k, v in target.items()}
        self.compact = True
        self._build_dense_masks()
        self._mask_dense_groups()
        if self.lr_scheduler is not None:
            repoint_scheduler(self.lr_scheduler, self.optimizer)
        if self.trainer is not None:
            self.trainer.optimizer = self.optimizer
        self.train_model = self.wrap(self.root)
        if count:
            self.rebuilds += 1
        log.info("compact training: rebuilt at step %s to %d/%d prunable channels (%d params)",
                 step, sum(v.numel() for v in self.held.values()), sum(sizes.values()),
                 sum(p.numel() for p in self.root.parameters()))
        if self.on_rebuild is not None:
            self.on_rebuild(self)
        return report

    def _drop_explorer_cache(self) -> None:
        # explore() leaves the explorer's per-step mask cache pointing at the full-size parameters it saw; in
        # compact mode the explorer's per-step masking is never used, and those tensors must not stay alive (they
        # would keep a dense copy of every pruned layer in memory).
        self.explorer.release_cache()

    def _build_dense_masks(self) -> None:
        """Per-step masks of the full-width downsample groups (the only masking left in compact mode)."""
        self._dense_masks = []
        mods = dict(self.model.named_modules())
        for g in self.groups:
            if g.kind != "downsample":
                continue
            m = self.explorer.masks[g.name]
            for name in (g.producer, g.norm):
                for attr in ("weight", "bias"):
                    p = getattr(mods[name], attr, None)
                    if p is not None:
                        shape = [1] * p.dim()
                        shape[0] = -1
                        self._dense_masks.append((p, m.to(device=p.device, dtype=p.dtype).view(shape)))

    @torch.no_grad()
    def _mask_dense_groups(self) -> None:
        for p, m in self._dense_masks:
            p.mul_(m)
            state = self.optimizer.state.get(p)
            if state:
                for v in state.values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.mul_(m)
