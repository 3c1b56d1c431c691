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

from chex_core import apply_width_spec, count_macs
from chex_core import checkpoint as ckpt_utils
from chex_core.engine import AmpConfig
from chex_tasks.coco import coco_evaluate, format_metrics
from chex_tasks.export import read_compact
from DET.box_coder import BoxCoder
from DET.model import (SSD300, ResNetBackbone, StateDictMismatch, channel_groups, load_state_dict_checked,
                       map_upstream_state_dict)

__all__ = ["predict", "evaluate", "backbone_flops", "build_compact_ssd", "read_model_checkpoint", "checkpoint_label_map",
           "run_evaluation"]

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
    """Backbone MACs at ``size``² (the paper's convention, docs/algorithm.md): the dense ``name`` architecture vs.
    ``backbone`` as it is (masked with zeroed channels, or compact), counted zero-aware. Returns
    ``dense_gmacs``, ``gmacs`` and ``reduction`` (1 − gmacs/dense, the upstream "FLOPs reduction" column)."""
    dense = count_macs(ResNetBackbone(name).eval(), (3, size, size), zero_aware=False)
    probe = copy.deepcopy(backbone).float().cpu().eval()
    current = count_macs(probe, (3, size, size), zero_aware=True)
    return {"dense_gmacs": dense / 1e9, "gmacs": current / 1e9, "reduction": 1.0 - current / dense}


# ---------------------------------------------------------------------------------------------- --mode evaluation
def checkpoint_num_classes(state_dict: dict) -> int | None:
    """Number of classes of an SSD300 state dict (ours or upstream): conf.0 has 4 boxes × classes rows."""
    for key, value in state_dict.items():
        if key.endswith("conf.0.weight"):
            return value.shape[0] // 4
    return None


def read_model_checkpoint(path: str, backbone: str) -> tuple[dict, dict, dict | None]:
    """``(checkpoint dict, model state dict in SSD300 names, backbone width spec or None)`` of one of our training
    checkpoints, a compact export (any layout ``chex_tasks.export.read_compact`` reads), or a released upstream
    checkpoint (``model`` key, or a bare state dict; ``module.`` prefixes allowed)."""
    ckpt = ckpt_utils.load_checkpoint(path)
    trained = ckpt.get("backbone") or (ckpt.get("args") or {}).get("backbone")
    if trained and trained != backbone:
        raise StateDictMismatch(f"{path} holds an SSD300 with backbone {trained}, but --backbone is {backbone}")
    compact = read_compact(ckpt)
    state = compact.state_dict if compact else ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    try:
        return ckpt, map_upstream_state_dict(state), compact.width_spec if compact else None
    except StateDictMismatch as exc:
        raise StateDictMismatch(f"{path}: {exc}") from exc


def checkpoint_label_map(ckpt: dict, dataset) -> dict[int, int]:
    """COCO category id → contiguous label the checkpoint was trained with.

    Ours store ``{category id: label}``. Upstream NVIDIA/CHEX checkpoints store under the same key the
    dataset's ``label_info`` (``{label: category name}``, 0 = background); the label order is then the sorted
    category ids of the dataset, which is checked by name.
    """
    stored = ckpt.get("label_map") or {}
    if stored and all(isinstance(v, str) for v in stored.values()):
        names = [stored[k] for k in sorted(stored) if int(k) != 0]
        if names != [dataset.label_info[k] for k in sorted(dataset.label_info)]:
            raise StateDictMismatch(f"checkpoint classes {names[:3]}... differ from the dataset's "
                                    f"{list(dataset.label_info.values())[:3]}...")
        return dict(dataset.label_map)
    return {int(k): int(v) for k, v in stored.items()} or dict(dataset.label_map)


def build_compact_ssd(backbone: str, num_classes: int, spec: dict | None) -> nn.Module:
    """A dense SSD300 rebuilt to a backbone width spec (None: dense). The spec names backbone groups (residual
    streams too after ``--chex-residual``); ``channel_groups`` says which layers each name narrows, the heads reading
    layer3's stream included."""
    model = SSD300(backbone, num_classes)
    if spec:
        apply_width_spec(model, spec, groups=channel_groups(model, residual=True))
    return model


def log_evaluation(model: nn.Module, backbone: str, metrics: dict[str, float] | None, prefix: str) -> None:
    if metrics is None:
        return
    flops = backbone_flops(model.backbone, backbone)
    logger.info("%s: %s", prefix, format_metrics(metrics))
    logger.info("Backbone GMACs @300px: %.3f (dense %.3f) -> FLOPs reduction %.1f%%", flops["gmacs"],
                flops["dense_gmacs"], 100.0 * flops["reduction"])


def run_evaluation(args, rt, coder: BoxCoder) -> dict[str, float] | None:
    """``--mode evaluation``: load ``--checkpoint`` (ours, compact, or upstream) and print COCO bbox AP. Returns the
    metrics on rank 0, None elsewhere."""
    from DET.data import build_loaders

    loaders = build_loaders(args.data, coder, args.bs, args.eval_batch_size, args.num_workers, rt.rank,
                            rt.world_size, seed=0, with_train=False)
    ckpt, state, spec = read_model_checkpoint(args.checkpoint, args.backbone)
    label_map = checkpoint_label_map(ckpt, loaders.val_set)
    num_classes = checkpoint_num_classes(state) or len(label_map) + 1
    if set(label_map) != set(loaders.val_set.label_map) or num_classes != len(label_map) + 1:
        raise StateDictMismatch(f"{args.checkpoint} was trained for {num_classes - 1} classes "
                                f"{sorted(label_map)[:5]}..., the dataset has {len(loaders.val_set.label_map)} "
                                f"{sorted(loaders.val_set.label_map)[:5]}...")
    model = build_compact_ssd(args.backbone, num_classes, spec)
    load_state_dict_checked(model, state, args.checkpoint)
    model.to(rt.device)
    inverse = {int(label): int(cat) for cat, label in label_map.items()}
    amp = AmpConfig(enabled=args.amp, device_type=rt.device.type)
    metrics = evaluate(model, loaders.val, coder, inverse, rt.device, amp.autocast_dtype if args.amp else None)
    log_evaluation(model, args.backbone, metrics, f"COCO bbox evaluation of {args.checkpoint}")
    return metrics
