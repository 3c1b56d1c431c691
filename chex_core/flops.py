"""FLOPs (multiply-accumulates) and parameter reports (docs/algorithm.md §8).

Two counts:

- :func:`count_macs` — the paper's convention, for parity with the published tables: conv and linear
  multiply-accumulates of one image (batch 1), each layer scaled by its fraction of non-zero weights when
  ``zero_aware`` (so a masked dense model, or an upstream released checkpoint with zeroed channels, is credited for its
  pruned channels). ResNet-50 at 224 px → 4.09 G. Biases are not counted, so on a compact model this equals the
  next count exactly;
- :func:`flop_counter_macs` — the true count of ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per MAC) / 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "flop_counter_macs", "count_params"]


def _example(module: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    p = next(module.parameters())
    return torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)


@torch.no_grad()
def count_macs(module: nn.Module, input_size: Sequence[int] = (3, 224, 224), zero_aware: bool = True) -> int:
    """Multiply-accumulates of conv and linear layers for one ``input_size`` image (the paper's "FLOPs")."""
    total = [0.0]

    def frac(w: torch.Tensor) -> float:
        return float(torch.count_nonzero(w)) / w.numel() if zero_aware else 1.0

    def conv_hook(m: nn.Conv2d, _inp, out) -> None:
        per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        total[0] += out.numel() / out.shape[0] * per_out * frac(m.weight)

    def linear_hook(m: nn.Linear, _inp, out) -> None:
        total[0] += out.numel() / out.shape[0] * m.in_features * frac(m.weight)

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    module.eval()
    try:
        module(_example(module, input_size))
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return int(round(total[0]))


@torch.no_grad()
def flop_counter_macs(module: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """True MACs of one image from ``FlopCounterMode`` (counts zeros as work: use it on compact models)."""
    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            module(_example(module, input_size))
    finally:
        module.train(was_training)
    return int(counter.get_total_flops()) // 2


def count_params(module: nn.Module, zero_aware: bool = True) -> int:
    """Number of parameters; with ``zero_aware`` only the non-zero ones (a masked model's effective size)."""
    if zero_aware:
        return int(sum(int(torch.count_nonzero(p)) for p in module.parameters()))
    return int(sum(p.numel() for p in module.parameters()))
