"""The training-step mechanics every task shares: AMP, gradient accumulation, the non-finite check, the optimizer step
and the explorer hook. Task loops keep their own data handling and call :class:`TrainStep` once per micro-batch.

AMP follows the apex-era flags on top of ``torch.amp``: ``--amp`` → autocast (fp16 + GradScaler on CUDA, bf16 without
a scaler on CPU); ``--static-loss-scale S`` → a fixed scale S (overflowing steps are skipped, the scale never moves);
``--dynamic-loss-scale`` → the usual growing/backing-off scale.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import all_reduce_mean, is_dist

__all__ = ["NonFiniteLossError", "AmpConfig", "TrainStep", "StepResult", "sync_context"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The all-reduced training loss is NaN or infinite (raised on every rank at the same step)."""


@dataclass(frozen=True)
class AmpConfig:
    """Mixed precision settings.

    Args:
        enabled: autocast on.
        device_type: ``cuda`` or ``cpu``.
        static_loss_scale: fixed loss scale (apex ``--static-loss-scale``); None → dynamic scaling.
        dtype: autocast dtype; default fp16 on CUDA, bf16 on CPU.
    """

    enabled: bool = False
    device_type: str = "cpu"
    static_loss_scale: float | None = None
    dtype: torch.dtype | None = None

    @property
    def autocast_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float16 if self.device_type == "cuda" else torch.bfloat16

    @property
    def uses_scaler(self) -> bool:
        return self.enabled and self.autocast_dtype == torch.float16

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        init = self.static_loss_scale if self.static_loss_scale else 2.0 ** 16
        # a static scale is a GradScaler whose scale is reset to S after every update (torch asserts growth > 1)
        return torch.amp.GradScaler(self.device_type, init_scale=init, enabled=self.uses_scaler,
                                    growth_interval=2**30 if self.static_loss_scale else 2000)


def sync_context(model: nn.Module, sync: bool):
    """``model.no_sync()`` for DDP micro-steps whose gradients must not be all-reduced yet; wrap forward+backward."""
    if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


@dataclass
class StepResult:
    """Outcome of one micro-batch: the all-reduced losses, whether an optimizer step ran and the explorer event."""

    losses: dict[str, float]
    stepped: bool
    skipped: bool
    event: object | None = None


class TrainStep:
    """backward → (every ``accum_steps`` micro-batches) unscale, clip, step, update, zero_grad → explorer hook.

    Args:
        optimizer: the optimizer.
        scaler: a ``torch.amp.GradScaler`` (disabled is fine).
        static_loss_scale: if set, the scaler's scale is pinned to it after every update.
        explorer: ``ChannelExplorer`` or None; ``after_step`` runs after every optimizer step.
        accum_steps: micro-batches per optimizer step (``--optimizer-batch-size`` / (batch × world)).
        grad_clip: max global grad norm, or None.
        lr_scheduler: stepped once per optimizer step (per-iteration schedules), or None.
        max_consecutive_skips: AMP overflow skips in a row that abort training.
        start_step: optimizer steps already done (on resume), so the explorer and logs keep counting from there.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None,
                 static_loss_scale: float | None = None, explorer=None, accum_steps: int = 1,
                 grad_clip: float | None = None, lr_scheduler=None, max_consecutive_skips: int = 50,
                 start_step: int = 0) -> None:
        if accum_steps < 1:
            raise ValueError("accum_steps must be >= 1")
        self.optimizer, self.scaler, self.explorer = optimizer, scaler, explorer
        self.static_loss_scale = static_loss_scale
        self.accum_steps, self.grad_clip, self.lr_scheduler = accum_steps, grad_clip, lr_scheduler
        self.max_consecutive_skips = max_consecutive_skips
        self.micro = 0            # micro-batches since the last optimizer step
        self.step_count = int(start_step)   # optimizer steps attempted (the exploration schedule's clock)
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._acc: dict[str, torch.Tensor] = {}   # detached losses of the current accumulation window

    def is_last_micro(self) -> bool:
        """True if the next micro-batch completes an optimizer step (use with :func:`sync_context`)."""
        return self.micro + 1 >= self.accum_steps

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "skipped_steps": self.skipped_steps, "micro": self.micro}

    def load_state_dict(self, state: Mapping) -> None:
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.micro = int(state.get("micro", 0))

    def __call__(self, losses: Mapping[str, torch.Tensor] | torch.Tensor) -> StepResult:
        if torch.is_tensor(losses):
            losses = {"loss": losses}
        total = sum(losses.values())
        for k, v in losses.items():
            self._acc[k] = self._acc.get(k, 0.0) + v.detach().float()
        scaled = total / self.accum_steps
        if self.micro + 1 < self.accum_steps:
            # not the last micro-batch: no collective here (DDP is inside no_sync); the check runs on the step
            self._backward(scaled)
            self.micro += 1
            return StepResult({k: float(v.detach()) for k, v in losses.items()}, stepped=False, skipped=False)
        # one all-reduce per optimizer step, of the losses averaged over its micro-batches
        reduced = {k: float(all_reduce_mean(v / self.accum_steps)) for k, v in self._acc.items()}
        self._acc = {}
        self.micro = 0
        if not math.isfinite(sum(reduced.values())):
            # every rank sees the same reduced value, so every rank raises at the same step: no hang
            raise NonFiniteLossError(f"non-finite training loss at optimizer step {self.step_count + 1}: "
                                     f"{reduced} (world: {'distributed' if is_dist() else 'single process'})")
        self._backward(scaled)
        skipped = self._optimizer_step()
        self.step_count += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        event = self.explorer.after_step(self.step_count, self.optimizer) if self.explorer is not None else None
        return StepResult(reduced, stepped=True, skipped=skipped, event=event)

    def _backward(self, scaled: torch.Tensor) -> None:
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()

    def _optimizer_step(self) -> bool:
        scaler_on = self.scaler is not None and self.scaler.is_enabled()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if scaler_on:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        skipped = False
        if scaler_on:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
            if self.static_loss_scale:
                self.scaler.update(new_scale=float(self.static_loss_scale))
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            self.skipped_steps += 1
            self._consecutive_skips += 1
            log.warning("AMP: gradient overflow, optimizer step %d skipped (%d so far)", self.step_count + 1,
                        self.skipped_steps)
            if self._consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteLossError(f"{self._consecutive_skips} consecutive AMP steps overflowed; "
                                         "the loss scale or learning rate is too high")
        else:
            self._consecutive_skips = 0
        return skipped
