"""SSD300 with a torchvision ResNet backbone (NVIDIA DeepLearningExamples ``ssd/model.py`` layout).

* ``SSD300.backbone``: torchvision ResNet (``weights=None``) truncated after ``layer3``, with layer3's
  stride set to 1 so its output stays at 38×38 for a 300×300 input. It keeps torchvision's module names
  (``conv1``, ``bn1``, ``layer1``…``layer3``), so ``chex_core.resnet_groups(model.backbone)`` finds its
  Bottlenecks and torchvision/CLS ResNet state dicts load into it directly. CHEX prunes only this part
  (:func:`channel_groups`); with ``--chex-residual`` its residual stream too, and the layers reading layer3's
  output (:data:`HEAD_CONSUMERS`) narrow with it.
* ``SSD300.additional_blocks``: five extra blocks giving the 19, 10, 5, 3, 1 feature maps.
* ``SSD300.loc`` / ``SSD300.conf``: 3×3 heads; outputs flattened to ``(B, 4, 8732)`` / ``(B, C, 8732)``.
* ``MultiBoxLoss``: smooth-L1 localisation + cross-entropy with 3:1 hard negative mining.

Upstream (NVIDIA / CHEX ``DET``) checkpoints keep the backbone under
``feature_extractor.feature_extractor.{0,1,4,5,6}``; :func:`map_upstream_state_dict` renames them.

Backbone initialisation (:func:`resolve_backbone_init`): upstream builds ``resnet50(pretrained=not backbone_path)``,
i.e. torchvision's ImageNet weights (``IMAGENET1K_V1``) unless a local file is given. The same weights come here
through torchvision's weights API (a file already in the torch hub cache is used as is); random init only when
asked for; when the weights cannot be had, one error line says how to pass a local file.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from chex_core import ChannelGroup, resnet_groups
from chex_core.checkpoint import CheckpointError, load_checkpoint, state_dict_problems

__all__ = ["BACKBONES", "HEAD_CONSUMERS", "ResNetBackbone", "SSD300", "MultiBoxLoss", "channel_groups",
           "map_upstream_state_dict", "load_pretrained_backbone", "load_state_dict_checked", "StateDictMismatch",
           "BackboneInit", "BackboneWeightsError", "resolve_backbone_init", "imagenet_weights_cache_file"]

#: backbone name → channels of layer3's output (the 38×38 feature map)
BACKBONES = {"resnet18": 256, "resnet34": 256, "resnet50": 1024, "resnet101": 1024, "resnet152": 1024}


class StateDictMismatch(ValueError):
    """A checkpoint's tensors do not fit the model (other backbone, other number of classes, …)."""


class ResNetBackbone(nn.Module):
    """torchvision ResNet up to ``layer3``; layer3 has stride 1 (NVIDIA SSD's "conv4_x").

    Input ``(B, 3, 300, 300)`` → output ``(B, C, 38, 38)`` with C = 1024 for ResNet-50.
    """

    def __init__(self, name: str = "resnet50"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
        resnet = getattr(torchvision.models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        block = self.layer3[0]
        # torchvision's v1.5 Bottleneck strides in conv2, BasicBlock in conv1; set every stride of the
        # first block (and its projection shortcut) to 1 so layer3 keeps layer2's 38×38 resolution.
        for conv in (block.conv1, block.conv2, block.downsample[0]):
            conv.stride = (1, 1)
        self.out_channels = BACKBONES[name]
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class SSD300(nn.Module):
    """SSD300 detector. ``forward(images (B,3,300,300))`` → ``(locs (B,4,N), confs (B,num_classes,N))``,
    N = 8732 for the standard default boxes; class 0 is background."""

    def __init__(self, backbone: str = "resnet50", num_classes: int = 81, num_defaults=(4, 6, 6, 6, 4, 4)):
        super().__init__()
        self.backbone = ResNetBackbone(backbone)
        self.num_classes = num_classes
        out_channels = [self.backbone.out_channels, 512, 512, 256, 256, 256]
        mid_channels = [256, 256, 128, 128, 128]
        blocks = []
        for i, (cin, cout, mid) in enumerate(zip(out_channels[:-1], out_channels[1:], mid_channels)):
            # the first three blocks halve the map (38→19→10→5); the last two use unpadded 3×3 (5→3→1)
            stride, padding = (2, 1) if i < 3 else (1, 0)
            blocks.append(nn.Sequential(
                nn.Conv2d(cin, mid, kernel_size=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, kernel_size=3, padding=padding, stride=stride, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
        self.additional_blocks = nn.ModuleList(blocks)
        self.loc = nn.ModuleList(nn.Conv2d(c, nd * 4, 3, padding=1) for nd, c in zip(num_defaults, out_channels))
        self.conf = nn.ModuleList(nn.Conv2d(c, nd * num_classes, 3, padding=1)
                                  for nd, c in zip(num_defaults, out_channels))
        for module in (self.additional_blocks, self.loc, self.conf):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.backbone(images)
        features = [x]
        for block in self.additional_blocks:
            x = block(x)
            features.append(x)
        # (B, 4, -1): box index = (default shape, row, col), matching DefaultBoxes' ordering. reshape, not view:
        # under channels_last (NVIDIA's SSD trains that way) the head outputs are not contiguous in NCHW order
        locs = torch.cat([head(f).reshape(f.shape[0], 4, -1) for head, f in zip(self.loc, features)], dim=2)
        confs = torch.cat([head(f).reshape(f.shape[0], self.num_classes, -1)
                           for head, f in zip(self.conf, features)], dim=2)
        return locs, confs


#: what reads the backbone's output (layer3's 38×38 map) outside the backbone: the first extra block and the first
#: loc/conf heads. With residual groups these narrow with layer3's residual stream (names relative to SSD300).
HEAD_CONSUMERS = {"layer3": ("additional_blocks.0.0", "loc.0", "conf.0")}


def channel_groups(model: SSD300, include_downsample: bool = False, residual: bool = False) -> list[ChannelGroup]:
    """CHEX channel groups of the SSD's backbone. Group names are relative to the backbone (as in explorer
    checkpoints and width specs), module names to the whole ``model``: the explorer, compact export and compact
    training are given the whole SSD, so a residual group can reach the heads that read the backbone's output."""
    return resnet_groups(model, include_downsample, residual=residual, within="backbone",
                         stage_consumers=HEAD_CONSUMERS if residual else None)


class MultiBoxLoss(nn.Module):
    """SSD loss (NVIDIA ``ssd/model.py: Loss``), averaged over images that contain objects.

    Per image with P positive default boxes: ``(Σ_pos smoothL1(loc) + Σ_{pos ∪ hard neg} CE) / P``,
    where the hard negatives are the ``min(3P, N)`` background boxes of largest cross-entropy.
    Images with P = 0 contribute 0. Inputs: ``locs (B,4,N)``, ``confs (B,C,N)``, targets
    ``target_offsets (B,N,4)`` (from ``BoxCoder.encode``) and ``target_labels (B,N)`` int64.
    Returns a dict ``{"loss_box", "loss_cls"}`` of scalars whose sum is the SSD loss.
    """

    def __init__(self, neg_pos_ratio: int = 3):
        super().__init__()
        self.neg_pos_ratio = neg_pos_ratio

    def forward(self, locs, confs, target_offsets, target_labels) -> dict[str, torch.Tensor]:
        locs, confs = locs.float(), confs.float()
        positive = target_labels > 0  # (B, N)
        num_pos = positive.sum(dim=1)  # (B,)
        loc_loss = F.smooth_l1_loss(locs.permute(0, 2, 1), target_offsets, reduction="none").sum(dim=2)
        loc_loss = (loc_loss * positive).sum(dim=1)
        ce = F.cross_entropy(confs, target_labels, reduction="none")  # (B, N)
        with torch.no_grad():
            neg_ce = ce.masked_fill(positive, 0.0)
            rank = neg_ce.argsort(dim=1, descending=True).argsort(dim=1)
            hard_negative = rank < (self.neg_pos_ratio * num_pos).clamp(max=positive.shape[1]).unsqueeze(1)
        cls_loss = (ce * (positive | hard_negative)).sum(dim=1)
        has_objects = (num_pos > 0).float()
        denom = num_pos.float().clamp(min=1e-6)
        return {"loss_box": (loc_loss * has_objects / denom).mean(),
                "loss_cls": (cls_loss * has_objects / denom).mean()}


# upstream SSD keeps the truncated torchvision ResNet as an nn.Sequential of its children:
# 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4 layer1, 5 layer2, 6 layer3
_UPSTREAM_BACKBONE = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}
_UPSTREAM_RE = re.compile(r"^feature_extractor\.feature_extractor\.(\d+)\.(.*)$")


def map_upstream_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an upstream (NVIDIA / CHEX DET) SSD300 state dict into ``SSD300``'s module names.

    Strips ``module.`` / ``_orig_mod.`` prefixes; ``feature_extractor.feature_extractor.{i}.*`` becomes
    ``backbone.{conv1,bn1,layer1,layer2,layer3}.*``; ``additional_blocks``, ``loc`` and ``conf`` keep their
    names. Our own checkpoints pass through unchanged. Raises ``StateDictMismatch`` for keys it cannot map.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        m = _UPSTREAM_RE.match(key)
        if m:
            if m.group(1) not in _UPSTREAM_BACKBONE:
                unknown.append(key)
                continue
            key = f"backbone.{_UPSTREAM_BACKBONE[m.group(1)]}.{m.group(2)}"
        elif not key.startswith(("backbone.", "additional_blocks.", "loc.", "conf.")):
            unknown.append(key)
            continue
        out[key] = value
    if unknown:
        raise StateDictMismatch(f"{len(unknown)} checkpoint keys cannot be mapped onto SSD300, e.g. {unknown[:3]}")
    return out


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` that reports missing/unexpected/mis-shaped keys in one line."""
    problems = state_dict_problems(model.state_dict(), state_dict, optional=())
    if problems:
        raise StateDictMismatch(f"{what} does not fit the model: " + "; ".join(problems)
                                + " (another --backbone or dataset/number of classes?)")
    model.load_state_dict(state_dict, strict=True)


def load_pretrained_backbone(backbone: ResNetBackbone, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load a torchvision or CLS-format ResNet state dict (``module.``-prefixed or under ``state_dict``)
    into ``backbone``; ``layer4`` and ``fc`` are dropped, everything else must match exactly."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    elif "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(("layer4.", "fc.")):
            cleaned[key] = value
    load_state_dict_checked(backbone, cleaned, what)


# ------------------------------------------------------------------------------------------- backbone init
IMAGENET_WEIGHTS = "IMAGENET1K_V1"  # what torchvision's ``pretrained=True`` (upstream's call) meant


class BackboneWeightsError(RuntimeError):
    """The backbone's initial weights cannot be obtained or read; the message is one line for the user."""


@dataclass(frozen=True)
class BackboneInit:
    """Where the backbone's initial weights come from: ``source`` "imagenet" | "file" | "random", the ResNet
    state dict (None for random init) and a description for the log."""

    source: str
    state_dict: dict | None
    description: str

    def apply(self, backbone: "ResNetBackbone") -> None:
        """Load the weights into ``backbone`` (layer4/fc dropped; anything else must fit exactly)."""
        if self.state_dict is not None:
            load_pretrained_backbone(backbone, self.state_dict, self.description)


def imagenet_weights_cache_file(name: str) -> str:
    """Path the torch hub cache uses for torchvision's ImageNet ``name`` weights (present or not)."""
    url = torchvision.models.get_model_weights(name)[IMAGENET_WEIGHTS].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def resolve_backbone_init(name: str, path: str | None = None, random_init: bool = False,
                          download: bool = True) -> BackboneInit:
    """Initial backbone weights as upstream: a local file if ``path``, random if ``random_init``, else torchvision's
    ImageNet weights for ``name`` from the hub cache, downloading them there when ``download`` and not cached.

    Raises ``ValueError`` for contradictory arguments and ``BackboneWeightsError`` (one line naming the remedy:
    ``--backbone-path PATH``) when a file is unreadable or the ImageNet weights cannot be obtained.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    if path and random_init:
        raise ValueError("a backbone weight file and random init exclude each other")
    if random_init:
        return BackboneInit("random", None, f"random init of {name}")
    if path:
        try:
            return BackboneInit("file", load_checkpoint(path), path)
        except (CheckpointError, OSError) as err:
            raise BackboneWeightsError(f"cannot read backbone weights {path}: {str(err).splitlines()[0]}") from None
    weights = torchvision.models.get_model_weights(name)[IMAGENET_WEIGHTS]
    cached = imagenet_weights_cache_file(name)
    if not download and not os.path.isfile(cached):
        raise BackboneWeightsError(_no_imagenet_weights(name, cached, "not in the torch hub cache"))
    try:
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        # network (URLError/HTTPError/ssl are OSErrors), hash mismatch, truncated or unsafe file: same remedy
        raise BackboneWeightsError(_no_imagenet_weights(name, cached, f"{type(err).__name__}: {err}")) from None
    return BackboneInit("imagenet", dict(state), f"torchvision {name} {IMAGENET_WEIGHTS} ({cached})")


def _no_imagenet_weights(name: str, cached: str, reason: str) -> str:
    reason = " ".join(str(reason).split())[:200]
    return (f"cannot obtain torchvision's ImageNet {name} weights ({reason}); put them at {cached}, pass a local "
            "torchvision/CLS ResNet file with --backbone-path PATH, or train from random init with --random-backbone")
