"""Channel groups: which convolution outputs CHEX may prune, and which layers follow them.

A *group* is one set of channels that lives or dies together: the output channels of a producer conv, the matching
entries of the norm layer right after it, and the matching input channels of the consumer conv(s) that read it.
Groups are addressed by module name (``layer3.2.conv1``), never by position, so the same code serves a whole
classifier, an SSD feature extractor and a Mask R-CNN backbone body (which layers, and why: docs/algorithm.md §2).
Every tensor a group's channels live in is listed by :mod:`chex_core.layout`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ChannelGroup", "resnet_groups", "check_norm"]


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable set of channels.

    Attributes:
        name: the group's id; equal to ``producer``.
        producer: module name of the conv whose output channels are pruned (its weight is ``(C, C_in, k, k)``).
        norm: module name of the norm layer after the producer (BatchNorm or GroupNorm); its ``|γ|`` ranks channels
            across layers.
        consumers: module names of the convs whose *input* channels follow this group (empty for a downsample
            shortcut, whose output joins the residual sum).
        size: number of channels ``C`` in the dense model.
        kind: ``"inner"`` (bottleneck conv1/conv2, basic-block conv1) or ``"downsample"``.
    """

    name: str
    producer: str
    norm: str
    consumers: tuple[str, ...]
    size: int
    kind: str = "inner"

    @property
    def producers(self) -> tuple[str, ...]:
        """The convs writing these channels (one today; several for a coupled residual group)."""
        return (self.producer,)

    @property
    def norms(self) -> tuple[str, ...]:
        """The norm layers on these channels (one today; one per producer for a coupled group)."""
        return (self.norm,)


_NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)


def check_norm(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` unless ``module`` is a norm layer with a trainable affine scale γ."""
    if not isinstance(module, _NORM_TYPES):
        kind = type(module).__name__
        hint = " (FrozenBatchNorm2d has no trainable γ: build the model with BatchNorm2d or GroupNorm)" \
            if "Frozen" in kind else ""
        raise ValueError(f"CHEX needs a trainable norm layer after each prunable conv, but {name!r} is {kind}{hint}")
    if getattr(module, "weight", None) is None:
        raise ValueError(f"CHEX needs norm layer {name!r} to have an affine scale γ (it was built with affine=False)")


def _is_block(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("conv1", "bn1", "conv2", "bn2")) and \
        isinstance(getattr(module, "conv1"), nn.Conv2d)


def resnet_groups(model: nn.Module, include_downsample: bool = False) -> list[ChannelGroup]:
    """Find the prunable channel groups of every torchvision-style residual block inside ``model``.

    BasicBlock: ``conv1 → bn1`` (consumer ``conv2``). Bottleneck: ``conv1 → bn1`` (consumer ``conv2``) and
    ``conv2 → bn2`` (consumer ``conv3``). With ``include_downsample``: ``downsample.0 → downsample.1`` (no consumer;
    as in the official ResNet-50 code). Block outputs (the residual stream), the stem and the classifier are never
    pruned. Names are relative to ``model``.

    Raises:
        ValueError: if ``model`` has no residual blocks, or a group's norm layer has no trainable γ.
    """
    groups: list[ChannelGroup] = []
    for bname, block in model.named_modules():
        if not _is_block(block):
            continue
        prefix = f"{bname}." if bname else ""
        chain = [("conv1", "bn1", "conv2")]
        if hasattr(block, "conv3") and hasattr(block, "bn3"):
            chain.append(("conv2", "bn2", "conv3"))
        for conv, norm, consumer in chain:
            check_norm(prefix + norm, getattr(block, norm))
            size = getattr(block, conv).out_channels
            groups.append(ChannelGroup(prefix + conv, prefix + conv, prefix + norm, (prefix + consumer,), size))
        down = getattr(block, "downsample", None)
        if include_downsample and isinstance(down, nn.Sequential) and len(down) >= 2 \
                and isinstance(down[0], nn.Conv2d):
            check_norm(prefix + "downsample.1", down[1])
            groups.append(ChannelGroup(prefix + "downsample.0", prefix + "downsample.0", prefix + "downsample.1",
                                       (), down[0].out_channels, kind="downsample"))
    if not groups:
        raise ValueError(f"no prunable channel groups found in {type(model).__name__}: CHEX expects residual blocks "
                         "with conv1/bn1/conv2/bn2 (torchvision BasicBlock or Bottleneck)")
    return groups
