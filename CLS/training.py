"""CLS training pieces: SGD parameter groups, label-smoothing/mixup loss, evaluation.

The recipe is NVIDIA's ConvNets recipe that upstream CHEX forked (see docs/harness.md for how the run harness drives
it): ``-b`` images per process, gradients accumulated until ``--optimizer-batch-size`` images have been seen across
all processes, linear warmup then cosine/step/linear decay per optimizer step, SGD with momentum, BatchNorm
parameters without weight decay.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chex_core import distributed as dist_utils
from chex_core.engine import AmpConfig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool) -> list[dict]:
    """Two SGD parameter groups: BatchNorm γ/β without weight decay (unless ``bn_weight_decay``), the rest with it.
    BN parameters are found by module type, so the downsample BN (``downsample.1``) counts as BN too (upstream
    matched the substring ``bn`` and therefore decayed it; γ drives the channel allocation, so every γ stays free of
    decay)."""
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
    bn = [p for p in model.parameters() if id(p) in bn_ids]
    rest = [p for p in model.parameters() if id(p) not in bn_ids]
    return [{"params": rest, "weight_decay": weight_decay},
            {"params": bn, "weight_decay": weight_decay if bn_weight_decay else 0.0}]


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


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: AmpConfig | None = None,
             progress: Callable = lambda it, **kw: it) -> dict:
    """Top-1/top-5 (percent) and mean loss over the whole validation set, summed exactly across ranks
    (``loader`` must shard without padding, see ``chex_tasks.harness.data.ShardSampler``)."""
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
