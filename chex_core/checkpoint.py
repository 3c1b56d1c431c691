"""Crash-safe checkpoints: plain dicts of tensors, written atomically by rank 0, loaded with ``weights_only=True``.

A save writes a temp file in the target folder, fsyncs it, ``os.replace``s it over the final name and fsyncs the
folder, so a crash at any moment leaves either the old file or the new one, never a torn one
(the README's reliability table, T4). :class:`CheckpointManager` adds rolling retention, a ``model_best`` copy that
a NaN metric never wins (T5), and discovery of the newest *loadable* checkpoint for ``--resume auto`` (T6).
"""
from __future__ import annotations

import glob
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .distributed import is_main_process

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "CheckpointManager", "strip_prefix",
           "state_dict_problems",
           "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not what the caller expects."""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj: Mapping[str, Any], path: str, *, all_ranks: bool = False) -> str | None:
    """Atomically write ``obj`` to ``path`` (rank 0 only unless ``all_ranks``). Returns the path written, or None."""
    if not all_ranks and not is_main_process():
        return None
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(obj), f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; a checkpoint should be as readable as any file
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``; raise :class:`CheckpointError` with a clear message."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for torn/foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") \
            from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def strip_prefix(state_dict: Mapping[str, Any], prefixes: Iterable[str] = ("module.", "_orig_mod.")) -> dict:
    """Remove DDP/compile key prefixes (repeatedly, in any order)."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def state_dict_problems(own: Mapping[str, Any], theirs: Mapping[str, Any], *,
                        optional: tuple[str, ...] = ("num_batches_tracked",)) -> list[str]:
    """Why ``theirs`` would not load strictly into a model whose state dict is ``own``: one phrase per kind of
    mismatch (shapes, missing, unexpected keys, with examples), empty if it fits. Keys ending in one of ``optional``
    may be missing."""
    missing = sorted(k for k in own if k not in theirs and not k.endswith(optional))
    unexpected = sorted(k for k in theirs if k not in own)
    shapes = [f"{k}: {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(theirs)) if tuple(theirs[k].shape) != tuple(own[k].shape)]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (checkpoint vs model), e.g. {', '.join(shapes[:2])}")
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
    return problems


def capture_rng_state() -> dict:
    """Torch CPU (and CUDA) generator states as tensors (python/numpy global RNGs are not used by this project's
    decisions; data order comes from seeded samplers)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class CheckpointManager:
    """Rolling checkpoints in ``directory`` (``name_format``, default ``{prefix}_{n:06d}.pth``) plus
    ``model_best.pth``.

    Args:
        directory: output folder.
        keep: how many rolling checkpoints to keep (>= 1).
        prefix: file name prefix for the default name format.
        mode: ``max`` or ``min`` for the best metric.
        name_format: ``str.format`` pattern with one field ``n`` (e.g. ``"epoch_{n}.pt"``, the NVIDIA SSD names).
    """

    def __init__(self, directory: str, keep: int = 3, prefix: str = "checkpoint", mode: str = "max",
                 name_format: str | None = None) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory, self.keep, self.prefix, self.mode = directory, keep, prefix, mode
        self.name_format = name_format or prefix + "_{n:06d}.pth"
        self.best: float | None = None
        head, _, tail = self.name_format.partition("{n")
        tail = tail.partition("}")[2]
        self._glob = head + "*" + tail
        self._pattern = re.compile("^" + re.escape(head) + r"(\d+)" + re.escape(tail) + "$")

    @property
    def best_path(self) -> str:
        return os.path.join(self.directory, "model_best.pth")

    def path_for(self, n: int) -> str:
        return os.path.join(self.directory, self.name_format.format(n=n))

    def list(self) -> list[tuple[int, str]]:
        found = []
        for p in glob.glob(os.path.join(self.directory, self._glob)):
            m = self._pattern.search(os.path.basename(p))
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _is_better(self, metric: float | None) -> bool:
        if metric is None or not math.isfinite(metric):
            return False
        if self.best is None:
            return True
        return metric > self.best if self.mode == "max" else metric < self.best

    def save(self, state: Mapping[str, Any], n: int, metric: float | None = None) -> str | None:
        """Write checkpoint ``n``; update best; delete rolling files beyond ``keep`` (only after the new one is
        complete). Rank 0 only."""
        if not is_main_process():
            return None
        path = save_checkpoint(state, self.path_for(n))
        if self._is_better(metric):
            self.best = float(metric)
            self._publish_best(path, state)
        for _, old in self.list()[:-self.keep]:
            os.unlink(old)
        self.clean_temp()
        return path

    def _publish_best(self, path: str, state: Mapping[str, Any]) -> None:
        """``model_best.pth`` = the file just written: a hard link swapped in atomically (no second serialisation
        of weights, momentum and MRU store); a plain atomic save where links are not supported."""
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}model_best.{os.getpid()}")
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.link(path, tmp)
            os.replace(tmp, self.best_path)
            _fsync_dir(self.directory)
        except OSError:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            save_checkpoint(state, self.best_path)

    def clean_temp(self) -> None:
        """Remove temp files a crash mid-save may have left behind."""
        for p in glob.glob(os.path.join(self.directory, TMP_PREFIX + "*")):
            try:
                os.unlink(p)
            except OSError:
                pass

    def latest(self) -> str | None:
        """Newest checkpoint that loads, logging why newer ones were skipped; None if there is none."""
        for n, path in reversed(self.list()):
            try:
                load_checkpoint(path)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", path, e)
                continue
            return path
        return None
