"""Mask R-CNN R-50-FPN with a trainable-norm backbone body, for CHEX on COCO2014.

Built from torchvision parts (no vendored maskrcnn-benchmark). Only ``model.backbone.body`` (the ResNet-50 trunk)
is pruned; the FPN and the heads stay dense, as in the released SEG code (docs/algorithm.md §2). With
``--chex-residual`` the body's residual streams are explored too, and the FPN's lateral 1×1 convs, which read them,
narrow with them (:data:`FPN_LATERALS`, docs/algorithm.md §2.1).

Upstream (zejiangh/Filter-GaP ``SEG/pytorch``, maskrcnn-benchmark) layout that this module can mirror:
- GroupNorm(32) in the body, the FPN, the box head (fc6/fc7) and the mask head (``--norm gn --head-norm gn``);
- stride in the first 1x1 conv of each bottleneck (maskrcnn-benchmark ``STRIDE_IN_1X1: True``);
- images in BGR, 0..255, minus the per-channel pixel mean (std 1). Released checkpoints are converted on load
  (stem conv input channels flipped to RGB) and the model's transform is switched to that pixel convention;
- maskrcnn-benchmark's anchors, "+1" box coding, proposal selection and post-processing: ``conventions="upstream"``
  (``SEG.conventions``), switched on automatically when a released checkpoint is loaded.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from chex_core.checkpoint import state_dict_problems, strip_prefix
from chex_tasks.export import read_compact
from chex_core.compact import apply_width_spec, compact_model
from chex_core.flops import count_macs
from chex_core.groups import resnet_groups

from .conventions import (ANCHOR_SIZES, ANCHOR_STRIDES, apply_upstream_conventions, cell_anchors_from_state_dict,
                          legacy_cell_anchors)

logger = logging.getLogger(__name__)

NORMS = ("gn", "bn", "syncbn")
CONVENTIONS = ("torchvision", "upstream")
GN_GROUPS = 32

# maskrcnn-benchmark's PIXEL_MEAN (BGR, 0..255) rewritten for torchvision's transform, which sees RGB in 0..1:
# (x_rgb01 - mean_rgb/255) / (1/255) == x_bgr255 - mean_bgr after the stem's input channels are flipped.
UPSTREAM_PIXEL_MEAN = [122.7717 / 255.0, 115.9465 / 255.0, 102.9801 / 255.0]
UPSTREAM_PIXEL_STD = [1.0 / 255.0] * 3
TORCHVISION_PIXEL_MEAN = [0.485, 0.456, 0.406]
TORCHVISION_PIXEL_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class SamplingConfig:
    """RPN/ROI sampling sizes. Upstream values are the defaults; the CPU tests shrink them to stay fast."""

    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (maskrcnn-benchmark ``group_norm``: eps 1e-5, affine)."""
    return nn.GroupNorm(GN_GROUPS, num_channels, eps=1e-5, affine=True)


def body_norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """Norm factory for the ResNet body. Never FrozenBatchNorm: CHEX ranks channels by the norm's trainable γ."""
    if norm == "gn":
        return group_norm
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "syncbn":
        # SyncBatchNorm is converted after construction (it only runs under a CUDA process group); see build_maskrcnn.
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


class TwoMLPHeadGN(nn.Module):
    """Box-head feature extractor fc6 -> GN -> ReLU -> fc7 -> GN -> ReLU (maskrcnn-benchmark FPN2MLP with USE_GN).

    Input: pooled ROI features (R, C, 7, 7); output (R, representation_size). Names ``fc6.0`` (Linear, no bias),
    ``fc6.1`` (GroupNorm) match the upstream ``make_fc(use_gn=True)`` Sequential so released weights map 1:1.
    """

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Sequential(
            nn.Linear(in_channels, representation_size, bias=False), group_norm(representation_size)
        )
        self.fc7 = nn.Sequential(
            nn.Linear(representation_size, representation_size, bias=False), group_norm(representation_size)
        )
        for seq in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(seq[0].weight, a=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=1)
        x = torch.relu(self.fc6(x))
        return torch.relu(self.fc7(x))


def set_stride_in_1x1(body: nn.Module) -> None:
    """Move each strided bottleneck's stride from conv2 (torchvision, "v1.5") to conv1 (maskrcnn-benchmark default).

    Weight shapes are unchanged, so the same parameters load either way; the function (and the FLOPs) differ.
    """
    for name, module in body.named_modules():
        if re.fullmatch(r"layer\d+\.\d+", name) and module.conv2.stride != (1, 1):
            module.conv1.stride, module.conv2.stride = module.conv2.stride, (1, 1)


def build_maskrcnn(
    num_classes: int,
    norm: str = "gn",
    head_norm: str = "gn",
    stride_in_1x1: bool = True,
    min_size: int = 800,
    max_size: int = 1333,
    sampling: SamplingConfig = SamplingConfig(),
    conventions: str = "torchvision",
    post_nms_per_batch: bool = True,
) -> MaskRCNN:
    """Mask R-CNN R-50-FPN, random init (weights=None), all five body stages trainable.

    ``num_classes`` includes background (COCO: 81). ``norm`` is the body's norm (gn | bn | syncbn; syncbn is
    converted only when CUDA is available, otherwise plain BN with a warning). ``head_norm`` (gn | none) puts GN in
    the FPN, box head and mask head, as the upstream GN config does. ``conventions="upstream"`` uses
    maskrcnn-benchmark's arithmetic and pixel convention (``SEG.conventions``); the parameters are the same.
    ``post_nms_per_batch`` (upstream conventions only): in training, keep the best RPN proposals of the whole batch
    (maskrcnn-benchmark) rather than of each image.
    """
    if conventions not in CONVENTIONS:
        raise ValueError(f"unknown conventions {conventions!r}; choose one of {CONVENTIONS}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if head_norm not in ("gn", "none"):
        raise ValueError(f"unknown head norm {head_norm!r}; choose gn or none")
    trunk = resnet50(weights=None, norm_layer=body_norm_layer(norm))
    if stride_in_1x1:
        set_stride_in_1x1(trunk)
    head_norm_layer = group_norm if head_norm == "gn" else None
    backbone = _resnet_fpn_extractor(trunk, trainable_layers=5, norm_layer=head_norm_layer)
    box_head = TwoMLPHeadGN(backbone.out_channels * 7 * 7, 1024) if head_norm == "gn" else None
    mask_head = MaskRCNNHeads(backbone.out_channels, [256, 256, 256, 256], 1, norm_layer=head_norm_layer)
    model = MaskRCNN(
        backbone,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        box_head=box_head,
        mask_head=mask_head,
        rpn_pre_nms_top_n_train=sampling.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=sampling.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=sampling.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=sampling.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=sampling.rpn_batch_size_per_image,
        box_batch_size_per_image=sampling.box_batch_size_per_image,
        box_detections_per_img=sampling.box_detections_per_img,
    )
    if norm == "syncbn":
        if torch.cuda.is_available():
            model.backbone.body = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone.body)
        else:
            warnings.warn("--norm syncbn needs CUDA; using plain BatchNorm2d on CPU", stacklevel=2)
    if conventions == "upstream":
        apply_upstream_conventions(model, post_nms_per_batch=post_nms_per_batch)
        set_pixel_convention(model, upstream=True)
    return model


def set_pixel_convention(model: MaskRCNN, upstream: bool) -> None:
    """Select the input normalisation: torchvision ImageNet mean/std, or upstream BGR255 (see module docstring)."""
    model.transform.image_mean = list(UPSTREAM_PIXEL_MEAN if upstream else TORCHVISION_PIXEL_MEAN)
    model.transform.image_std = list(UPSTREAM_PIXEL_STD if upstream else TORCHVISION_PIXEL_STD)


#: the FPN's lateral 1×1 convs read the body's C2..C5 (stages layer1..layer4); with residual groups they narrow with
#: their stage's residual stream (names relative to the Mask R-CNN)
FPN_LATERALS = {f"layer{i + 1}": (f"backbone.fpn.inner_blocks.{i}.0",) for i in range(4)}


def channel_groups(model: MaskRCNN, include_downsample: bool = False, residual: bool = False):
    """CHEX channel groups of the backbone body. Group names are relative to ``model.backbone.body`` (as in explorer
    checkpoints and ``body_spec``), module names to the whole ``model``: the explorer and compact export are given the
    whole Mask R-CNN, so a residual group (``--chex-residual``) can reach the FPN laterals that read its stage.

    ``include_downsample`` also masks the shortcut convs (the released SEG code does; ``--chex-prune-downsample``).
    """
    return resnet_groups(model, include_downsample, residual=residual, within="backbone.body",
                         stage_consumers=FPN_LATERALS if residual else None)


def body_macs(model: MaskRCNN, zero_aware: bool = True, size: int = 224) -> int:
    """Backbone-body multiply-accumulates at ``size``x``size`` (paper convention: body only, 224x224, batch 1).

    The body returns an OrderedDict of C2..C5; ``count_macs`` only hooks convs, so the dict output is fine. With
    ``zero_aware`` each conv counts in proportion to its non-zero weights, which credits masked channels.
    """
    return int(count_macs(model.backbone.body, (3, size, size), zero_aware=zero_aware))


def dense_body_macs(stride_in_1x1: bool, size: int = 224) -> int:
    """MACs of an unpruned ResNet-50 body with the same stride placement (the FLOPs-reduction baseline)."""
    trunk = resnet50(weights=None)
    if stride_in_1x1:
        set_stride_in_1x1(trunk)
    trunk.fc = nn.Identity()  # the body has no fc; keep the reference to the same convs
    return int(count_macs(trunk, (3, size, size), zero_aware=False))


def compact_maskrcnn(model: MaskRCNN, groups, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, int]]:
    """A physically sliced copy of the masked Mask R-CNN (its body, and with residual groups the FPN laterals) and
    its width spec. Only for BN bodies.

    A GroupNorm body cannot be compacted exactly: GN statistics are taken over groups that include the zeroed
    channels, and pruned widths are generally not divisible by 32 groups (docs/algorithm.md §7.1). So a GN model
    stays dense with zeros (which is also what upstream released) and this raises ``ValueError``.

    Args:
        model: the masked model; left untouched.
        groups: its channel groups (:func:`channel_groups`, as the explorer was built).
        masks: group name → keep vector (``ChannelExplorer.masks``).
    """
    if any(isinstance(m, nn.GroupNorm) for m in model.backbone.body.modules()):
        raise ValueError(
            "compact export is not possible for a GroupNorm body (GN statistics include the pruned channels and "
            "widths break the 32-group divisibility); train with --norm bn to export a compact model"
        )
    return compact_model(model, groups, masks)


# ---------------------------------------------------------------------------------------------------------------
# Released upstream checkpoints (maskrcnn-benchmark parameter names) -> this model's names.

_UPSTREAM_RULES: list[tuple[str, str]] = [
    (r"backbone\.body\.stem\.conv1\.(.+)", r"backbone.body.conv1.\1"),
    (r"backbone\.body\.stem\.(?:bn1|gn1)\.(.+)", r"backbone.body.bn1.\1"),
    (r"backbone\.body\.(layer\d\.\d+)\.conv(\d)\.(.+)", r"backbone.body.\1.conv\2.\3"),
    (r"backbone\.body\.(layer\d\.\d+)\.(?:bn|gn)(\d)\.(.+)", r"backbone.body.\1.bn\2.\3"),
    (r"backbone\.body\.(layer\d\.\d+)\.downsample\.([01])\.(.+)", r"backbone.body.\1.downsample.\2.\3"),
    # FPN: fpn_inner{1..4} / fpn_layer{1..4}; GN variants are Sequential(conv, gn) -> ".0"/".1"
    (r"backbone\.fpn\.fpn_inner(\d)\.([01])\.(.+)", "FPN:inner_blocks:\\1:\\2:\\3"),
    (r"backbone\.fpn\.fpn_inner(\d)\.(weight|bias)", "FPN:inner_blocks:\\1:0:\\2"),
    (r"backbone\.fpn\.fpn_layer(\d)\.([01])\.(.+)", "FPN:layer_blocks:\\1:\\2:\\3"),
    (r"backbone\.fpn\.fpn_layer(\d)\.(weight|bias)", "FPN:layer_blocks:\\1:0:\\2"),
    (r"rpn\.head\.conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
    (r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", r"rpn.head.\1.\2"),
    (r"roi_heads\.box\.feature_extractor\.(fc[67])\.([01])\.(.+)", r"roi_heads.box_head.\1.\2.\3"),
    (r"roi_heads\.box\.feature_extractor\.(fc[67])\.(weight|bias)", r"roi_heads.box_head.\1.\2"),
    (r"roi_heads\.box\.predictor\.(cls_score|bbox_pred)\.(.+)", r"roi_heads.box_predictor.\1.\2"),
    (r"roi_heads\.mask\.feature_extractor\.mask_fcn(\d)\.([01])\.(.+)", "MASK:\\1:\\2:\\3"),
    (r"roi_heads\.mask\.feature_extractor\.mask_fcn(\d)\.(weight|bias)", "MASK:\\1:0:\\2"),
    (r"roi_heads\.mask\.predictor\.(conv5_mask|mask_fcn_logits)\.(.+)", r"roi_heads.mask_predictor.\1.\2"),
]
_UPSTREAM_SKIP = re.compile(r".*(?:num_batches_tracked|anchor_generator\..*|cell_anchors.*)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameters cannot be mapped onto, or do not fit, the model that was built."""


def _rename_upstream_key(key: str) -> str | None:
    for pattern, repl in _UPSTREAM_RULES:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        name = match.expand(repl)
        if name.startswith("FPN:"):  # 1-based upstream index -> 0-based torchvision index
            _, blocks, idx, sub, leaf = name.split(":")
            return f"backbone.fpn.{blocks}.{int(idx) - 1}.{sub}.{leaf}"
        if name.startswith("MASK:"):
            _, idx, sub, leaf = name.split(":")
            return f"roi_heads.mask_head.{int(idx) - 1}.{sub}.{leaf}"
        return name
    return None


def is_upstream_state_dict(state_dict: dict) -> bool:
    """True when the keys use maskrcnn-benchmark names (``backbone.body.stem.*``)."""
    return any(k.split("module.", 1)[-1].startswith("backbone.body.stem.") for k in state_dict)


def convert_upstream_state_dict(state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a maskrcnn-benchmark state dict to this model's names and convert the stem to RGB input.

    Raises ``CheckpointMismatchError`` naming (up to 10 of) the keys that have no counterpart, the model keys that
    the checkpoint leaves empty, and shape mismatches. Buffers absent upstream (BN ``num_batches_tracked``) are
    taken from the model.
    """
    own = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if _UPSTREAM_SKIP.fullmatch(key):
            continue
        new = _rename_upstream_key(key)
        if new is None or new not in own:
            unmapped.append(key if new is None else f"{key} -> {new}")
            continue
        converted[new] = value
    problems = state_dict_problems(own, converted)
    if unmapped:
        problems.insert(0, f"{len(unmapped)} unmapped checkpoint keys: {', '.join(unmapped[:10])}")
    if problems:
        raise CheckpointMismatchError(
            "upstream checkpoint does not fit this model (build it with the upstream layout: --norm gn "
            "--head-norm gn --stride-in-1x1, COCO 81 classes); " + "; ".join(problems)
        )
    for key in own:
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = own[key]
    # maskrcnn-benchmark feeds BGR images: flip the stem's input channels so it accepts RGB.
    stem = "backbone.body.conv1.weight"
    converted[stem] = converted[stem].flip(1)
    return converted


def to_upstream_names(state_dict: dict[str, torch.Tensor]) -> OrderedDict:
    """Inverse of the renaming (stem channels flipped back to BGR). Used to write upstream-format files in tests."""
    inverse: OrderedDict = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = key
        name = re.sub(r"^backbone\.body\.conv1\.", "backbone.body.stem.conv1.", name)
        name = re.sub(r"^backbone\.body\.bn1\.", "backbone.body.stem.bn1.", name)
        fpn = re.fullmatch(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.([01])\.(.+)", name)
        if fpn:
            name = f"backbone.fpn.fpn_{fpn[1]}{int(fpn[2]) + 1}.{fpn[3]}.{fpn[4]}"
        name = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", name)
        name = re.sub(r"^roi_heads\.box_head\.", "roi_heads.box.feature_extractor.", name)
        name = re.sub(r"^roi_heads\.box_predictor\.", "roi_heads.box.predictor.", name)
        mask = re.fullmatch(r"roi_heads\.mask_head\.(\d)\.([01])\.(.+)", name)
        if mask:
            name = f"roi_heads.mask.feature_extractor.mask_fcn{int(mask[1]) + 1}.{mask[2]}.{mask[3]}"
        name = re.sub(r"^roi_heads\.mask_predictor\.", "roi_heads.mask.predictor.", name)
        if name == "backbone.body.stem.conv1.weight":
            value = value.flip(1)
        inverse[name] = value
    return inverse


def load_model_weights(model: MaskRCNN, checkpoint: dict, strict: bool = True) -> str:
    """Load weights from one of our checkpoints (``model`` key) or a released upstream one (``model`` or bare).

    Returns ``"upstream"`` or ``"native"``. An upstream file switches the model to upstream's conventions
    (``SEG.conventions``: anchors, "+1" box coding, proposal/detection selection, pixel convention) and installs the
    file's own ``cell_anchors`` when it has them, so it is evaluated or fine-tuned with the arithmetic it was
    trained with. A compact checkpoint (any layout ``chex_tasks.export.read_compact`` reads) rebuilds the body (and
    the FPN laterals of narrowed residual streams) to its widths first.
    Raises ``CheckpointMismatchError`` with the offending names on any mismatch.
    """
    state = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError("checkpoint holds no model state dict (expected a 'model' entry of tensors)")
    if is_upstream_state_dict(state):
        model.load_state_dict(convert_upstream_state_dict(state, model), strict=True)
        _switch_to_upstream(model, state)
        return "upstream"
    compact = read_compact(checkpoint)
    if compact is not None:
        state = compact.state_dict
        # the spec names body groups (residual streams too after --chex-residual); the groups say which layers,
        # the FPN laterals included, each name narrows
        apply_width_spec(model, compact.width_spec, groups=channel_groups(model, residual=True))
    state = strip_prefix(state)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # torch lists every key; keep the first lines so the message stays readable
        lines = str(err).splitlines()
        raise CheckpointMismatchError(
            "checkpoint does not fit the model built from these flags (check --norm/--head-norm/--stride-in-1x1 "
            "and the dataset's class count): " + " ".join(line.strip() for line in lines[1:4])[:800]
        ) from None
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.warning("non-strict load: missing %s, unexpected %s", result.missing_keys[:5],
                       result.unexpected_keys[:5])
    return "native"


def _switch_to_upstream(model: MaskRCNN, state: dict) -> None:
    """Upstream conventions + pixel convention, with the checkpoint's cell anchors where it stores them."""
    try:
        anchors = cell_anchors_from_state_dict(state)
        # a model built in upstream mode keeps its per-batch / per-image proposal rule (--rpn-post-nms-per-batch)
        apply_upstream_conventions(model, cell_anchors=anchors,
                                   post_nms_per_batch=getattr(model.rpn, "post_nms_per_batch", True))
    except ValueError as err:
        raise CheckpointMismatchError(f"upstream checkpoint anchors: {err}") from None
    if anchors is not None:
        computed = [legacy_cell_anchors(st, sz) for st, sz in zip(ANCHOR_STRIDES, ANCHOR_SIZES)]
        if any(not torch.equal(a, c) for a, c in zip(anchors, computed)):
            logger.warning("the checkpoint's cell anchors differ from maskrcnn-benchmark's formula; using the "
                           "checkpoint's")
    set_pixel_convention(model, upstream=True)
