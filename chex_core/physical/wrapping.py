"""DDP and ``torch.compile`` policy for a model whose parameters are replaced at every rebuild.

- DDP must be re-wrapped after each rebuild: its reducer hooks and buckets belong to the old parameters (PyTorch
  #12603: no error, the ranks silently drift). :func:`ddp_wrapper` makes the ``wrap`` callable that does it; a new
  DDP also broadcasts rank 0's parameters and buffers.
- ``torch.compile``: parameters are static in Dynamo's guards (``force_parameter_static_shapes``), so every resize
  recompiles the forward once: at most ``events + 1`` compilations in ``mode="explore"``, 2 in ``mode="frozen"``.
  Dynamo's default ``recompile_limit`` (8) is far below the ~90 events of the ImageNet recipe, and hitting it falls
  back to eager with only a warning. :func:`configure_compile` raises the limit and makes a fallback an error.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["ddp_wrapper", "configure_compile"]


def ddp_wrapper(**ddp_kwargs) -> Callable[[nn.Module], nn.Module]:
    """``wrap`` callable for :class:`~chex_core.physical.PhysicalTraining`: a fresh ``DistributedDataParallel``
    around the (unwrapped) model after every rebuild — a new reducer and bucket plan for the new parameters. Pass
    e.g. ``device_ids=[local_rank]`` on CUDA."""
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
