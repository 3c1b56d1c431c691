"""``--json-summary FILE``: the run's parameters and results in the file format NVIDIA's SSD writes.

Upstream (``main.py`` → ``src/logger.py``) logs through NVIDIA's ``dllogger`` with a ``JSONStreamBackend``: one line
per record, ``DLLL `` followed by a JSON object with ``timestamp``, ``datetime``, ``elapsedtime`` (strings), ``type``
("LOG"), ``step`` and ``data``. The records written here, as upstream writes them:

* step ``"PARAMETER"``: the run's parameters under upstream's names (``log_params``);
* step ``[epoch]``: ``{"time": seconds}`` after every training epoch and ``{"mAP": AP}`` after every evaluation;
* step ``[]``: ``{"total time": seconds}`` and the summary ``{"mAP": last AP}`` at the end of training; after
  ``--mode evaluation`` the summary ``{"mAP": AP}``; after a benchmark mode ``{"avg_img/sec": ...}``.

Upstream also logs the training loss every 20 iterations; here the loss goes to the log and TensorBoard instead, and
each epoch's record carries the epoch's mean loss (``{"loss": ...}``). Only rank 0 writes, as upstream.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

__all__ = ["JsonSummary", "upstream_params"]


class JsonSummary:
    """Append-only ``DLLL`` JSON lines (no-op when ``path`` is None or on ranks other than 0)."""

    def __init__(self, path: str | None, is_main: bool = True):
        self.path = Path(path) if path and is_main else None
        self.start = datetime.now()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, step, data: dict) -> None:
        """One record; ``step`` is "PARAMETER", a tuple of ints (epoch, ...) or () for the summary."""
        if self.path is None:
            return
        now = datetime.now()
        record = {"timestamp": str(now.timestamp()), "datetime": str(now),
                  "elapsedtime": str((now - self.start).total_seconds()), "type": "LOG",
                  "step": step if isinstance(step, str) else list(step), "data": data}
        with self.path.open("a") as f:
            f.write("DLLL " + json.dumps(record) + "\n")


def upstream_params(args) -> dict:
    """The ``PARAMETER`` record: upstream's ``log_params`` keys with this run's values."""
    return {"dataset path": args.data, "epochs": args.epochs, "batch size": args.bs,
            "eval batch size": args.eval_batch_size, "no cuda": args.no_cuda, "seed": args.seed,
            "checkpoint path": args.checkpoint, "mode": args.mode, "eval on epochs": args.eval_on_epochs,
            "lr decay epochs": args.multistep, "learning rate": args.learning_rate, "momentum": args.momentum,
            "weight decay": args.weight_decay, "lr warmup": args.warmup, "backbone": args.backbone,
            "backbone path": args.backbone_path, "num workers": args.num_workers, "AMP": args.amp,
            "precision": "amp" if args.amp else "fp32"}
