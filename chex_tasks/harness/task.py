"""What a task tells the run harness: the small description each of CLS, DET and SEG implements.

The harness (:class:`chex_tasks.harness.run.Run`) owns everything the three tasks do the same way; a task supplies
only what differs, by overriding the methods below. Methods get the :class:`Run` so they can read ``run.args``,
``run.rt`` (device, rank, seed), ``run.amp`` and the run's state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import Layout
from .lr import LRSchedule

if TYPE_CHECKING:
    from .data import TrainLoader
    from .run import Run

__all__ = ["Task"]


class Task:
    """Base class of a task description. Override every method that raises ``NotImplementedError``."""

    #: name used in messages ("CLS", "DET", "SEG")
    name: str = "task"
    #: file and key names (upstream conventions)
    layout: Layout = Layout()
    #: dotted path of the sub-module CHEX explores ("" = the whole model), e.g. "backbone" for SSD
    prunable_path: str = ""
    #: ``--chex-residual``: the layers outside the prunable ResNet that read a stage's output, ``{stage: [module
    #: names relative to the model]}`` (SSD heads, FPN laterals); a whole classifier's ``fc`` is found by itself
    stage_consumers: dict[str, tuple[str, ...]] = {}

    # ---------------------------------------------------------------- model and data
    def build_model(self, run: Run) -> nn.Module:
        """The dense network for a new run (random init or the task's weight flags), on the CPU."""
        raise NotImplementedError

    def flops_input_size(self, run: Run) -> tuple[int, int, int]:
        """``(C, H, W)`` at which FLOPs targets of the prunable sub-module are resolved."""
        raise NotImplementedError

    def train_loader(self, run: Run) -> TrainLoader:
        """The training loader (``chex_tasks.harness.data.make_train_loader``)."""
        raise NotImplementedError

    def steps(self, run: Run, loader: TrainLoader) -> tuple[int, int, int]:
        """``(epochs, optimizer steps per epoch, micro-batches per optimizer step)``."""
        raise NotImplementedError

    def units_per_step(self, run: Run, steps_per_epoch: int) -> int:
        """Optimizer steps per unit of ``--delta_T``/``--T_max`` (an epoch by default)."""
        return steps_per_epoch

    # ---------------------------------------------------------------- optimisation
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """SGD parameter groups of ``model``: ``[{"params": [...], "weight_decay": ..., ...}, ...]``. Also the policy
        compact training uses to regroup the parameters of a rebuilt model, so it must depend on ``model`` only."""
        raise NotImplementedError

    def optimizer(self, run: Run, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.param_groups(model), lr=run.args.lr, momentum=run.args.momentum)

    def lr_schedule(self, run: Run) -> LRSchedule:
        raise NotImplementedError

    # ---------------------------------------------------------------- the step
    def forward(self, run: Run, model: nn.Module, batch) -> tuple[dict[str, torch.Tensor], int]:
        """Losses of one micro-batch (autocast is the task's: ``run.amp.autocast()``) and its number of images."""
        raise NotImplementedError

    # ---------------------------------------------------------------- hooks
    def prepare(self, run: Run) -> None:
        """Setup is done (model wrapped, state restored) and the RNG states are about to be restored: anything that
        draws from the global generators before training (e.g. building a reference model) belongs here."""

    def resume_checks(self, run: Run, ckpt: dict, path: str) -> None:
        """Refuse a checkpoint written for another architecture (raise ``UserError``)."""

    def extra_state(self, run: Run) -> dict:
        """Task state saved next to the harness pieces (plain containers)."""
        return {}

    def load_extra_state(self, run: Run, ckpt: dict) -> None:
        """Restore what :meth:`extra_state` saved."""

    def on_event(self, run: Run, report) -> None:
        """An exploration event just ran (rank 0 logs are the task's choice)."""

    def end_epoch(self, run: Run, epoch: int, stats: dict) -> float | None:
        """After epoch ``epoch``: evaluate/record; return the metric ``model_best`` follows (None: no metric)."""
        return None

    def export_metadata(self, run: Run) -> dict:
        """What a user needs besides the weights to rebuild the compact model (plain containers)."""
        return {}

    def finish(self, run: Run) -> None:
        """After the last epoch (only when the run reached the end of its schedule)."""
