"""Input pipeline: images/s that the ``pytorch``, ``dali-cpu`` and ``dali-gpu`` CLS backends deliver to the device.

Uses ``benchmarks/input_pipeline.py`` (the same ``CLS.data.build_loaders`` the training script calls) on a generated
ImageNet-layout folder of 500×375 JPEGs: training (random-resized crop + flip) and validation (resize + centre crop)
pipelines at 224 px, ``dali_threads`` DALI threads vs as many DataLoader workers for ``pytorch``, batches moved to the
device as the training loop does. A backend that cannot run (DALI not installed; ``dali-gpu`` without a GPU) is
reported as skipped with the reason.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.input_pipeline import folder_stats, make_image_folder, measure
from CLS.dali import dali_unavailable_reason

from .common import Config


def run(cfg: Config, deadline=None) -> dict:
    backends, skipped = ["pytorch"], {}
    for b in ("dali-cpu", "dali-gpu"):
        reason = dali_unavailable_reason(b)
        if reason:
            skipped[b] = reason
        else:
            backends.append(b)
    per_class = max(1, cfg.dali_images // 8)
    size = (64, 48) if cfg.quick else (500, 375)
    with tempfile.TemporaryDirectory(prefix="gpu_check_jpegs_") as tmp:
        root = make_image_folder(Path(tmp), classes=2, train_per_class=per_class * 3, val_per_class=per_class,
                                 size=size, seed=cfg.seed)
        rows = measure(backends, root, ["train", "val"], cfg.dali_batch, cfg.dali_threads,
                       32 if cfg.quick else 224, 1 if cfg.quick else 3, cfg.device,
                       pytorch_workers=0 if cfg.quick else cfg.dali_threads)
        stats = folder_stats(root)
    problems = [f"{r['backend']} {r['split']}: {r['images_per_s']} images/s" for r in rows if not r["images_per_s"] > 0]
    return {"ok": not problems, "problems": problems, "rows": rows, "skipped": skipped, "folder": stats,
            "image_wh": list(size), "threads": cfg.dali_threads, "batch": cfg.dali_batch}
