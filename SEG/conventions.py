"""maskrcnn-benchmark ("upstream") numeric conventions for the torchvision Mask R-CNN of ``SEG.model``.

Why this module exists: the released CHEX SEG checkpoint was trained and scored by NVIDIA's fork of
maskrcnn-benchmark. torchvision's Mask R-CNN has the same layers but not the same arithmetic around them, and a
released checkpoint run through torchvision's arithmetic does not reproduce the published box/mask AP. Each
difference below is small; together they move AP. ``apply_upstream_conventions`` swaps the affected torchvision parts
for the upstream arithmetic while keeping every parameter (and every state-dict key) of the model, so the same
weights load either way. ``docs/upstream_conventions.md`` lists each convention with the upstream file it comes from.

What changes (upstream behaviour, all pixel coordinates "inclusive", i.e. a box [x1, x2] is x2 - x1 + 1 wide):
* anchors: maskrcnn-benchmark ``generate_anchors`` (centred at ((stride - 1) / 2), legacy rounding of the ratio
  enumeration), a fixed stride per FPN level (4..64) instead of torchvision's ``image size // grid size``, float32;
* box coding: widths with "+1" (``TO_REMOVE``), decoded x2/y2 with "-1", weights RPN (1, 1, 1, 1) and ROI
  (10, 10, 5, 5), ``dw``/``dh`` clipped at log(1000 / 16);
* IoU (matchers and NMS) with "+1" areas; NMS suppresses IoU > threshold (the CUDA kernel upstream ran on);
* clipping to [0, width - 1] x [0, height - 1];
* RPN: per level top-N before NMS, NMS per level, at most N per level after it, then the best N per image at test
  time but the best N over the whole per-GPU batch in training (``FPN_POST_NMS_PER_BATCH``); during training
  anchors straddling the image border (``STRADDLE_THRESH`` 0) are ignored by the RPN loss;
* ROI levels: FPN level from sqrt of the "+1" area, ``floor(4 + log2(s / 224 + 1e-6))``, fixed pooler scales;
* detections: per class score > 0.05, NMS 0.5, then the ``kthvalue`` cut to 100 per image (ties kept);
* Fast R-CNN box loss: smooth-L1 with beta 1 (torchvision: 1/9);
* resizing: the target size of maskrcnn-benchmark's ``Resize.get_size`` (torchvision can be one pixel off when the
  max size binds).

Unchanged because the two libraries already agree (checked in ``tests/test_seg_conventions.py``): ROIAlign with
``sampling_ratio=2`` and ``aligned=False``, mask paste (box expanded by (M + 2) / M, bilinear, threshold 0.5),
size divisibility 32, score/NMS/detection limits, RPN sampling and loss.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, box_iou, nms

__all__ = [
    "ANCHOR_STRIDES", "ANCHOR_SIZES", "ASPECT_RATIOS", "RPN_BOX_WEIGHTS", "ROI_BOX_WEIGHTS", "BBOX_XFORM_CLIP",
    "POOLER_SCALES", "legacy_cell_anchors", "LegacyBoxCoder", "legacy_box_iou", "legacy_nms", "clip_boxes_legacy",
    "upstream_resize_shape", "UpstreamAnchorGenerator", "UpstreamLevelMapper", "UpstreamRPN", "UpstreamRoIHeads",
    "UpstreamTransform", "apply_upstream_conventions", "cell_anchors_from_state_dict", "box_convention",
]

ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
POOLER_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
STRADDLE_THRESH = 0
_CELL_ANCHOR_KEY = "rpn.anchor_generator.cell_anchors."


# --------------------------------------------------------------------------------------------- primitives
def legacy_cell_anchors(stride: int, size: int, aspect_ratios: Sequence[float] = ASPECT_RATIOS) -> Tensor:
    """Base anchors of one FPN level, (A, 4) float32 xyxy, as maskrcnn-benchmark's ``generate_anchors``.

    Start from the inclusive window [0, stride - 1]² (centre (stride - 1) / 2); for each ratio r = h / w keep its
    area with ``w = round(sqrt(area / r))``, ``h = round(w * r)``; scale both by ``size / stride``; corners are
    ``centre ∓ (side - 1) / 2``. Computed in float64 like the numpy original, returned as float32.
    """
    ratios = np.asarray(aspect_ratios, dtype=np.float64)
    base = float(stride)
    centre = 0.5 * (base - 1)
    ws = np.round(np.sqrt(base * base / ratios))
    hs = np.round(ws * ratios)
    scale = size / base
    ws, hs = ws * scale, hs * scale
    anchors = np.stack([centre - 0.5 * (ws - 1), centre - 0.5 * (hs - 1),
                        centre + 0.5 * (ws - 1), centre + 0.5 * (hs - 1)], axis=1)
    return torch.from_numpy(anchors).float()


def _plus_one(boxes: Tensor) -> Tensor:
    """Inclusive xyxy -> half-open xyxy (x2 + 1, y2 + 1): the "+1" IoU of maskrcnn-benchmark equals torchvision's
    IoU of the shifted boxes (same widths, areas and intersections)."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)


def legacy_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(N, M) IoU with maskrcnn-benchmark's "+1" widths (``boxlist_iou``)."""
    return box_iou(_plus_one(boxes1), _plus_one(boxes2))


def legacy_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by maskrcnn-benchmark's CUDA NMS ("+1" areas, suppress IoU > threshold), by decreasing score."""
    return nms(_plus_one(boxes.float()), scores.float(), iou_threshold)


def clip_boxes_legacy(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp xyxy boxes to [0, w - 1] x [0, h - 1] (``BoxList.clip_to_image``); ``size`` is (h, w)."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width - 1)
    y = boxes[..., 1::2].clamp(min=0, max=height - 1)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


class LegacyBoxCoder(det_utils.BoxCoder):
    """torchvision's ``BoxCoder`` interface with maskrcnn-benchmark's "+1" arithmetic (``modeling/box_coder.py``).

    encode: ``w = x2 - x1 + 1``, ``cx = x1 + w / 2`` for both boxes; targets ``wx (gcx - cx) / w``, ``ww log(gw / w)``.
    decode: the inverse, with ``x2 = cx + w / 2 - 1``; ``dw``/``dh`` clipped at ``bbox_xform_clip`` first.
    """

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        ex_w = proposals[:, 2] - proposals[:, 0] + 1
        ex_h = proposals[:, 3] - proposals[:, 1] + 1
        ex_x, ex_y = proposals[:, 0] + 0.5 * ex_w, proposals[:, 1] + 0.5 * ex_h
        gt_w = reference_boxes[:, 2] - reference_boxes[:, 0] + 1
        gt_h = reference_boxes[:, 3] - reference_boxes[:, 1] + 1
        gt_x, gt_y = reference_boxes[:, 0] + 0.5 * gt_w, reference_boxes[:, 1] + 0.5 * gt_h
        return torch.stack([wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                            ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)], dim=1)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0] + 1
        heights = boxes[:, 3] - boxes[:, 1] + 1
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_x = dx * widths[:, None] + ctr_x[:, None]
        pred_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        return torch.stack([pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h,
                            pred_x + 0.5 * pred_w - 1, pred_y + 0.5 * pred_h - 1], dim=2).flatten(1)


def upstream_resize_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after maskrcnn-benchmark's ``Resize.get_size``: shorter side ``min_size`` unless the longer side would
    pass ``max_size``, in which case the shorter side becomes ``round(max_size * short / long)``; the other side is
    truncated (``int``)."""
    size = min_size
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


# --------------------------------------------------------------------------------------------- modules
class UpstreamAnchorGenerator(AnchorGenerator):
    """Anchors of maskrcnn-benchmark's FPN ``AnchorGenerator``: legacy cell anchors (or those stored in a
    checkpoint), shifted by ``arange(grid) * stride`` with the level's fixed stride, always float32.

    torchvision derives the stride from ``padded image size // feature size``, which is not the level's stride when
    the padded size is not a multiple of it (P6 of an 800-px image: 800 // 13 = 61, not 64).
    """

    def __init__(self, strides: Sequence[int] = ANCHOR_STRIDES, sizes: Sequence[int] = ANCHOR_SIZES,
                 aspect_ratios: Sequence[float] = ASPECT_RATIOS, cell_anchors: Sequence[Tensor] | None = None):
        super().__init__(sizes=tuple((s,) for s in sizes), aspect_ratios=(tuple(aspect_ratios),) * len(sizes))
        self.strides = tuple(int(s) for s in strides)
        if cell_anchors is None:
            cell_anchors = [legacy_cell_anchors(st, sz, aspect_ratios) for st, sz in zip(self.strides, sizes)]
        cell_anchors = [torch.as_tensor(a, dtype=torch.float32) for a in cell_anchors]
        expected = [(len(aspect_ratios), 4)] * len(self.strides)
        if [tuple(a.shape) for a in cell_anchors] != expected:
            raise ValueError(f"cell anchors of shapes {[tuple(a.shape) for a in cell_anchors]} do not fit "
                             f"{len(self.strides)} FPN levels x {len(aspect_ratios)} aspect ratios")
        # A plain list, as in torchvision: not buffers, so the model's state-dict keys do not change.
        self.cell_anchors = cell_anchors

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        if len(grid_sizes) != len(self.strides):
            raise ValueError(f"{len(grid_sizes)} feature maps but {len(self.strides)} anchor strides")
        self.set_cell_anchors(torch.float32, device)
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class UpstreamLevelMapper:
    """FPN level of each ROI as maskrcnn-benchmark's ``LevelMapper``: sqrt of the "+1" area, eps inside the log."""

    def __init__(self, k_min: int = 2, k_max: int = 5, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6):
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        boxes = torch.cat(boxlists)
        s = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))
        levels = torch.floor(self.lvl0 + torch.log2(s / self.s0 + self.eps))
        return levels.clamp(min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min


def _upstream_pooler(pooler: MultiScaleRoIAlign) -> MultiScaleRoIAlign:
    """The same ROIAlign (size, sampling ratio, aligned=False) with upstream's fixed scales and level mapper.

    ``MultiScaleRoIAlign`` infers scales and mapper on its first call only when they are unset; setting both here
    makes it use upstream's.
    """
    out = MultiScaleRoIAlign(list(pooler.featmap_names), pooler.output_size, pooler.sampling_ratio)
    out.scales = list(POOLER_SCALES)
    out.map_levels = UpstreamLevelMapper(2, 5)
    return out


class UpstreamTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, resize, pad to a multiple of 32) with upstream's resize target size."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        height, width = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        new_h, new_w = upstream_resize_shape(int(height), int(width), int(size), int(self.max_size))
        if (new_h, new_w) != (height, width):
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], (height, width), (new_h, new_w))
        if "masks" in target:
            masks = target["masks"][:, None].float()
            target["masks"] = F.interpolate(masks, size=(new_h, new_w))[:, 0].byte()
        return image, target


class UpstreamRPN(RegionProposalNetwork):
    """torchvision's RPN (same head, sampler, matcher thresholds and loss) with maskrcnn-benchmark's proposal
    selection, box coding, IoU and border handling (see the module docstring).

    ``post_nms_per_batch``: in training keep the best ``post_nms_top_n`` proposals of the whole batch on this
    process rather than of each image (upstream's ``FPN_POST_NMS_PER_BATCH``, on in the released recipe).
    """

    def __init__(self, rpn: RegionProposalNetwork, anchor_generator: AnchorGenerator, post_nms_per_batch: bool = True,
                 straddle_thresh: float = STRADDLE_THRESH):
        super().__init__(anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                         rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                         rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                         rpn.nms_thresh, rpn.score_thresh)
        self.box_coder = LegacyBoxCoder(RPN_BOX_WEIGHTS, BBOX_XFORM_CLIP)
        self.box_similarity = legacy_box_iou
        self.post_nms_per_batch = post_nms_per_batch
        self.straddle_thresh = straddle_thresh

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                            for i, n in enumerate(num_anchors_per_level)]).expand(num_images, -1)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, before NMS
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores_all = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels, proposals = levels[batch_idx, top_n_idx], proposals[batch_idx, top_n_idx]
        post_n = self.post_nms_top_n()
        boxes_out, scores_out = [], []
        for boxes, scores, lvl, shape in zip(proposals, scores_all, levels, image_shapes):
            boxes = clip_boxes_legacy(boxes, shape)  # upstream's RPN min size 0 keeps every clipped box
            keep = torch.cat([idx[legacy_nms(boxes[idx], scores[idx], self.nms_thresh)][:post_n]
                              for idx in (torch.where(lvl == k)[0] for k in lvl.unique())])
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
        return self._select_over_levels(boxes_out, scores_out, post_n)

    def _select_over_levels(self, boxes: list[Tensor], scores: list[Tensor], post_n: int):
        """Best ``post_n`` of all levels: per image, or (training with ``post_nms_per_batch``) per batch."""
        if self.training and self.post_nms_per_batch:
            flat = torch.cat(scores)
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen[flat.topk(min(post_n, flat.numel())).indices] = True
            masks = chosen.split([len(s) for s in scores])
            return [b[m] for b, m in zip(boxes, masks)], [s[m] for s, m in zip(scores, masks)]
        order = [s.topk(min(post_n, s.numel())).indices for s in scores]
        return [b[o] for b, o in zip(boxes, order)], [s[o] for s, o in zip(scores, order)]

    def _visible(self, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Anchors inside the (resized, unpadded) image up to ``straddle_thresh`` pixels; all when it is < 0."""
        if self.straddle_thresh < 0:
            return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        height, width = image_size
        t = self.straddle_thresh
        return ((anchors[:, 0] >= -t) & (anchors[:, 1] >= -t) & (anchors[:, 2] < width + t)
                & (anchors[:, 3] < height + t))

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        feats = list(features.values())
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(images, feats)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        if not self.training:
            return boxes, {}
        if targets is None:
            raise ValueError("targets should not be None in training")
        labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
        # upstream ignores (label -1) anchors that straddle the image border
        labels = [torch.where(self._visible(a, size), lab, torch.full_like(lab, -1.0))
                  for lab, a, size in zip(labels, anchors, images.image_sizes)]
        regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
        loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, regression_targets)
        return boxes, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}


def upstream_fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                           regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Fast R-CNN loss of maskrcnn-benchmark: cross-entropy, and smooth-L1 with beta 1 summed over the positive
    ROIs' class-specific deltas, divided by the number of sampled ROIs."""
    labels_t = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    classification = F.cross_entropy(class_logits, labels_t)
    pos = torch.where(labels_t > 0)[0]
    box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
    box_loss = F.smooth_l1_loss(box_regression[pos, labels_t[pos]], targets[pos], beta=1.0, reduction="sum")
    return classification, box_loss / labels_t.numel()


class UpstreamRoIHeads(RoIHeads):
    """torchvision's box and mask heads (same modules) with maskrcnn-benchmark's ROI level mapping, "+1" box coder
    and IoU, Fast R-CNN box loss and detection post-processing. Box + mask only (no keypoints)."""

    def __init__(self, heads: RoIHeads):
        super().__init__(_upstream_pooler(heads.box_roi_pool), heads.box_head, heads.box_predictor,
                         heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                         heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                         ROI_BOX_WEIGHTS, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                         mask_roi_pool=_upstream_pooler(heads.mask_roi_pool), mask_head=heads.mask_head,
                         mask_predictor=heads.mask_predictor)
        self.box_coder = LegacyBoxCoder(ROI_BOX_WEIGHTS, BBOX_XFORM_CLIP)
        self.box_similarity = legacy_box_iou

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]):
        """Per image: decode, clip to [0, w-1] x [0, h-1], per class (score > thresh, NMS), then keep the scores
        >= the ``detections_per_img``-th largest (maskrcnn-benchmark ``PostProcessor.filter_results``)."""
        num_classes = class_logits.shape[-1]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        per_image = [len(p) for p in proposals]
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes.split(per_image), pred_scores.split(per_image), image_shapes):
            boxes = clip_boxes_legacy(boxes, shape)
            kept_boxes, kept_scores, kept_labels = [], [], []
            for j in range(1, num_classes):
                idx = torch.where(scores[:, j] > self.score_thresh)[0]
                b, s = boxes[idx, j], scores[idx, j]
                keep = legacy_nms(b, s, self.nms_thresh)
                kept_boxes.append(b[keep])
                kept_scores.append(s[keep])
                kept_labels.append(torch.full((len(keep),), j, dtype=torch.int64, device=s.device))
            b, s, lab = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
            if len(s) > self.detections_per_img > 0:
                thresh = torch.kthvalue(s.cpu(), len(s) - self.detections_per_img + 1).values.item()
                keep = torch.where(s >= thresh)[0]
                b, s, lab = b[keep], s[keep], lab[keep]
            all_boxes.append(b)
            all_scores.append(s)
            all_labels.append(lab)
        return all_boxes, all_scores, all_labels

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if not self.training:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]
            mask_logits = self._mask_logits(features, [r["boxes"] for r in result], image_shapes)
            for prob, r in zip(maskrcnn_inference(mask_logits, labels), result):
                r["masks"] = prob
            return result, {}
        loss_classifier, loss_box_reg = upstream_fastrcnn_loss(class_logits, box_regression, labels,
                                                               regression_targets)
        # the mask head trains on the positive ROIs only, against the mask of their matched ground truth
        positive = [torch.where(lab > 0)[0] for lab in labels]
        mask_proposals = [p[pos] for p, pos in zip(proposals, positive)]
        pos_matched = [m[pos] for m, pos in zip(matched_idxs, positive)]
        mask_logits = self._mask_logits(features, mask_proposals, image_shapes)
        loss_mask = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], pos_matched)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    def _mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes) -> Tensor:
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))


# --------------------------------------------------------------------------------------------- switching a model
def cell_anchors_from_state_dict(state_dict: dict) -> list[Tensor] | None:
    """The ``rpn.anchor_generator.cell_anchors.{i}`` buffers a maskrcnn-benchmark checkpoint carries, in level
    order, or None when it has none (``module.`` prefixes ignored)."""
    found: dict[int, Tensor] = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(_CELL_ANCHOR_KEY) and key[len(_CELL_ANCHOR_KEY):].isdigit():
            found[int(key[len(_CELL_ANCHOR_KEY):])] = value
    if not found:
        return None
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"checkpoint cell anchors are not numbered 0..n-1: levels {sorted(found)}")
    return [found[i].detach().float().cpu() for i in range(len(found))]


def apply_upstream_conventions(model: MaskRCNN, cell_anchors: Sequence[Tensor] | None = None,
                               post_nms_per_batch: bool = True) -> MaskRCNN:
    """Switch ``model`` (a ``SEG.model.build_maskrcnn`` Mask R-CNN) to maskrcnn-benchmark's conventions, in place.

    The transform, RPN and ROI heads are rebuilt around the *same* head modules, so parameters (and optimizer
    references to them) and state-dict keys are unchanged. ``cell_anchors``: the checkpoint's own base anchors
    (see ``cell_anchors_from_state_dict``); default: computed with ``legacy_cell_anchors``. Idempotent.
    Returns ``model``.
    """
    if box_convention(model) == "upstream":  # already switched: only new anchors / batch rule to install
        if cell_anchors is not None:
            model.rpn.anchor_generator = UpstreamAnchorGenerator(cell_anchors=cell_anchors)
        model.rpn.post_nms_per_batch = post_nms_per_batch
        return model
    t = model.transform
    transform = UpstreamTransform(t.min_size, t.max_size, list(t.image_mean), list(t.image_std),
                                  size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    transform.train(t.training)
    anchors = UpstreamAnchorGenerator(cell_anchors=cell_anchors)
    rpn = UpstreamRPN(model.rpn, anchors, post_nms_per_batch=post_nms_per_batch)
    if rpn.head.cls_logits.out_channels != anchors.num_anchors_per_location()[0]:
        raise ValueError("the RPN head predicts a different number of anchors per location than upstream's 3")
    roi_heads = UpstreamRoIHeads(model.roi_heads)
    rpn.train(model.rpn.training)
    roi_heads.train(model.roi_heads.training)
    model.transform, model.rpn, model.roi_heads = transform, rpn, roi_heads
    model.box_convention = "upstream"
    return model


def box_convention(model: nn.Module) -> str:
    """"upstream" (inclusive pixel boxes: width = x2 - x1 + 1) for a model switched by
    ``apply_upstream_conventions``, else "torchvision" (width = x2 - x1). Looks through DDP's ``.module`` and
    ``torch.compile``'s ``._orig_mod``."""
    for attr in ("module", "_orig_mod", "module"):
        model = getattr(model, attr, model)
    return getattr(model, "box_convention", "torchvision")
