"""SSD300 default boxes, ground-truth matching, box encoding/decoding and NMS post-processing.

Follows NVIDIA DeepLearningExamples ``PyTorch/Detection/SSD`` (``ssd/utils.py``: ``dboxes300_coco``,
``Encoder``) so that released upstream checkpoints decode identically, but uses ``torchvision.ops``
(``box_iou``, ``nms``, ``box_convert``) instead of custom CUDA kernels.

Conventions:
* boxes are **normalised** to [0, 1] image coordinates;
* "ltrb" = (left, top, right, bottom), "xywh" here = (centre x, centre y, width, height);
* the 8732 default boxes are ordered feature map by feature map, and within a map by
  (default-box shape, row, column) — the same order as ``SSD300`` flattens its head outputs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou, nms

__all__ = ["DefaultBoxes", "dboxes300_coco", "BoxCoder", "Detections"]


class DefaultBoxes:
    """Anchor ("default") boxes of an SSD model.

    Args:
        fig_size: input image side in pixels (300 for SSD300).
        feat_size: side of each square feature map, e.g. ``[38, 19, 10, 5, 3, 1]``.
        steps: stride in pixels of each feature map (``fig_size / step`` cells per side).
        scales: ``len(feat_size) + 1`` box scales in pixels; map k uses ``scales[k]`` and
            ``sqrt(scales[k] * scales[k+1])`` for its two square boxes.
        aspect_ratios: per map, extra ratios ``a``; each adds boxes ``(s·√a, s/√a)`` and ``(s/√a, s·√a)``.
        scale_xy, scale_wh: variances of the box encoding (0.1 and 0.2 in SSD).

    Attributes:
        xywh: ``(N, 4)`` float32 default boxes (centre form), clamped to [0, 1].
        ltrb: ``(N, 4)`` the same boxes as corners.
    """

    def __init__(self, fig_size: int, feat_size: list[int], steps: list[int], scales: list[int],
                 aspect_ratios: list[list[int]], scale_xy: float = 0.1, scale_wh: float = 0.2):
        self.fig_size = fig_size
        self.feat_size = list(feat_size)
        self.scale_xy = scale_xy
        self.scale_wh = scale_wh
        boxes = []
        self.num_defaults = []
        for idx, sfeat in enumerate(self.feat_size):
            fk = fig_size / steps[idx]
            sk1 = scales[idx] / fig_size
            sk2 = scales[idx + 1] / fig_size
            sk3 = math.sqrt(sk1 * sk2)
            sizes = [(sk1, sk1), (sk3, sk3)]
            for alpha in aspect_ratios[idx]:
                w, h = sk1 * math.sqrt(alpha), sk1 / math.sqrt(alpha)
                sizes += [(w, h), (h, w)]
            self.num_defaults.append(len(sizes))
            for w, h in sizes:
                for i, j in itertools.product(range(sfeat), repeat=2):
                    boxes.append(((j + 0.5) / fk, (i + 0.5) / fk, w, h))
        self.xywh = torch.tensor(boxes, dtype=torch.float32).clamp_(0, 1)
        self.ltrb = box_convert(self.xywh, "cxcywh", "xyxy")

    def __len__(self) -> int:
        return self.xywh.shape[0]


def dboxes300_coco() -> DefaultBoxes:
    """The 8732 default boxes of SSD300 on COCO (6 maps: 38, 19, 10, 5, 3, 1)."""
    return DefaultBoxes(300, [38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300],
                        [21, 45, 99, 153, 207, 261, 315], [[2], [2, 3], [2, 3], [2, 3], [2], [2]])


@dataclass
class Detections:
    """Post-processed detections of one image: ``boxes`` ``(K, 4)`` normalised ltrb, ``labels`` ``(K,)``
    contiguous class labels (1..C-1), ``scores`` ``(K,)``; sorted by decreasing score."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


class BoxCoder:
    """Matches ground truth to default boxes and converts between boxes and regression offsets.

    Offsets (SSD paper eq. 2, with NVIDIA's variances): for a default box d and box g (centre form),
    ``t_xy = (g_xy - d_xy) / (scale_xy · d_wh)`` and ``t_wh = log(g_wh / d_wh) / scale_wh``.
    """

    def __init__(self, dboxes: DefaultBoxes, iou_threshold: float = 0.5):
        self.dboxes = dboxes
        self.iou_threshold = iou_threshold

    def match(self, boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Assign ground truth to default boxes (NVIDIA ``Encoder.encode``).

        Each default box takes the ground truth of highest IoU if that IoU > ``iou_threshold``; every
        ground-truth box additionally claims its best default box, so no object goes unmatched.

        Args:
            boxes: ``(G, 4)`` ground-truth boxes, normalised ltrb. ``G`` may be 0.
            labels: ``(G,)`` int64 contiguous labels in 1..C-1 (0 is background).
        Returns:
            ``matched_ltrb`` ``(N, 4)`` (the default box itself where unmatched) and ``matched_labels``
            ``(N,)`` int64, 0 = background.
        """
        n = len(self.dboxes)
        if boxes.numel() == 0:
            return self.dboxes.ltrb.clone(), torch.zeros(n, dtype=torch.long)
        ious = box_iou(boxes, self.dboxes.ltrb)  # (G, N)
        best_gt_iou, best_gt_idx = ious.max(dim=0)  # per default box
        best_dbox_idx = ious.argmax(dim=1)  # per ground truth
        # force each ground truth onto its best default box (2.0 > any IoU keeps it above threshold)
        best_gt_iou.index_fill_(0, best_dbox_idx, 2.0)
        best_gt_idx[best_dbox_idx] = torch.arange(boxes.shape[0])
        positive = best_gt_iou > self.iou_threshold
        matched_labels = torch.zeros(n, dtype=torch.long)
        matched_labels[positive] = labels[best_gt_idx[positive]].long()
        matched_boxes = self.dboxes.ltrb.clone()
        matched_boxes[positive] = boxes[best_gt_idx[positive]].float()
        return matched_boxes, matched_labels

    def encode(self, boxes_ltrb: torch.Tensor) -> torch.Tensor:
        """``(..., N, 4)`` normalised ltrb boxes (one per default box) → ``(..., N, 4)`` regression offsets."""
        d = self.dboxes.xywh.to(boxes_ltrb.device)
        g = box_convert(boxes_ltrb, "xyxy", "cxcywh")
        # tiny boxes would give log(0); clamp to a width far below one pixel at 300 px
        gwh = g[..., 2:].clamp(min=1e-6)
        txy = (g[..., :2] - d[:, :2]) / (self.dboxes.scale_xy * d[:, 2:])
        twh = torch.log(gwh / d[:, 2:]) / self.dboxes.scale_wh
        return torch.cat([txy, twh], dim=-1)

    def decode(self, offsets: torch.Tensor) -> torch.Tensor:
        """``(..., N, 4)`` regression offsets → ``(..., N, 4)`` normalised ltrb boxes (inverse of ``encode``)."""
        d = self.dboxes.xywh.to(offsets.device, offsets.dtype)
        xy = offsets[..., :2] * self.dboxes.scale_xy * d[:, 2:] + d[:, :2]
        wh = torch.exp(offsets[..., 2:] * self.dboxes.scale_wh) * d[:, 2:]
        return box_convert(torch.cat([xy, wh], dim=-1), "cxcywh", "xyxy")

    def encode_target(self, boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training target of one image: ``(N, 4)`` offsets and ``(N,)`` labels."""
        matched_boxes, matched_labels = self.match(boxes, labels)
        return self.encode(matched_boxes), matched_labels

    @torch.no_grad()
    def postprocess(self, locs: torch.Tensor, confs: torch.Tensor, score_threshold: float = 0.05,
                    nms_threshold: float = 0.5, max_per_class: int = 200, max_output: int = 200,
                    clip: bool = False) -> list[Detections]:
        """Decode a batch of head outputs into detections (NVIDIA ``Encoder.decode_batch``).

        Args:
            locs: ``(B, 4, N)`` regression offsets as produced by ``SSD300``.
            confs: ``(B, C, N)`` class logits (class 0 = background).
            score_threshold: drop (box, class) pairs with softmax score ≤ this.
            nms_threshold: IoU threshold of the per-class NMS; a candidate whose IoU with a kept box is
                ≥ this is suppressed (NVIDIA keeps only ``iou < criteria``).
            max_per_class: keep at most this many candidates per class before NMS.
            max_output: keep the top ``max_output`` detections per image after NMS (200 in SSD).
            clip: clamp decoded boxes to the image. NVIDIA does not, so boxes reaching past the border are
                scored as predicted; off by default.
        """
        boxes = self.decode(locs.float().permute(0, 2, 1))  # (B, N, 4)
        if clip:
            boxes = boxes.clamp(0, 1)
        scores = torch.softmax(confs.float(), dim=1)  # (B, C, N)
        return [self.select(boxes[b], scores[b], score_threshold, nms_threshold, max_per_class, max_output)
                for b in range(boxes.shape[0])]

    @staticmethod
    def select(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float = 0.05, nms_threshold: float = 0.5,
               max_per_class: int = 200, max_output: int = 200) -> Detections:
        """Detections of one image from decoded ``boxes`` ``(N, 4)`` and class probabilities ``scores`` ``(C, N)``
        (NVIDIA ``Encoder.decode_single``): per class c >= 1, the ``max_per_class`` best scores > threshold, greedy
        NMS that drops IoU >= ``nms_threshold``, then the ``max_output`` best over all classes."""
        # torchvision's NMS suppresses IoU > t; the largest float32 below t makes that IoU >= t
        nms_below = float(np.nextafter(np.float32(nms_threshold), np.float32(-np.inf)))
        cand_boxes, cand_scores, cand_labels = [], [], []
        for c in range(1, scores.shape[0]):
            sc = scores[c]
            keep = torch.nonzero(sc > score_threshold).squeeze(1)
            if keep.numel() == 0:
                continue
            sc = sc[keep]
            if keep.numel() > max_per_class:
                sc, order = sc.topk(max_per_class)
                keep = keep[order]
            # one class at a time, on the class's own boxes: exact IoUs (batched_nms would offset the
            # normalised boxes by the class index and lose float precision)
            kept = nms(boxes[keep], sc, nms_below)
            cand_boxes.append(boxes[keep[kept]])
            cand_scores.append(sc[kept])
            cand_labels.append(torch.full_like(kept, c))
        if not cand_boxes:
            return Detections(boxes.new_zeros((0, 4)), torch.zeros(0, dtype=torch.long), boxes.new_zeros(0))
        cb, cs, cl = torch.cat(cand_boxes), torch.cat(cand_scores), torch.cat(cand_labels)
        top = cs.argsort(descending=True, stable=True)[:max_output]
        return Detections(cb[top], cl[top], cs[top])
