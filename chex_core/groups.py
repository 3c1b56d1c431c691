"""Channel groups: which convolution outputs CHEX may prune, and which layers follow them.

A *group* is one set of channels that lives or dies together: the output channels of its producer conv(s), the
matching entries of the norm layer after each producer, and the matching input channels of the consumer layer(s)
that read them. Groups are addressed by module name (``layer3.2.conv1``), never by position, so the same code serves
a whole classifier, an SSD detector and a Mask R-CNN (which layers, and why: docs/algorithm.md §2). Every tensor a
group's channels live in is listed by :mod:`chex_core.layout`.

Two kinds of groups come from :func:`resnet_groups`:

- *internal* groups (upstream CHEX): a block's ``conv1`` (and a Bottleneck's ``conv2``) with its norm, read by the
  next conv of the same block — one producer, one consumer;
- *coupled residual* groups (``residual=True``, docs/algorithm.md §2.1): the residual stream of a stage is written by
  several convs whose outputs are summed (the stem or the downsample conv, and the last conv of every block) and read
  by several layers (every block's first conv and downsample, the next stage, the classifier or a task's head/neck),
  so its channels can only be removed from all of them at once.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["ChannelGroup", "GROUP_KINDS", "resnet_groups", "check_norm"]

GROUP_KINDS = ("inner", "downsample", "residual")


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable set of channels.

    Attributes:
        name: the group's id (masks, explorer checkpoints and width specs are keyed by it). Internal groups: the
            producer's name relative to the ResNet (``layer1.0.conv1``); residual groups: ``<stage>.residual``
            (``layer2.residual``), or the stem conv's name (``conv1``) for a stem whose output no stage shares.
        producer: module name of the (first) conv whose output channels are the group's (weight
            ``(C, C_in, k, k)``), relative to the model the explorer is given.
        norm: module name of the norm layer after ``producer`` (BatchNorm or GroupNorm); ``|γ|`` ranks channels.
        consumers: module names of the layers whose *input* channels follow this group (convs and ``nn.Linear``;
            empty for a downsample shortcut, whose output joins the residual sum).
        size: number of channels ``C`` in the dense model.
        kind: one of :data:`GROUP_KINDS`: ``"inner"`` (block-internal), ``"downsample"`` (the shortcut conv alone,
            masked but never narrowed) or ``"residual"`` (a coupled residual stream).
        extra_producers: the other convs writing the same channels (a coupled group), in forward order.
        extra_norms: their norm layers, one per extra producer.
    """

    name: str
    producer: str
    norm: str
    consumers: tuple[str, ...]
    size: int
    kind: str = "inner"
    extra_producers: tuple[str, ...] = ()
    extra_norms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"channel group {self.name!r}: unknown kind {self.kind!r}; choose one of {GROUP_KINDS}")
        if len(self.extra_producers) != len(self.extra_norms):
            raise ValueError(f"channel group {self.name!r}: {len(self.extra_producers)} extra producers but "
                             f"{len(self.extra_norms)} extra norms (one norm per producer)")

    @property
    def producers(self) -> tuple[str, ...]:
        """Every conv writing these channels (one for an internal group, several for a coupled residual group)."""
        return (self.producer, *self.extra_producers)

    @property
    def norms(self) -> tuple[str, ...]:
        """The norm layer after each producer, in the order of :attr:`producers`."""
        return (self.norm, *self.extra_norms)


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


def _last_conv(block: nn.Module) -> tuple[str, str]:
    """The (conv, norm) attribute names whose output is added to the shortcut: conv3/bn3 (Bottleneck), else
    conv2/bn2 (BasicBlock)."""
    return ("conv3", "bn3") if hasattr(block, "conv3") and hasattr(block, "bn3") else ("conv2", "bn2")


def _downsample(block: nn.Module) -> nn.Sequential | None:
    down = getattr(block, "downsample", None)
    if isinstance(down, nn.Sequential) and len(down) >= 2 and isinstance(down[0], nn.Conv2d):
        return down
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _internal_groups(resnet: nn.Module, within: str, include_downsample: bool) -> list[ChannelGroup]:
    groups: list[ChannelGroup] = []
    for bname, block in resnet.named_modules():
        if not _is_block(block):
            continue
        chain = [("conv1", "bn1", "conv2")]
        if hasattr(block, "conv3") and hasattr(block, "bn3"):
            chain.append(("conv2", "bn2", "conv3"))
        for conv, norm, consumer in chain:
            check_norm(_join(bname, norm), getattr(block, norm))
            name = _join(bname, conv)
            groups.append(ChannelGroup(name, _join(within, name), _join(within, _join(bname, norm)),
                                       (_join(within, _join(bname, consumer)),), getattr(block, conv).out_channels))
        down = _downsample(block)
        if include_downsample and down is not None:
            check_norm(_join(bname, "downsample.1"), down[1])
            name = _join(bname, "downsample.0")
            groups.append(ChannelGroup(name, _join(within, name), _join(within, _join(bname, "downsample.1")),
                                       (), down[0].out_channels, kind="downsample"))
    return groups


@dataclass
class _Stream:
    """A residual stream being collected while walking the blocks in forward order (names relative to the ResNet)."""

    writers: list[tuple[str, str]]          # (conv, norm)
    readers: list[str]
    size: int
    stage: str | None = None                # the last stage that writes into it (names the group)


def _stages(resnet: nn.Module) -> list[tuple[str, nn.Sequential]]:
    stages = [(n, m) for n, m in resnet.named_children() if re.fullmatch(r"layer\d+", n)]
    stages.sort(key=lambda nm: int(nm[0][5:]))
    if not stages or not all(isinstance(m, nn.Sequential) and all(_is_block(b) for b in m) for _, m in stages):
        raise ValueError(f"residual groups need a torchvision-style ResNet (stages layer1, layer2, ... of residual "
                         f"blocks); {type(resnet).__name__} has none")
    return stages


def _walk_streams(resnet: nn.Module, stage_outputs: Mapping[str, Sequence[str]]) -> list[_Stream]:
    """The residual streams of ``resnet`` in forward order: the stem's output, then one per downsampling stage
    (a block without a downsample adds into the stream it reads, so it joins that stream)."""
    if not isinstance(getattr(resnet, "conv1", None), nn.Conv2d) or getattr(resnet, "bn1", None) is None:
        raise ValueError(f"residual groups need the ResNet's stem as conv1/bn1; {type(resnet).__name__} has no "
                         "such stem")
    current = _Stream([("conv1", "bn1")], [], resnet.conv1.out_channels)
    streams = [current]
    for sname, stage in _stages(resnet):
        for i, block in enumerate(stage):
            bname = f"{sname}.{i}"
            current.readers.append(f"{bname}.conv1")
            down = _downsample(block)
            if down is not None:
                current.readers.append(f"{bname}.downsample.0")
                current = _Stream([(f"{bname}.downsample.0", f"{bname}.downsample.1")], [], down[0].out_channels)
                streams.append(current)
            elif block.conv1.in_channels != current.size:
                raise ValueError(f"{bname} changes the width of the residual stream without a downsample conv: "
                                 "not a torchvision-style residual block")
            conv, norm = _last_conv(block)
            current.writers.append((f"{bname}.{conv}", f"{bname}.{norm}"))
            current.stage = sname
        current.readers.extend(stage_outputs.get(sname, ()))
    return streams


def _residual_groups(model: nn.Module, resnet: nn.Module, within: str,
                     stage_consumers: Mapping[str, Sequence[str]] | None) -> list[ChannelGroup]:
    stages = _stages(resnet)
    last = stages[-1][0]
    outside = {k: tuple(v) for k, v in (stage_consumers or {}).items()}
    unknown = sorted(set(outside) - {n for n, _ in stages})
    if unknown:
        raise ValueError(f"stage_consumers names {unknown}, which are not stages of the ResNet "
                         f"({[n for n, _ in stages]})")
    marker = "\0"                           # readers outside the ResNet are already relative to ``model``
    outputs = {k: [marker + c for c in v] for k, v in outside.items()}
    if last not in outputs:
        if not isinstance(getattr(resnet, "fc", None), nn.Linear):
            raise ValueError(f"residual groups: the output of {_join(within, last)} leaves the ResNet and nothing "
                             "reads it that CHEX knows of; name the layers that read it (stage_consumers="
                             f"{{{last!r}: [...]}}: a detection head, an FPN lateral) so they narrow with it")
        outputs[last] = ["fc"]
    mods = dict(model.named_modules())
    groups = []
    for stream in _walk_streams(resnet, outputs):
        writers = [(_join(within, c), _join(within, n)) for c, n in stream.writers]
        readers = tuple(r[1:] if r.startswith(marker) else _join(within, r) for r in stream.readers)
        for r in readers:
            _check_consumer(mods, r, stream.size)
        for (_, n), (_, local) in zip(writers, stream.writers):
            check_norm(local, mods[n])
        name = f"{stream.stage}.residual" if stream.stage else stream.writers[0][0]
        (p, n), rest = writers[0], writers[1:]
        groups.append(ChannelGroup(name, p, n, readers, stream.size, "residual",
                                   tuple(c for c, _ in rest), tuple(m for _, m in rest)))
    return groups


def _check_consumer(mods: Mapping[str, nn.Module], name: str, size: int) -> None:
    m = mods.get(name)
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == size:
        return
    if isinstance(m, nn.Linear) and m.in_features == size:
        return
    what = "not a module of the model" if m is None else f"a {type(m).__name__} with input width " \
        f"{getattr(m, 'in_channels', getattr(m, 'in_features', '?'))}"
    raise ValueError(f"residual group consumer {name!r} is {what}; consumers must be convs (groups=1) or Linear "
                     f"layers reading the stream's {size} channels")


def resnet_groups(model: nn.Module, include_downsample: bool = False, *, residual: bool = False, within: str = "",
                  stage_consumers: Mapping[str, Sequence[str]] | None = None) -> list[ChannelGroup]:
    """Find the prunable channel groups of the torchvision-style ResNet at ``within`` inside ``model``.

    Internal groups (always): BasicBlock ``conv1 → bn1`` (consumer ``conv2``); Bottleneck ``conv1 → bn1`` (consumer
    ``conv2``) and ``conv2 → bn2`` (consumer ``conv3``). With ``include_downsample``: ``downsample.0 →
    downsample.1`` alone, masked but never narrowed (no consumer; as in the official ResNet-50 code).

    With ``residual``, also one coupled group per residual stream (docs/algorithm.md §2.1), after the internal
    groups: producers = the stem (while no downsample separates it from the first stage) or a stage's downsample
    conv, and the last conv of every block adding into the stream; norms = their norms; consumers = every block's
    ``conv1`` and ``downsample.0`` reading it, the next stage, and what reads a stage's output outside the ResNet:
    the classifier ``fc`` of a whole classifier is found by itself, anything else must be named in
    ``stage_consumers``. ``residual`` and ``include_downsample`` exclude each other (the downsample conv is then a
    producer of its stage's group, and narrowable).

    Args:
        model: the network the module names are relative to (what the explorer, compact export and compact training
            are given).
        include_downsample: also the downsample shortcuts as their own (full-width) groups.
        residual: also the coupled residual-stream groups.
        within: dotted path of the ResNet inside ``model`` (``"backbone"`` for the SSD, ``"backbone.body"`` for Mask
            R-CNN; ``""``: ``model`` itself). Group *names* are relative to it, module names to ``model``, so the
            names in explorer checkpoints and width specs do not depend on where the explorer sits.
        stage_consumers: ``{stage: [module names relative to model]}``: layers outside the ResNet that read a
            stage's output (``{"layer3": ["additional_blocks.0.0", "loc.0", "conf.0"]}`` for the SSD).

    Raises:
        ValueError: no residual blocks; a norm without trainable γ; ``residual`` with ``include_downsample``; a
            stage output that leaves the ResNet with no named consumer; a consumer that does not read the stream.
    """
    if residual and include_downsample:
        raise ValueError("residual groups already explore the downsample convs (as producers of their stage's "
                         "residual group); include_downsample cannot be combined with residual")
    if stage_consumers and not residual:
        raise ValueError("stage_consumers only applies to residual groups (residual=True)")
    resnet = model.get_submodule(within) if within else model
    groups = _internal_groups(resnet, within, include_downsample)
    if not groups:
        raise ValueError(f"no prunable channel groups found in {type(resnet).__name__}: CHEX expects residual blocks "
                         "with conv1/bn1/conv2/bn2 (torchvision BasicBlock or Bottleneck)")
    if residual:
        groups += _residual_groups(model, resnet, within, stage_consumers)
    return groups
