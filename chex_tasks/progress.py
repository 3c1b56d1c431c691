"""Rank-0 run reporting shared by the task entry points (CLS, and later DET/SEG).

Three small helpers, all safe to call on every rank:

* :func:`progress` wraps an iterable in a tqdm bar with ETA on rank 0 when stdout is an interactive terminal,
  and returns the iterable untouched otherwise (non-zero ranks, pipes, log files, ``CI`` set, tqdm missing).
* :class:`TensorBoardWriter` is a ``SummaryWriter`` on rank 0 and a silent no-op elsewhere, or when tensorboard
  is not installed, so training code never needs ``if rank == 0`` around logging calls.
* :func:`save_args` writes the resolved argparse namespace as JSON next to the run's checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)


def progress_enabled(is_main: bool) -> bool:
    """True when a live progress bar is useful: rank 0, a TTY on stdout, not under CI, tqdm importable."""
    if not is_main or os.environ.get("CI") or not sys.stdout.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", is_main: bool = True,
             enabled: bool | None = None) -> Iterable:
    """Return ``iterable`` wrapped in a tqdm bar (with ETA) when :func:`progress_enabled`, else unchanged.

    ``enabled`` overrides the automatic decision (``False`` forces no bar).
    """
    if enabled is None:
        enabled = progress_enabled(is_main)
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stdout)


class TensorBoardWriter:
    """TensorBoard scalars on rank 0; every method is a no-op on other ranks or without tensorboard.

    Args:
        log_dir: event-file directory (created on demand by ``SummaryWriter``).
        is_main: whether this process is rank 0.
    """

    def __init__(self, log_dir: str | os.PathLike | None, is_main: bool = True):
        self._writer = None
        if not is_main or log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            log.warning("tensorboard is not installed; TensorBoard logging is disabled")
            return
        self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """Write each ``values[k]`` as its own scalar ``{prefix}/{k}`` (one curve per key)."""
        for key, value in values.items():
            self.scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)  # paths, enums, dtypes: keep them readable rather than failing


def args_to_dict(args: argparse.Namespace | Mapping[str, Any]) -> dict:
    """Plain-container copy of ``args`` (JSON- and ``torch.load(weights_only=True)``-safe)."""
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: _jsonable(v) for k, v in items.items()}


def save_args(args: argparse.Namespace | Mapping[str, Any], directory: str | os.PathLike,
              filename: str = "args.json") -> Path:
    """Write the resolved arguments as sorted, indented JSON to ``directory/filename``; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(args_to_dict(args), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
