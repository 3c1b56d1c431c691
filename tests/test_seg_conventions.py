"""SEG: maskrcnn-benchmark conventions for released checkpoints (``SEG.conventions``).

Every expected number here is derived from maskrcnn-benchmark's formulas written out in this file (or by hand in the
comments), never from ``SEG.conventions`` itself: anchors per FPN level, "+1" box coding, "+1" IoU/NMS, FPN level
mapping, resize sizes, proposal selection per batch vs per image, detection post-processing and mask pasting.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

import torch.nn.functional as F  # noqa: E402
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.models.detection.roi_heads import paste_masks_in_image  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

from SEG.conventions import (ANCHOR_SIZES, ANCHOR_STRIDES, BBOX_XFORM_CLIP, LegacyBoxCoder,  # noqa: E402
                             UpstreamAnchorGenerator, UpstreamLevelMapper, UpstreamTransform,
                             apply_upstream_conventions, legacy_box_iou, legacy_cell_anchors, legacy_nms,
                             upstream_fastrcnn_loss, upstream_resize_shape)
from SEG.model import (UPSTREAM_PIXEL_MEAN, SamplingConfig, build_maskrcnn, load_model_weights,  # noqa: E402
                       to_upstream_names)


# ------------------------------------------------------------------------------ maskrcnn-benchmark, written out
def mb_generate_anchors(stride: int, size: int, ratios=(0.5, 1.0, 2.0)) -> np.ndarray:
    """``generate_anchors(stride, (size,), ratios)`` step by step: _ratio_enum of the [0, stride-1] window, then
    _scale_enum of each, with _whctrs/_mkanchors' inclusive widths."""
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mkanchors(ws, hs, x, y):
        return np.stack([x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)], axis=1)

    base = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    w, h, x, y = whctrs(base)
    ws = np.round(np.sqrt(w * h / np.array(ratios)))
    hs = np.round(ws * np.array(ratios))
    by_ratio = mkanchors(ws, hs, x, y)
    out = []
    for a in by_ratio:
        w, h, x, y = whctrs(a)
        out.append(mkanchors(np.array([w * size / stride]), np.array([h * size / stride]), x, y)[0])
    return np.stack(out)


def mb_encode(gt: torch.Tensor, anchors: torch.Tensor, weights) -> torch.Tensor:
    wx, wy, ww, wh = weights
    aw, ah = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    gw, gh = gt[:, 2] - gt[:, 0] + 1, gt[:, 3] - gt[:, 1] + 1
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], 1)


def mb_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None] - inter)


def mb_nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> list[int]:
    """The CUDA kernel's rule: walk by decreasing score, drop later boxes whose "+1" IoU is > thresh."""
    order = scores.argsort(descending=True).tolist()
    iou = mb_iou(boxes, boxes)
    keep, dropped = [], set()
    for i in order:
        if i in dropped:
            continue
        keep.append(i)
        dropped |= {j for j in order if iou[i, j] > thresh and j != i}
    return keep


def mb_paste(mask: torch.Tensor, box: torch.Tensor, im_h: int, im_w: int, padding: int = 1) -> torch.Tensor:
    """``Masker`` of maskrcnn-benchmark for one (M, M) probability mask: pad, expand the box by (M+2p)/M, truncate to
    int, resize bilinearly to the inclusive box size, threshold 0.5, paste."""
    m = mask.shape[-1]
    scale = (m + 2 * padding) / m
    padded = torch.zeros(m + 2 * padding, m + 2 * padding)
    padded[padding:-padding, padding:-padding] = mask
    cx, cy = (box[0] + box[2]) * 0.5, (box[1] + box[3]) * 0.5
    hw, hh = (box[2] - box[0]) * 0.5 * scale, (box[3] - box[1]) * 0.5 * scale
    b = torch.stack([cx - hw, cy - hh, cx + hw, cy + hh]).to(torch.int32).tolist()
    w, h = max(b[2] - b[0] + 1, 1), max(b[3] - b[1] + 1, 1)
    resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5
    out = torch.zeros(im_h, im_w, dtype=torch.bool)
    x0, x1, y0, y1 = max(b[0], 0), min(b[2] + 1, im_w), max(b[1], 0), min(b[3] + 1, im_h)
    out[y0:y1, x0:x1] = resized[y0 - b[1]:y1 - b[1], x0 - b[0]:x1 - b[0]]
    return out


# ------------------------------------------------------------------------------ anchors
def test_cell_anchors_per_fpn_level_match_maskrcnn_benchmark():
    for stride, size in zip(ANCHOR_STRIDES, ANCHOR_SIZES):
        expected = torch.from_numpy(mb_generate_anchors(stride, size)).float()
        assert torch.equal(legacy_cell_anchors(stride, size), expected), (stride, size)
    # by hand, stride 4 / size 32: window [0,3]² (centre 1.5, area 16); ratio 0.5 -> w = round(sqrt 32) = 6,
    # h = round(3) = 3; x8 -> 48 x 24 around 1.5 -> [-22, -10, 25, 13]
    assert legacy_cell_anchors(4, 32).tolist() == [[-22, -10, 25, 13], [-14, -14, 17, 17], [-10, -22, 13, 25]]
    # stride 64 / size 512: w = round(90.51) = 91, h = round(45.5) = 46 (half to even), x8 -> 728 x 368 around 31.5
    assert legacy_cell_anchors(64, 512).tolist() == [[-332, -152, 395, 215], [-224, -224, 287, 287],
                                                     [-148, -328, 211, 391]]
    # torchvision centres anchors at 0 with its own rounding: a released checkpoint sees other boxes
    assert not torch.equal(AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0], legacy_cell_anchors(4, 32))


def test_grid_anchors_use_the_fixed_stride_of_each_level():
    gen = UpstreamAnchorGenerator()
    padded = torch.zeros(1, 3, 800, 1088)  # an 800x1066 image padded to a multiple of 32
    sizes = [(200, 272), (100, 136), (50, 68), (25, 34), (13, 17)]
    feats = [torch.zeros(1, 1, h, w) for h, w in sizes]
    (anchors,) = gen(ImageList(padded, [(800, 1066)]), feats)
    assert anchors.dtype == torch.float32 and len(anchors) == 3 * sum(h * w for h, w in sizes)
    start = 3 * sum(h * w for h, w in sizes[:4])
    p6 = anchors[start:].view(13, 17, 3, 4)
    cell = torch.from_numpy(mb_generate_anchors(64, 512)).float()
    # location (row 12, col 16) is shifted by (16 * 64, 12 * 64); torchvision's 800 // 13 = 61 px stride is not
    assert torch.equal(p6[12, 16], cell + torch.tensor([16 * 64, 12 * 64, 16 * 64, 12 * 64]).float())
    assert torch.equal(p6[0, 0], cell)
    # a checkpoint's own cell anchors replace the computed ones
    own = [torch.from_numpy(mb_generate_anchors(s, z)).float() + 1 for s, z in zip(ANCHOR_STRIDES, ANCHOR_SIZES)]
    (shifted,) = UpstreamAnchorGenerator(cell_anchors=own)(ImageList(padded, [(800, 1066)]), feats)
    assert torch.equal(shifted, anchors + 1)
    with pytest.raises(ValueError, match="cell anchors"):
        UpstreamAnchorGenerator(cell_anchors=own[:4])


# ------------------------------------------------------------------------------ box coding, IoU, NMS
def _random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 500
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 280 + 20], dim=1)  # ratios below exp(clip)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_is_the_plus_one_coder(weights):
    anchors, gt = _random_boxes(300, 0), _random_boxes(300, 1)
    coder = LegacyBoxCoder(weights)
    codes = coder.encode_single(gt, anchors)
    torch.testing.assert_close(codes, mb_encode(gt, anchors, weights), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coder.decode_single(codes, anchors), gt, rtol=1e-4, atol=1e-3)
    # zero codes give back the anchor: x2 = cx + w/2 - 1 with w = x2 - x1 + 1 (16-px window [0, 15])
    assert coder.decode_single(torch.zeros(1, 4), torch.tensor([[0.0, 0.0, 15.0, 15.0]])).tolist() == [[0, 0, 15, 15]]
    # dx = wx shifts the centre by one width (16 px); dw is clipped at log(1000/16)
    moved = coder.decode_single(torch.tensor([[weights[0], 0.0, 100.0, 0.0]]), torch.tensor([[0.0, 0.0, 15.0, 15.0]]))
    width = 16 * math.exp(BBOX_XFORM_CLIP)
    assert moved[0].tolist() == pytest.approx([24 - width / 2, 0, 24 + width / 2 - 1, 15], abs=1e-3)
    # torchvision's coder (no +1) disagrees, so the test can tell them apart
    assert not torch.allclose(codes, TorchvisionBoxCoder(weights).encode_single(gt, anchors), atol=1e-4)


def test_iou_and_nms_use_plus_one_areas():
    a, b = _random_boxes(40, 2), _random_boxes(30, 3)
    torch.testing.assert_close(legacy_box_iou(a, b), mb_iou(a, b), rtol=1e-5, atol=1e-6)
    # two 10x10 inclusive boxes [0,9] and [5,14]: 5*10 / (200 - 50) = 1/3 (torchvision: 4*9/(162-36) = 0.2857)
    two = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    assert legacy_box_iou(two[:1], two[1:]).item() == pytest.approx(1 / 3)
    boxes = torch.cat([_random_boxes(60, 4) / 4, _random_boxes(60, 5) / 4])
    scores = torch.rand(120, generator=torch.Generator().manual_seed(6))
    for thresh in (0.3, 0.5, 0.7):
        assert legacy_nms(boxes, scores, thresh).tolist() == mb_nms(boxes, scores, thresh)


# ------------------------------------------------------------------------------ ROI levels, pooling, resize
def test_level_mapper_uses_plus_one_area_and_fixed_scales():
    mapper = UpstreamLevelMapper(2, 5)
    # inclusive width 224 (x2 - x1 = 223): level 4 upstream; torchvision's area (223²) maps it to level 3
    boxes = torch.tensor([[0.0, 0.0, 223.0, 223.0], [0.0, 0.0, 119.0, 119.0], [0, 0, 999.0, 999.0], [0, 0, 5.0, 5.0]])
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))
    expected = torch.floor(4 + torch.log2(s / 224 + 1e-6)).clamp(2, 5).long() - 2
    assert mapper([boxes]).tolist() == expected.tolist() == [2, 1, 3, 0]
    model = apply_upstream_conventions(build_maskrcnn(4, norm="bn", head_norm="none", min_size=64, max_size=64))
    pooler = model.roi_heads.box_roi_pool
    feats = {str(k): torch.randn(1, 2, 64 // 2 ** (k + 2), 64 // 2 ** (k + 2)) for k in range(4)}
    # the last ROI is the 224-px case above: level 4 upstream, level 3 with torchvision's mapper
    rois = torch.tensor([[2.0, 3.0, 40.0, 30.0], [0.0, 0.0, 63.0, 63.0], [0.0, 0.0, 223.0, 223.0]])
    pooled = pooler(feats, [rois], [(64, 64)])
    for i, lvl in enumerate(mapper([rois]).tolist()):
        ref = roi_align(feats[str(lvl)], [rois[i:i + 1]], (7, 7), spatial_scale=1 / 2 ** (lvl + 2),
                        sampling_ratio=2, aligned=False)
        torch.testing.assert_close(pooled[i:i + 1], ref)


@pytest.mark.parametrize("hw, expected", [((480, 640), (800, 1066)), ((640, 480), (1066, 800)),
                                          ((612, 612), (800, 800)), ((640, 360), (1333, 750)),
                                          ((375, 1000), (500, 1333))])
def test_resize_size_is_maskrcnn_benchmark_get_size(hw, expected):
    # (640, 360): 640/360*800 > 1333 -> short side int(round(1333*360/640)) = 750 (torchvision: floor -> 749),
    # long side int(750*640/360) = 1333; (375, 1000): short side int(round(499.9)) = 500, long int(1333.3) = 1333
    assert upstream_resize_shape(*hw, 800, 1333) == expected
    t = UpstreamTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    images, _ = t([torch.rand(3, *hw)])
    assert tuple(images.image_sizes[0]) == expected
    assert all(d % 32 == 0 for d in images.tensors.shape[-2:])


# ------------------------------------------------------------------------------ RPN selection and border anchors
def _tiny_model(**kw):
    torch.manual_seed(0)
    sampling = SamplingConfig(50, 4, 50, 4, 32, 32, 10)
    return build_maskrcnn(4, norm="bn", head_norm="none", min_size=64, max_size=64, sampling=sampling, **kw)


def test_rpn_keeps_the_best_proposals_per_batch_in_training_and_per_image_in_eval():
    rpn = _tiny_model(conventions="upstream").rpn
    # 2 images x 8 disjoint boxes on one level; image 0 scores higher everywhere
    boxes = torch.tensor([[i * 7.0, 0.0, i * 7.0 + 5, 5.0] for i in range(8)])
    proposals = torch.stack([boxes, boxes])
    logits = torch.stack([torch.linspace(5, 4, 8), torch.linspace(3, 2, 8)])
    rpn.train()
    kept, _ = rpn.filter_proposals(proposals, logits, [(64, 64), (64, 64)], [8])
    assert [len(k) for k in kept] == [4, 0]  # the batch's best 4 all come from image 0
    rpn.post_nms_per_batch = False
    kept, _ = rpn.filter_proposals(proposals, logits, [(64, 64), (64, 64)], [8])
    assert [len(k) for k in kept] == [4, 4]
    rpn.eval()
    rpn.post_nms_per_batch = True  # test time is always per image
    kept, scores = rpn.filter_proposals(proposals, logits, [(64, 64), (64, 64)], [8])
    assert [len(k) for k in kept] == [4, 4] and torch.equal(kept[1], boxes[:4])
    # clipped to [0, w-1] x [0, h-1]
    big = torch.tensor([[[-5.0, -5.0, 80.0, 70.0]]])
    kept, _ = rpn.filter_proposals(big, torch.zeros(1, 1), [(60, 50)], [1])
    assert kept[0].tolist() == [[0, 0, 49, 59]]


def test_rpn_ignores_anchors_straddling_the_border_in_training():
    rpn = _tiny_model(conventions="upstream").rpn
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-1.0, 0.0, 10.0, 10.0], [0.0, 0.0, 49.0, 10.0],
                            [0.0, 0.0, 50.0, 10.0], [0.0, 0.0, 10.0, 39.0], [0.0, 0.0, 10.0, 40.0]])
    # maskrcnn-benchmark: x1 >= 0, y1 >= 0, x2 < width, y2 < height (width 50, height 40)
    assert rpn._visible(anchors, (40, 50)).tolist() == [True, False, True, False, True, False]
    rpn.straddle_thresh = -1
    assert rpn._visible(anchors, (40, 50)).all()


def test_rpn_loss_sees_border_anchors_as_ignored(monkeypatch):
    model = _tiny_model(conventions="upstream").train()
    seen = {}
    assign, loss = model.rpn.assign_targets_to_anchors, model.rpn.compute_loss

    def spy_assign(anchors, targets):
        seen["anchors"] = anchors
        return assign(anchors, targets)

    def spy_loss(objectness, deltas, labels, regression_targets):
        seen["labels"] = labels
        return loss(objectness, deltas, labels, regression_targets)

    monkeypatch.setattr(model.rpn, "assign_targets_to_anchors", spy_assign)
    monkeypatch.setattr(model.rpn, "compute_loss", spy_loss)
    target = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2]),
              "masks": torch.ones(1, 60, 50, dtype=torch.uint8)}
    model([torch.rand(3, 60, 50)], [target])
    a, labels = seen["anchors"][0], seen["labels"][0]
    height, width = upstream_resize_shape(60, 50, 64, 64)  # the resized, unpadded image the anchors must fit
    outside = ~((a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] < width) & (a[:, 3] < height))
    assert outside.any() and (~outside).any()
    assert (labels[outside] == -1).all() and (labels[~outside] >= 0).any()


# ------------------------------------------------------------------------------ detections and masks
def test_detection_postprocess_clips_nms_per_class_and_keeps_ties_at_the_cut():
    heads = _tiny_model(conventions="upstream").roi_heads
    heads.detections_per_img = 2
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 50.0, 50.0], [1.0, 1.0, 21.0, 21.0],
                               [40.0, 0.0, 70.0, 20.0]])]
    # class 1: proposals 0 and 2 overlap (IoU 0.82 > 0.5): the lower one goes; class 2: proposals 1 and 3
    logits = torch.full((4, 4), -20.0)
    logits[0, 1], logits[2, 1], logits[1, 2], logits[3, 2] = 3.0, 2.0, 3.0, 3.0
    boxes, scores, labels = heads.postprocess_detections(logits, torch.zeros(4, 16), proposals, [(64, 60)])
    # three detections with equal score survive NMS; the 2nd largest score is the cut, so all three tie and stay
    assert labels[0].tolist() == [1, 2, 2] and len(scores[0]) == 3
    assert boxes[0][2].tolist() == [40, 0, 59, 20]  # x2 clipped to width - 1 = 59


def test_mask_paste_equals_maskrcnn_benchmark_masker():
    g = torch.Generator().manual_seed(7)
    masks = torch.rand(6, 1, 28, 28, generator=g)
    boxes = torch.tensor([[3.2, 4.7, 40.1, 33.3], [0.0, 0.0, 63.0, 47.0], [50.5, 20.2, 70.0, 60.9],
                          [-4.0, -3.0, 10.0, 12.0], [10.0, 10.0, 10.6, 11.2], [20.0, 5.0, 44.4, 47.9]])
    pasted = paste_masks_in_image(masks, boxes, (48, 64), padding=1)[:, 0] > 0.5  # what SEG.evaluate thresholds
    for k in range(len(boxes)):
        assert torch.equal(pasted[k], mb_paste(masks[k, 0], boxes[k], 48, 64)), k


def test_fast_rcnn_box_loss_is_smooth_l1_with_beta_one():
    logits = torch.randn(4, 3)
    deltas = torch.randn(4, 12)
    labels, targets = [torch.tensor([1, 0, 2, 2])], [torch.randn(4, 4)]
    _, box = upstream_fastrcnn_loss(logits, deltas, labels, targets)
    d = deltas.view(4, 3, 4)[[0, 2, 3], [1, 2, 2]] - targets[0][[0, 2, 3]]
    n = d.abs()
    expected = torch.where(n < 1, 0.5 * n ** 2, n - 0.5).sum() / 4
    torch.testing.assert_close(box, expected)


# ------------------------------------------------------------------------------ switching a model
def test_switching_keeps_parameters_and_runs_train_and_eval():
    model = _tiny_model()
    before = {k: v for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    apply_upstream_conventions(model)
    apply_upstream_conventions(model)  # idempotent
    assert list(model.state_dict()) == list(before) and [id(p) for p in model.parameters()] == params
    model.train()
    target = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 60, 50, dtype=torch.uint8)}
    target["masks"][0, 6:41, 4:31] = 1
    losses = model([torch.rand(3, 60, 50)], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 60, 50)])
    assert out["masks"].shape[-2:] == (60, 50) and len(out["boxes"]) <= 10
    # clipped to [0, 52] x [0, 62] in the 63x53 resized frame (upstream get_size), then scaled back to 60x50
    assert (out["boxes"][:, 2] <= 52 * 50 / 53 + 1e-4).all() and (out["boxes"][:, 3] <= 62 * 60 / 63 + 1e-4).all()


def test_released_checkpoint_switches_conventions_and_installs_its_cell_anchors():
    torch.manual_seed(1)
    ours = build_maskrcnn(81, norm="gn", head_norm="gn", stride_in_1x1=True, min_size=64, max_size=64)
    upstream = {"module." + k: v for k, v in to_upstream_names(ours.state_dict()).items()}
    own = [torch.from_numpy(mb_generate_anchors(s, z)).float() for s, z in zip(ANCHOR_STRIDES, ANCHOR_SIZES)]
    own[0] = own[0] + 0.5  # a file whose anchors differ from the formula: its own are used
    for i, a in enumerate(own):
        upstream[f"module.rpn.anchor_generator.cell_anchors.{i}"] = a
    fresh = build_maskrcnn(81, norm="gn", head_norm="gn", stride_in_1x1=True, min_size=64, max_size=64)
    assert load_model_weights(fresh, {"model": upstream, "iteration": 270000}) == "upstream"
    assert fresh.box_convention == "upstream"
    assert all(torch.equal(a, b) for a, b in zip(fresh.rpn.anchor_generator.cell_anchors, own))
    assert fresh.transform.image_mean == pytest.approx(UPSTREAM_PIXEL_MEAN)
    assert type(fresh.rpn.box_coder).__name__ == "LegacyBoxCoder" and fresh.roi_heads.box_coder.weights == (
        10.0, 10.0, 5.0, 5.0)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
