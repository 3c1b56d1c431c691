"""COCO bbox + segm evaluation of Mask R-CNN outputs (the upstream SEG results table).

torchvision's Mask R-CNN already pastes each 28x28 mask into the original image (``masks``: (N, 1, H, W)
probabilities); here they are thresholded at 0.5 and RLE-encoded, boxes go to xywh, contiguous labels back to COCO
category ids. A model in maskrcnn-benchmark's conventions (``SEG.conventions``) produces inclusive pixel boxes, which
upstream converts with width = x2 - x1 + 1; that is done here too, so a released checkpoint is scored as upstream
scored it. Inference is sharded over ranks and gathered on rank 0, which runs COCOeval.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from chex_core import distributed
from chex_tasks.coco import METRIC_NAMES, coco_evaluate
from chex_tasks.progress import progress

from .conventions import box_convention
from .data import CocoInstances, ShardSampler, collate

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5


def outputs_to_coco(output: dict, image_id: int, label_to_cat: dict[int, int],
                    convention: str = "torchvision") -> tuple[list[dict], list[dict]]:
    """One image's Mask R-CNN output -> (bbox results, segm results) in COCO result format.

    ``output``: ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) contiguous, ``scores`` (N,), ``masks`` (N, 1, H, W)
    in [0, 1]. Masks are binarised at 0.5 and RLE-encoded (counts as str, JSON-safe). ``convention`` "upstream":
    boxes are inclusive, width = x2 - x1 + 1 (maskrcnn-benchmark ``BoxList.convert("xywh")``).
    """
    if convention not in ("torchvision", "upstream"):
        raise ValueError(f"unknown box convention {convention!r}")
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    extra = 1.0 if convention == "upstream" else 0.0
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + extra], dim=1).tolist()
    bbox_res, segm_res = [], []
    masks = None
    if "masks" in output and len(labels):
        masks = (output["masks"].detach().cpu()[:, 0] > MASK_THRESHOLD).numpy().astype(np.uint8)
    for k, (label, score) in enumerate(zip(labels, scores)):
        cat = label_to_cat[int(label)]
        bbox_res.append({"image_id": int(image_id), "category_id": cat, "bbox": xywh[k], "score": float(score)})
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode("ascii")
            segm_res.append({"image_id": int(image_id), "category_id": cat, "segmentation": rle, "score": float(score)})
    return bbox_res, segm_res


def target_as_output(target: dict) -> dict:
    """A ground-truth target shaped like a model output (score 1, masks as (N, 1, H, W) probabilities).

    Crowd regions are left out: COCOeval ignores matches to them, so predicting them would only add false
    positives. Used to check the evaluation path end to end (ground truth must score AP = 1).
    """
    keep = target["iscrowd"] == 0
    return {
        "boxes": target["boxes"][keep],
        "labels": target["labels"][keep],
        "scores": torch.ones(int(keep.sum())),
        "masks": target["masks"][keep][:, None].float(),
    }


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CocoInstances, device: torch.device, batch_size: int = 1,
            workers: int = 0, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """Run inference on this rank's shard of ``dataset`` and gather all results on every rank.

    Returns (bbox results, segm results) over the whole dataset (first ``limit`` images if given).
    """
    size = len(dataset) if limit is None else min(limit, len(dataset))
    sampler = ShardSampler(size, distributed.get_rank(), distributed.get_world_size())
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    convention = box_convention(model)
    bbox_res, segm_res = [], []
    try:
        for images, targets in progress(loader, total=len(loader), desc="eval", is_main=distributed.is_main_process()):
            outputs = model([img.to(device) for img in images])
            for out, tgt in zip(outputs, targets):
                b, s = outputs_to_coco(out, tgt["image_id"], dataset.label_to_cat, convention)
                bbox_res += b
                segm_res += s
    finally:
        model.train(was_training)
    gathered = distributed.all_gather_object((bbox_res, segm_res))
    return [r for b, _ in gathered for r in b], [r for _, s in gathered for r in s]


def evaluate_results(dataset: CocoInstances, bbox_res: list[dict], segm_res: list[dict],
                     image_ids: Iterable[int] | None = None) -> dict[str, dict[str, float]]:
    """COCOeval bbox and segm: ``{"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...}}`` in [0, 1]."""
    return {
        "bbox": coco_evaluate(dataset.coco, bbox_res, "bbox", image_ids=image_ids),
        "segm": coco_evaluate(dataset.coco, segm_res, "segm", image_ids=image_ids),
    }


def format_report(metrics: dict[str, dict[str, float]], macs: int | None = None, dense_macs: int | None = None) -> str:
    """Upstream-style table: one line per task with AP, AP50, AP75, APs, APm, APl (percent), plus body FLOPs."""
    lines = [f"{'task':5s} | " + " | ".join(f"{n:>5s}" for n in METRIC_NAMES)]
    for task in ("bbox", "segm"):
        lines.append(f"{task:5s} | " + " | ".join(f"{100 * metrics[task][n]:5.1f}" for n in METRIC_NAMES))
    if macs is not None and dense_macs:
        lines.append(f"backbone body MACs @224: {macs / 1e9:.3f} G of {dense_macs / 1e9:.3f} G dense "
                     f"(FLOPs reduction {100 * (1 - macs / dense_macs):.1f}%)")
    return "\n".join(lines)


__all__ = ["outputs_to_coco", "target_as_output", "predict", "evaluate_results", "format_report"]
