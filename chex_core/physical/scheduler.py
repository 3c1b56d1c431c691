"""Re-pointing an LR scheduler at a rebuilt optimizer: the only code in this project that touches torch's private
LR-scheduler attributes, kept in one small function.

torch has no public way to move a scheduler to another optimizer. What :func:`repoint_scheduler` relies on, as of the
torch version in :data:`TESTED_TORCH` (``torch/optim/lr_scheduler.py``):

- ``scheduler.optimizer``: the optimizer whose ``param_groups[i]["lr"]`` each ``step()`` writes;
- ``LRScheduler.__init__`` wraps ``optimizer.step`` (the wrapper carries ``_wrapped_by_lr_sched = True`` and sets
  ``optimizer._opt_called = True`` when called); the scheduler's first ``step()`` warns if ``optimizer.step`` lacks
  the marker ("optimizer.step() has been overridden") or if ``_opt_called`` is unset ("lr_scheduler.step() before
  optimizer.step()");
- ``SequentialLR`` and ``ChainedScheduler`` hold their children in ``_schedulers``, each with its own ``optimizer``.

``tests/test_physical_parts.py::test_scheduler_patch_matches_torch_internals`` is pinned to :data:`TESTED_TORCH` and
checks each of these facts against torch's own ``LRScheduler``; when torch changes, it fails and says what to check.
"""
from __future__ import annotations

import functools
import weakref

import torch

__all__ = ["TESTED_TORCH", "repoint_scheduler"]

TESTED_TORCH = "2.14"       # major.minor whose LRScheduler internals the patch below mirrors
_MARK, _CALLED = "_wrapped_by_lr_sched", "_opt_called"


def _track_step(optimizer: torch.optim.Optimizer) -> None:
    """Wrap ``optimizer.step`` as ``LRScheduler.__init__`` does for its own optimizer."""
    if hasattr(optimizer.step, _MARK):
        return
    func = optimizer.step.__func__
    ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        opt = ref()
        setattr(opt, _CALLED, True)
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    setattr(wrapper, _MARK, True)
    optimizer.step = wrapper


def repoint_scheduler(scheduler, optimizer: torch.optim.Optimizer) -> None:
    """Make an LR scheduler (and the children of a ``SequentialLR``/``ChainedScheduler``) drive ``optimizer``, a
    rebuilt one with the same param groups; its counters and base LRs stay. No "step order" warning follows.

    Raises:
        ValueError: the new optimizer has another number of param groups than the scheduler's base LRs.
    """
    base = getattr(scheduler, "base_lrs", None)
    if base is not None and len(base) != len(optimizer.param_groups):
        raise ValueError(f"LR scheduler has {len(base)} base LRs but the new optimizer has "
                         f"{len(optimizer.param_groups)} param groups")
    old = getattr(scheduler, "optimizer", None)
    if old is not None and getattr(old, _CALLED, False):
        setattr(optimizer, _CALLED, True)       # the old optimizer already stepped: no spurious order warning
    scheduler.optimizer = optimizer
    for child in getattr(scheduler, "_schedulers", ()):
        repoint_scheduler(child, optimizer)
    _track_step(optimizer)
