"""COCO bbox + segm evaluation of Mask R-CNN outputs (the upstream SEG results table).

torchvision's Mask R-CNN already pastes each 28x28 mask into the original image (``masks``: (N, 1, H, W)
probabilities); here they are thresholded at 0.5 and RLE-encoded, boxes go to xywh, contiguous labels back to COCO
category ids. A model in maskrcnn-benchmark's conventions (``SEG.conventions``) produces inclusive pixel boxes, which
upstream converts with width = x2 - x1 + 1; that is done here too, so a released checkpoint is scored as upstream
scored it. Inference is sharded over ranks and gathered on rank 0, which runs COCOeval.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from pycocotools import mask as mask_utils

from chex_core import distributed
from chex_core.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from chex_tasks.coco import METRIC_NAMES, coco_evaluate
from chex_tasks.harness.data import make_eval_loader
from chex_tasks.progress import progress

from .conventions import box_convention
from .data import CocoInstances, SegSplits, collate, resolve_splits
from .model import (SamplingConfig, body_macs, build_maskrcnn, dense_body_macs, is_upstream_state_dict,
                    load_model_weights)

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
    loader = make_eval_loader(dataset, batch_size=batch_size, workers=workers, rank=distributed.get_rank(),
                              world_size=distributed.get_world_size(), collate_fn=collate, limit=limit)
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


UPSTREAM_CHECKPOINT = "maskrcnn_37%flops_37.3apbox_34.5apmask.pth.tar"
FINAL_NAME = "model_final.pth"
# Architecture flags recorded in our checkpoints: evaluation rebuilds the model the checkpoint was trained with
# (the conventions included: a model trained with upstream's arithmetic is evaluated with it).
ARCH_FLAGS = ("norm", "head_norm", "stride_in_1x1", "conventions")
UPSTREAM_ARCH = {"norm": "gn", "head_norm": "gn", "stride_in_1x1": True, "conventions": "upstream"}


def model_from_args(args, num_classes: int) -> torch.nn.Module:
    """The Mask R-CNN the flags describe (``--conventions`` already resolved: "auto" counts as torchvision's)."""
    sampling = SamplingConfig(args.rpn_pre_nms_top_n_train, args.rpn_post_nms_top_n_train,
                              args.rpn_pre_nms_top_n_test, args.rpn_post_nms_top_n_test,
                              args.rpn_batch_size_per_image, args.box_batch_size_per_image, args.box_detections_per_img)
    conventions = "upstream" if getattr(args, "conventions", None) == "upstream" else "torchvision"
    return build_maskrcnn(num_classes, norm=args.norm, head_norm=args.head_norm, stride_in_1x1=args.stride_in_1x1,
                          min_size=args.min_size, max_size=args.max_size, sampling=sampling, conventions=conventions,
                          post_nms_per_batch=getattr(args, "rpn_post_nms_per_batch", True))


def splits_from_args(args) -> SegSplits:
    """The training sets and the evaluation set of ``--data-path``/``--year``/``--eval-split`` (``DataError``)."""
    return resolve_splits(args.data_path, args.year, args.eval_split, need_train=not args.eval_only)


def find_eval_checkpoint(path) -> Path:
    """A file as given; for a folder: the upstream release file, else ``model_final.pth``, else the newest
    loadable rolling checkpoint. ``FileNotFoundError`` when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint file or folder at {path}")
    for name in (UPSTREAM_CHECKPOINT, FINAL_NAME):
        if (path / name).is_file():
            return path / name
    latest = CheckpointManager(str(path)).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path} (looked for {UPSTREAM_CHECKPOINT}, {FINAL_NAME}, "
                                "checkpoint_*.pth)")
    return Path(latest)


def run_evaluation(model, args, device, dense_macs: int | None = None) -> dict:
    """Sharded inference + COCOeval on rank 0 over the evaluation set of ``--eval-split``; logs the upstream-style
    table and writes ``eval_metrics.json`` with the set evaluated and any warning about it (e.g. all of val2014
    overlaps the released model's training images)."""
    splits = splits_from_args(args)
    val = CocoInstances(splits.test.images, splits.test.annotations, train=False)
    bbox_res, segm_res = predict(model, val, device, batch_size=1, workers=min(args.workers, 2), limit=args.eval_limit)
    if not distributed.is_main_process():
        return {}
    ids = val.ids[:args.eval_limit] if args.eval_limit else None
    metrics = evaluate_results(val, bbox_res, segm_res, image_ids=ids)
    macs = body_macs(model)
    dense = dense_macs if dense_macs is not None else dense_body_macs(args.stride_in_1x1)
    n_images = len(ids) if ids else len(val)
    logger.info("%s (%d images, %d detections):\n%s", splits.test.name, n_images, len(bbox_res),
                format_report(metrics, macs, dense))
    for warning in splits.warnings:
        logger.warning("%s", warning)
    out = {**metrics, "body_macs": macs, "dense_body_macs": dense, "flops_reduction": 1 - macs / dense,
           "eval_set": {"name": splits.test.name, "annotations": str(splits.test.annotations), "images": n_images},
           "warnings": list(splits.warnings)}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "eval_metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def read_eval_checkpoint(path: str, allow_pickle: bool) -> dict:
    """``torch.load(weights_only=True)``; with ``allow_pickle`` a trusted third-party file may fall back to a full
    unpickle (a release file could hold pickled objects that the safe loader rejects)."""
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        if not allow_pickle or not os.path.isfile(path):
            raise CheckpointError(f"{err} (if this is a trusted release file, retry with --allow-pickle)") from None
        logger.warning("loading %s with weights_only=False (--allow-pickle)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def evaluate_checkpoint(args, device) -> dict:
    """``--eval-only``: rebuild the model a checkpoint was trained with, load it (upstream names mapped), evaluate."""
    ckpt = read_eval_checkpoint(args.weights, args.allow_pickle)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    # Our checkpoints record their architecture flags; a released upstream file implies the upstream layout.
    upstream = isinstance(state, dict) and is_upstream_state_dict(state)
    saved = dict(UPSTREAM_ARCH) if upstream else ckpt.get("args") or {}
    for flag in ARCH_FLAGS:
        if flag in saved and saved[flag] != getattr(args, flag):
            logger.info("using the checkpoint's --%s %s", flag.replace("_", "-"), saved[flag])
            setattr(args, flag, saved[flag])
    test = splits_from_args(args).test
    num_classes = CocoInstances(test.images, test.annotations, train=False).num_classes
    model = model_from_args(args, num_classes)
    kind = load_model_weights(model, ckpt)
    logger.info("loaded %s checkpoint %s (iteration %s)", kind, args.weights, ckpt.get("iteration", "?"))
    model.to(device)
    return run_evaluation(model, args, device)


__all__ = ["outputs_to_coco", "target_as_output", "predict", "evaluate_results", "format_report", "run_evaluation",
           "evaluate_checkpoint", "find_eval_checkpoint", "model_from_args", "splits_from_args", "read_eval_checkpoint"]
