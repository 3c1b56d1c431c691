"""When exploration events happen and how many channels each one regrows (docs/algorithm.md §1).

Everything is counted in optimizer steps internally; ``steps_per_unit`` converts the recipe's unit (epochs for CLS and
DET, iterations for SEG) so one schedule serves every task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ExplorationSchedule"]


@dataclass(frozen=True)
class ExplorationSchedule:
    """Events at units ΔT, 2ΔT, … ≤ T_max; regrow fraction δ_t = δ0·(1+cos(π t/T_max))/2.

    Args:
        interval: ΔT, in units (``--delta_T``).
        t_max: T_max, the last unit at which an event may happen (``--T_max``), an index, not a count.
        sparsity: S, the final fraction of prunable channels removed (``--channel_sparsity``), in [0, 1).
        delta0: δ0, the initial regrow fraction (``--init_channel_ratio``), in [0, S].
        steps_per_unit: optimizer steps per unit (steps per epoch for CLS/DET, 1 for SEG).
    """

    interval: int
    t_max: int
    sparsity: float
    delta0: float
    steps_per_unit: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"channel sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.delta0 <= self.sparsity:
            raise ValueError(f"initial regrow ratio delta0 must be in [0, sparsity={self.sparsity}], got {self.delta0}")
        if int(self.interval) < 1:
            raise ValueError(f"exploration interval delta_T must be >= 1, got {self.interval}")
        if int(self.t_max) < int(self.interval):
            raise ValueError(f"T_max ({self.t_max}) must be >= delta_T ({self.interval})")
        if int(self.steps_per_unit) < 1:
            raise ValueError(f"steps_per_unit must be >= 1, got {self.steps_per_unit}")

    def unit(self, step: int) -> float:
        """The recipe unit (epoch or iteration) reached after ``step`` optimizer steps."""
        return step / self.steps_per_unit

    def is_event(self, step: int) -> bool:
        """True if an exploration event runs after optimizer step ``step`` (steps counted from 1)."""
        if step <= 0 or step % self.steps_per_unit:
            return False
        t = step // self.steps_per_unit
        return t % self.interval == 0 and t <= self.t_max

    def regrow_fraction(self, step: int) -> float:
        """δ_t for the event after ``step`` optimizer steps (0 at and after T_max)."""
        t = min(self.unit(step), float(self.t_max))
        return self.delta0 * (1.0 + math.cos(math.pi * t / self.t_max)) / 2.0

    def event_steps(self) -> list[int]:
        return [t * self.steps_per_unit for t in range(self.interval, self.t_max + 1, self.interval)]

    def last_event_step(self) -> int:
        return (self.t_max // self.interval) * self.interval * self.steps_per_unit

    def frozen(self, step: int) -> bool:
        """True once the last event has run: masks no longer change."""
        return step >= self.last_event_step()
