"""The one training-checkpoint layout of CLS, DET and SEG, its file names, and the ``--resume auto|PATH`` rules.

A checkpoint is a plain dict (``torch.load(weights_only=True)``) of named pieces of state::

    <model key>   model state dict (CLS: "state_dict", with "module." under DDP as upstream; DET/SEG: "model")
    optimizer, scheduler, scaler, trainer        torch / chex_core.engine.TrainStep state dicts
    explorer, physical                           CHEX explorer and compact-training state, or None
    epoch, iteration                             epochs completed, optimizer steps done (upstream counters)
    position                                     {"epoch", "micro", "micro_per_epoch"}: where in the epoch
    loader                                       per-rank data-loader states (mid-epoch only), or None
    rng                                          per-rank RNG states (torch, CUDA, Python, numpy)
    args, harness                                the resolved flags; the layout version
    + the task's extras (CLS: arch, best_prec1, raport...; DET: label_map, backbone)

Files: rolling ``checkpoint_NNNNNN.pth`` (N = optimizer steps) in every task, so ``--resume auto`` has one rule: the
newest file that loads. Upstream tools' names are aliases of the file just written (hard links, no second copy):
DET ``epoch_K.pt`` after epoch K, SEG ``model_final.pth`` at the end and a ``last_checkpoint`` pointer file.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from chex_core.checkpoint import (TMP_PREFIX, CheckpointError, CheckpointManager, load_checkpoint, save_checkpoint,
                                  strip_prefix)
from chex_core.distributed import is_main_process

from .runtime import UserError

__all__ = ["LAYOUT_VERSION", "Layout", "MODEL_ALIASES", "REQUIRED", "model_state", "find_resume", "check_complete",
           "publish_alias", "write_pointer"]

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MODEL_ALIASES = ("model", "state_dict")          # where upstream files keep the weights
REQUIRED = ("optimizer", "scheduler", "scaler", "trainer")


@dataclass(frozen=True)
class Layout:
    """How one task names its outputs (upstream conventions at the edges)."""

    model_key: str = "model"
    ddp_prefix: bool = False                      # write "module."-prefixed keys under DDP (upstream CLS files)
    name_format: str = "checkpoint_{n:06d}.pth"   # rolling training checkpoints, n = optimizer steps
    epoch_alias: str | None = None                # e.g. "epoch_{n}.pt", n = epoch index, written at epoch ends
    final_name: str | None = None                 # e.g. "model_final.pth", written when training ends
    pointer_name: str | None = None               # e.g. "last_checkpoint": a text file naming the newest checkpoint
    compact_name: str = "compact.pth"
    weights_flag: str = "--pretrained-weights"    # the task's flag that starts a new run from a file's weights


def model_state(ckpt: Mapping) -> dict | None:
    """The model state dict of any checkpoint layout (ours or upstream), DDP/compile prefixes removed."""
    for key in MODEL_ALIASES:
        sd = ckpt.get(key)
        if isinstance(sd, Mapping) and sd:
            return strip_prefix(dict(sd))
    return None


def find_resume(resume: str | None, manager: CheckpointManager) -> str | None:
    """The file ``--resume`` names: ``auto`` = the newest loadable checkpoint in the output folder (or None)."""
    if not resume:
        return None
    if resume != "auto":
        return resume
    path = manager.latest()
    if path is None:
        log.info("--resume auto: no checkpoint in %s, starting from scratch", manager.directory)
    return path


def check_complete(ckpt: Mapping, path: str, *, task: str, layout: Layout, explorer: bool, physical: bool) -> None:
    """Refuse (one line) a file that would silently restart part of the run: missing model/optimizer/schedule state,
    missing explorer state under ``--grow_prune``, or a compact-training mismatch."""
    if model_state(ckpt) is None:
        raise UserError(f"--resume {path} holds no model state: not a {task} training checkpoint")
    missing = [k for k in REQUIRED if ckpt.get(k) is None]
    if explorer and not ckpt.get("explorer"):
        missing.append("explorer")
    if missing:
        raise UserError(f"--resume {path} lacks {', '.join(missing)} state: not a complete {task} training "
                        f"checkpoint (use {layout.weights_flag} to start a new run from its weights)")
    if explorer and "mru" not in ckpt["explorer"]:
        raise UserError(f"--resume {path}: explorer state is missing ['mru'] (the MRU store of pruned channels)")
    if physical != bool(ckpt.get("physical")):
        raise UserError(f"--resume {path} was written {'with' if ckpt.get('physical') else 'without'} "
                        "--compact-training; resume it the same way")


def read_resume(path: str) -> dict:
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise UserError(f"--resume: {str(exc).splitlines()[0]}") from None


def publish_alias(src: str, dst: str) -> None:
    """Make ``dst`` name the same file as ``src`` (an atomic hard-link swap; a copy where links fail). Rank 0."""
    if not is_main_process():
        return
    tmp = os.path.join(os.path.dirname(dst), f"{TMP_PREFIX}{os.path.basename(dst)}.{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        save_checkpoint(load_checkpoint(src), dst)


def prune_aliases(directory: str, name_format: str, keep: int) -> None:
    """Delete all but the newest ``keep`` files named by ``name_format`` (rank 0)."""
    if is_main_process():
        for _, old in CheckpointManager(directory, name_format=name_format).list()[:-keep]:
            os.unlink(old)


def write_pointer(directory: str, name: str, target: str) -> None:
    """maskrcnn-benchmark's ``last_checkpoint``: one line naming the newest checkpoint (atomic replace, rank 0)."""
    if not is_main_process():
        return
    path = os.path.join(directory, name)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(os.path.abspath(target))
    os.replace(tmp, path)
