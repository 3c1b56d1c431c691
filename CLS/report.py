"""What CLS reports: FLOPs/params of a (masked or compact) ResNet next to the dense one, and the ``--raport-file``."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

from torch import nn

from chex_core import compact_model, count_macs, count_params, resnet_groups
from chex_tasks.progress import args_to_dict

from . import model as cls_model

log = logging.getLogger("CLS")


def giga(macs: float) -> str:
    return f"{macs / 1e9:.3f}G" if macs >= 1e8 else f"{macs / 1e6:.2f}M"


def mega(params: float) -> str:
    return f"{params / 1e6:.3f}M"


def model_report(model: nn.Module, arch: str, num_classes: int, cifar_stem: bool, image_size: int,
                 residual: bool = False) -> dict:
    """FLOPs (MACs, the paper's convention: conv + fc, batch 1, zero-aware) and params of ``model`` next to the
    dense architecture's, and of its compact version (channels whose γ and β are zero removed; with ``residual``
    also residual-stream channels whose γ and β are zero in every norm of the stream, ``--chex-residual``)."""
    size = (3, image_size, image_size)
    dense_macs = cls_model.dense_macs_of(arch, num_classes, cifar_stem, image_size)
    dense_params = count_params(cls_model.build_model(arch, num_classes, cifar_stem=cifar_stem), zero_aware=False)
    groups = resnet_groups(model, residual=residual)
    small, spec = compact_model(model, groups, cls_model.masks_from_zeros(model, groups))
    rep = {"image_size": image_size, "macs": count_macs(model, size), "dense_macs": dense_macs,
           "params_nonzero": count_params(model), "dense_params": dense_params,
           "compact_macs": count_macs(small, size, zero_aware=False),
           "compact_params": count_params(small, zero_aware=False),
           "kept_channels": sum(spec.values()), "prunable_channels": sum(g.size for g in groups)}
    rep["macs_reduction_pct"] = cls_model.reduction(rep["macs"], dense_macs)
    rep["compact_macs_reduction_pct"] = cls_model.reduction(rep["compact_macs"], dense_macs)
    return rep


def log_model_report(rep: dict, title: str) -> None:
    log.info("%s @ %dx%d: FLOPs (MACs, zero-aware) %s vs dense %s (-%.1f%%); non-zero params %s vs dense %s",
             title, rep["image_size"], rep["image_size"], giga(rep["macs"]), giga(rep["dense_macs"]),
             rep["macs_reduction_pct"], mega(rep["params_nonzero"]), mega(rep["dense_params"]))
    log.info("%s, compacted: FLOPs %s (-%.1f%%), params %s, %d/%d prunable channels kept", title,
             giga(rep["compact_macs"]), rep["compact_macs_reduction_pct"], mega(rep["compact_params"]),
             rep["kept_channels"], rep["prunable_channels"])


def finite(obj):
    """``obj`` with NaN/inf floats replaced by None, so the JSON is standard (``json.dumps`` would write NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


class Raport:
    """The ``--raport-file`` JSON: args, one record per epoch, and the final summary (rewritten atomically)."""

    def __init__(self, path: Path, args: argparse.Namespace, is_main: bool, previous: dict | None = None):
        self.path, self.is_main = path, is_main
        self.data = {"args": args_to_dict(args), "epochs": [], "final": None}
        if previous:
            self.data["epochs"] = list(previous.get("epochs", []))

    def add_epoch(self, record: dict) -> None:
        self.data["epochs"] = [e for e in self.data["epochs"] if e.get("epoch") != record["epoch"]] + [record]
        self._write()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self._write()

    def _write(self) -> None:
        if not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(finite(self.data), indent=2) + "\n")
        os.replace(tmp, self.path)
