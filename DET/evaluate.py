"""SSD300 evaluation: decode + per-class NMS + top-200 → COCO results → COCOeval bbox; backbone FLOPs.

Each rank runs its shard of the validation set; the COCO result dicts are gathered to rank 0, which runs
``chex_tasks.coco.coco_evaluate`` over the validation set's images (images without detections count as misses).
As in NVIDIA's SSD, that set leaves out images without annotations (``DET.data.CocoDetection``) and boxes are not
clipped to the image. Unlike NVIDIA's multi-GPU evaluation, no image is evaluated twice (its ``DistributedSampler``
pads the last shard with repeated images, whose duplicate detections count as false positives).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from torch import nn

from chex_core import count_macs
from chex_tasks.coco import coco_evaluate
from DET.box_coder import BoxCoder
from DET.model import ResNetBackbone

__all__ = ["predict", "evaluate", "backbone_flops"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: nn.Module, loader, coder: BoxCoder, inverse_label_map: dict[int, int], device: torch.device,
            autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """COCO result dicts (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in original pixels, ``score``)
    for every image of ``loader`` (this rank's shard)."""
    was_training = model.training
    model.eval()
    results = []
    try:
        for images, image_ids, sizes in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                locs, confs = model(images)
            for det, image_id, (height, width) in zip(coder.postprocess(locs, confs), image_ids.tolist(),
                                                      sizes.tolist()):
                boxes = det.boxes.cpu() * torch.tensor([width, height, width, height], dtype=torch.float32)
                for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), det.labels.tolist(), det.scores.tolist()):
                    # unrounded, as NVIDIA's evaluate() hands them to COCOeval
                    results.append({"image_id": int(image_id), "category_id": inverse_label_map[int(label)],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    finally:
        model.train(was_training)
    return results


def evaluate(model: nn.Module, loader, coder: BoxCoder, inverse_label_map: dict[int, int], device: torch.device,
             autocast_dtype: torch.dtype | None = None) -> dict[str, float] | None:
    """Run ``predict`` on every rank, gather to rank 0 and compute COCO bbox AP there.

    Returns the metrics dict (AP, AP50, AP75, APs, APm, APl in [0, 1]) on rank 0 and ``None`` elsewhere.
    """
    results = predict(model, loader, coder, inverse_label_map, device, autocast_dtype)
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        if dist.get_rank() != 0:
            return None
        results = [r for part in gathered for r in part]
    dataset = loader.dataset
    return coco_evaluate(dataset.coco, results, iou_type="bbox", image_ids=dataset.ids)


def backbone_flops(backbone: nn.Module, name: str, size: int = 300) -> dict[str, float]:
    """Backbone MACs at ``size``² (paper convention, ALGORITHM.md §6.4): the dense ``name`` architecture vs.
    ``backbone`` as it is (masked with zeroed channels, or compact), counted zero-aware. Returns
    ``dense_gmacs``, ``gmacs`` and ``reduction`` (1 − gmacs/dense, the upstream "FLOPs reduction" column)."""
    dense = count_macs(ResNetBackbone(name).eval(), (3, size, size), zero_aware=False)
    probe = copy.deepcopy(backbone).float().cpu().eval()
    current = count_macs(probe, (3, size, size), zero_aware=True)
    return {"dense_gmacs": dense / 1e9, "gmacs": current / 1e9, "reduction": 1.0 - current / dense}
