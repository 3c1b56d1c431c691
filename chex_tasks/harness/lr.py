"""The one learning-rate rule of the three recipes, as a per-optimizer-step factor for ``LambdaLR``.

``factor(s) = warmup(s) * decay(s)`` after ``s`` optimizer steps:

- warmup over ``warmup_steps``: ``start * (1 - a) + a`` with ``a = (s + offset) / warmup_steps`` while
  ``s < warmup_steps``, where NVIDIA's recipes (CLS, DET) count from one with ``start = 0`` (``(s + 1) / W``) and
  maskrcnn-benchmark (SEG) starts at ``warmup_factor`` with ``offset = 0``;
- decay: ``step`` multiplies by ``gamma`` for every milestone (in steps) reached; ``cosine``/``linear`` run from 1
  to 0 between the end of warmup and ``total_steps``.

A plain object (not a closure), so ``LambdaLR.state_dict()`` can carry it and resume sees the same rule.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DECAYS", "LRSchedule"]

DECAYS = ("step", "cosine", "linear")


@dataclass
class LRSchedule:
    """Multiplier of the base learning rate after ``s`` optimizer steps (see the module doc)."""

    decay: str = "step"
    total_steps: int = 1
    warmup_steps: int = 0
    warmup_start: float = 0.0
    warmup_offset: int = 1
    milestones: Sequence[int] = field(default_factory=tuple)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"unknown LR decay {self.decay!r}; choose one of {DECAYS}")
        self.milestones = tuple(int(m) for m in self.milestones)

    def warmup(self, s: int) -> float:
        if s >= self.warmup_steps:
            return 1.0
        alpha = (s + self.warmup_offset) / self.warmup_steps
        return self.warmup_start * (1 - alpha) + alpha

    def __call__(self, s: int) -> float:
        if self.decay == "step":
            return self.warmup(s) * self.gamma ** sum(s >= m for m in self.milestones)
        if s < self.warmup_steps:
            return self.warmup(s)
        span = max(self.total_steps - self.warmup_steps, 1)
        e = min(s - self.warmup_steps, span)
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * e / span))
        return 1.0 - e / span
