"""The run harness shared by CLS, DET and SEG: setup, checkpoints, resume, the step loop and compact export.

A task folder keeps its upstream command line and maps it onto a :class:`Task` description; :class:`Run` does the
rest the same way for every task. See ``docs/harness.md`` for the contract and the guarantees.
"""
from .checkpoint import Layout
from .data import DataError, ShardSampler, TrainLoader, make_eval_loader, make_train_loader
from .lr import LRSchedule
from .run import Run, make_amp, sync_buffers
from .runtime import (OneLineParser, Runtime, UserError, one_line, require_at_least, run_guarded, setup_logging,
                      start_runtime)
from .task import Task

__all__ = ["Layout", "DataError", "ShardSampler", "TrainLoader", "make_eval_loader", "make_train_loader", "LRSchedule",
           "Run", "make_amp", "sync_buffers", "OneLineParser", "Runtime", "UserError", "one_line", "require_at_least",
           "run_guarded",
           "setup_logging",
           "start_runtime", "Task", "add_run_args", "check_run_args"]


def add_run_args(parser, *, resume_default: str | None = None, period_flags: tuple[str, ...] = ("--checkpoint-every",),
                 period_default: int = 0, keep_default: int = 3, progress: bool = True) -> None:
    """The harness flags, the same in every task: ``--resume auto|PATH`` / ``--no-resume``, the periodic checkpoint
    (spelled as the task's upstream spells it), ``--keep-checkpoints``, ``--tensorboard``, ``--progress``."""
    import argparse

    g = parser.add_argument_group("checkpoints and run outputs")
    g.add_argument("--resume", nargs="?", const="auto", default=resume_default, metavar="auto|PATH",
                   help="continue a training run: 'auto' (or no value) = the newest loadable checkpoint in the output "
                        "folder (start fresh if there is none), or a checkpoint file; the run then repeats an "
                        "uninterrupted one bit for bit" + (f" (default {resume_default})" if resume_default else ""))
    g.add_argument("--no-resume", dest="resume", action="store_const", const=None,
                   help="start a new run even if the output folder holds checkpoints")
    g.add_argument(*period_flags, dest="checkpoint_every", type=int, default=period_default, metavar="N",
                   help="also write a checkpoint every N optimizer steps (0 = only at the end of each epoch)")
    g.add_argument("--keep-checkpoints", type=int, default=keep_default,
                   help="rolling checkpoints kept (besides model_best and the task's upstream-named files)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="write TensorBoard scalars to OUTPUT/tb")
    if progress:
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar with ETA (default: only when stdout is a terminal and CI is unset)")


def check_run_args(parser, args) -> None:
    """One line naming the flag, exit 2, for a bad harness flag (before any process group or file is touched)."""
    import os

    require_at_least(parser, ("--keep-checkpoints", args.keep_checkpoints, 1),
                     ("--checkpoint-every", args.checkpoint_every, 0))
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume: file not found: {args.resume}")
