"""CLS training pieces: optimizer, per-iteration LR schedule, label-smoothing/mixup loss, AMP, one epoch.

The loop follows NVIDIA's ConvNets recipe that upstream CHEX forked (ALGORITHM.md §6.2): ``-b`` images per process,
gradients accumulated until ``--optimizer-batch-size`` images have been seen across all processes, linear warmup
then cosine/step/linear decay, SGD with momentum, BN parameters without weight decay. The only CHEX hook is
``explorer.after_step(step, optimizer)`` after each optimizer step.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chex_core import distributed as dist_utils
from chex_core.engine import AmpConfig, TrainStep, sync_context

log = logging.getLogger(__name__)

LR_SCHEDULES = ("step", "linear", "cosine")


# --------------------------------------------------------------------------------------------------- optimizer
def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, bn_weight_decay: bool,
                    nesterov: bool = False) -> torch.optim.SGD:
    """SGD with two parameter groups: BatchNorm γ/β without weight decay (unless ``bn_weight_decay``), the rest
    with it. BN parameters are found by module type, so the downsample BN (``downsample.1``) counts as BN too
    (upstream matched the substring ``bn`` and therefore decayed it; γ drives the channel allocation, so we keep
    every γ free of decay)."""
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
    bn = [p for p in model.parameters() if id(p) in bn_ids]
    rest = [p for p in model.parameters() if id(p) not in bn_ids]
    groups = [{"params": rest, "weight_decay": weight_decay},
              {"params": bn, "weight_decay": weight_decay if bn_weight_decay else 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def lr_factor(schedule: str, *, warmup_steps: int, total_steps: int, steps_per_epoch: int,
              step_epochs: tuple[int, ...] = (30, 60, 80), step_gamma: float = 0.1) -> Callable[[int], float]:
    """Multiplier of the base LR after ``s`` optimizer steps (for ``LambdaLR``), updated every iteration.

    Warmup: ``(s+1)/warmup_steps`` for ``s < warmup_steps``. Then, with ``e = s - warmup_steps`` and
    ``E = total_steps - warmup_steps``: cosine ``½(1+cos(πe/E))``, linear ``1 - e/E``, step ``γ^{#boundaries ≤
    epoch}`` with boundaries in epochs (NVIDIA: 30/60/80).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}")
    span = max(total_steps - warmup_steps, 1)

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        e = min(s - warmup_steps, span)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * e / span))
        if schedule == "linear":
            return 1.0 - e / span
        epoch = s / steps_per_epoch
        return step_gamma ** sum(epoch >= b for b in step_epochs)

    return factor


# --------------------------------------------------------------------------------------------------- loss
class SmoothedMixupLoss(nn.Module):
    """Cross-entropy with label smoothing ``ε`` and optional mixup of the *targets*.

    ``forward(logits (B,K), target)`` where ``target`` is either labels ``(B,)`` or the soft targets ``(B,K)``
    produced by :func:`mixup_batch`.
    """

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1:
            return F.cross_entropy(logits.float(), target, label_smoothing=self.smoothing)
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mixup_batch(images: torch.Tensor, labels: torch.Tensor, alpha: float, num_classes: int,
                smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) as in NVIDIA's recipe: ``λ ~ Beta(α, α)``, images ``λx + (1-λ)x[perm]`` and
    label-smoothed one-hot targets mixed the same way. Returns ``(images (B,C,H,W), soft targets (B,K))``."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(images.size(0), device=images.device)
    off = smoothing / num_classes
    onehot = torch.full((labels.size(0), num_classes), off, device=images.device)
    onehot.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)
    return lam * images + (1 - lam) * images[perm], lam * onehot + (1 - lam) * onehot[perm]


# --------------------------------------------------------------------------------------------------- AMP
def make_amp(enabled: bool, device: torch.device, static_loss_scale: float, dynamic: bool) -> AmpConfig:
    """``--amp`` → :class:`chex_core.engine.AmpConfig`: fp16 + GradScaler on CUDA, pinned at ``static_loss_scale``
    (upstream's apex static scaler) unless ``--dynamic-loss-scale``; bf16 without a scaler on CPU, with a warning
    because bf16 autocast is slower than fp32 on most CPUs."""
    if enabled and device.type != "cuda":
        warnings.warn("--amp on CPU uses bfloat16 autocast without loss scaling; it is usually slower than fp32",
                      stacklevel=2)
    static = None if dynamic or static_loss_scale <= 0 else float(static_loss_scale)
    return AmpConfig(enabled=enabled, device_type=device.type, static_loss_scale=static)


# --------------------------------------------------------------------------------------------------- one epoch
@dataclass
class TrainContext:
    """What the epoch loop needs besides the data. ``trainer.step_count`` is the optimizer-step clock that the
    LR schedule and the exploration schedule share."""

    model: nn.Module                 # possibly DDP-wrapped
    criterion: nn.Module
    trainer: TrainStep               # AMP, accumulation, non-finite check, optimizer/LR step, explorer hook
    amp: AmpConfig
    device: torch.device
    steps_per_epoch: int             # optimizer steps per epoch (the explorer's steps_per_unit)
    num_classes: int = 1000
    mixup: float = 0.0
    label_smoothing: float = 0.0
    print_freq: int = 10
    on_event: Callable | None = None  # called with each explorer EventReport


def train_one_epoch(ctx: TrainContext, loader, epoch: int, progress: Callable = lambda it, **kw: it) -> dict:
    """Train one epoch = exactly ``ctx.steps_per_epoch`` optimizer steps of ``trainer.accum_steps`` micro-batches
    each (a trailing partial window is dropped, so epoch boundaries and exploration events stay aligned on every
    rank). Returns ``{'loss', 'images_per_s', 'lr', 'time_s'}`` with the loss averaged over ranks and batches."""
    trainer = ctx.trainer
    ctx.model.train()
    n_micro = ctx.steps_per_epoch * trainer.accum_steps
    loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
    batches = itertools.islice(loader, n_micro)
    for i, (images, labels) in enumerate(progress(batches, total=n_micro, desc=f"epoch {epoch}")):
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        target = labels
        if ctx.mixup > 0:
            images, target = mixup_batch(images, labels, ctx.mixup, ctx.num_classes, ctx.label_smoothing)
        # ctx.model, not a local: compact training swaps in a rebuilt (re-wrapped) model at exploration events
        with sync_context(ctx.model, trainer.is_last_micro()):
            with ctx.amp.autocast():
                logits = ctx.model(images)
            result = trainer({"loss": ctx.criterion(logits, target)})
        loss_sum += result.losses["loss"]
        seen += images.size(0)
        if result.event is not None and ctx.on_event is not None:
            ctx.on_event(result.event)
        if result.stepped and ctx.print_freq > 0 and trainer.step_count % ctx.print_freq == 0:
            log.info("epoch %d [%d/%d] step %d loss %.4f lr %.5f %.1f img/s/process", epoch, i + 1, n_micro,
                     trainer.step_count, result.losses["loss"], trainer.optimizer.param_groups[0]["lr"],
                     seen / max(time.perf_counter() - t0, 1e-9))
    elapsed = time.perf_counter() - t0
    return {"loss": loss_sum / max(n_micro, 1), "images_per_s": seen * dist_utils.get_world_size() / max(elapsed, 1e-9),
            "lr": trainer.optimizer.param_groups[0]["lr"], "time_s": elapsed}


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: AmpConfig | None = None,
             progress: Callable = lambda it, **kw: it) -> dict:
    """Top-1/top-5 (percent) and mean loss over the whole validation set, summed exactly across ranks
    (``loader`` must shard without padding, see ``data.ShardSampler``)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels in progress(loader, total=len(loader), desc="val"):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with (amp.autocast() if amp is not None else contextlib.nullcontext()):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.size(1))
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels.unsqueeze(1))
        totals[0] += hit[:, :1].sum()
        totals[1] += hit.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, labels, reduction="sum")
        totals[3] += labels.numel()
    totals = dist_utils.all_reduce_mean(totals) * dist_utils.get_world_size()  # sums over ranks
    n = max(float(totals[3]), 1.0)
    return {"top1": 100.0 * float(totals[0]) / n, "top5": 100.0 * float(totals[1]) / n,
            "loss": float(totals[2]) / n, "n": int(totals[3])}
