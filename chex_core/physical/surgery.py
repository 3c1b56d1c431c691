"""Tensor surgery: move a model's channel-group tensors between channel sets (narrow, widen), in place.

Which tensor dims follow which group comes from :mod:`chex_core.layout` (the same description the explorer's masks,
MRU store and compact export use). Only *narrowable* groups are resized; a downsample shortcut explored on its own
stays full width (a residual group narrows the whole stream, shortcut and classifier included).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..groups import ChannelGroup
from ..layout import model_layout, tensor_dims

__all__ = ["Index", "channel_layout", "full_index", "remap_channels", "resize_", "expand_state_dict"]

Index = Mapping[str, torch.Tensor]          # group name -> sorted LongTensor of full-size channel positions


def channel_layout(groups: Sequence[ChannelGroup]) -> dict[tuple[str, str], dict[int, str]]:
    """Which dims of which tensors follow which group: ``{(module name, attr): {dim: group name}}``.

    Producer weight/bias dim 0, norm γ/β/running stats dim 0, consumer weight dim 1. A Bottleneck ``conv2`` is both
    the consumer of ``conv1``'s group (dim 1) and the producer of its own (dim 0). Downsample groups are left out:
    they are never narrowed. (A view of :func:`chex_core.layout.tensor_dims`.)
    """
    return tensor_dims(model_layout(groups), narrowable_only=True)


def full_index(groups: Sequence[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Every channel of every narrowable group (the dense model's index)."""
    return {g.name: torch.arange(g.size) for g in groups if g.kind != "downsample"}


def remap_channels(t: torch.Tensor, spec: Mapping[int, tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
    """Move ``t`` from one channel set to another along each dim in ``spec``.

    Args:
        t: a tensor whose dim ``d`` holds the channels ``held`` (full-size positions) for each ``d`` in ``spec``.
        spec: ``{dim: (held, target, full_size)}``; ``held``/``target`` sorted LongTensors of positions in
            ``range(full_size)``.

    Returns:
        A new tensor whose dim ``d`` holds the ``target`` channels: values of channels in both sets are copied,
        channels only in ``target`` are zero.
    """
    out = t.detach()
    for dim, (held, target, size) in spec.items():
        if held.numel() != size:                      # scatter into full size (zeros elsewhere)
            shape = list(out.shape)
            shape[dim] = size
            full = out.new_zeros(shape)
            full.index_copy_(dim, held.to(out.device), out)
            out = full
        if target.numel() != size:                    # gather the target channels
            out = out.index_select(dim, target.to(out.device))
    return out.clone() if out is t else out


def _set_tensor(mod: nn.Module, attr: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if old.dim() == 4 and not old.is_contiguous() and old.is_contiguous(memory_format=torch.channels_last):
        new = new.contiguous(memory_format=torch.channels_last)      # keep NHWC (--memory-format nhwc) fast
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(mod, attr, new)                   # a registered buffer: Module.__setattr__ keeps it one


def _sync_sizes(name: str, mod: nn.Module) -> None:
    """Keep a resized module's size attributes (``in_channels``, ``num_features``…) true to its tensors."""
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise ValueError(f"cannot resize grouped convolution {name!r}")
        mod.out_channels, mod.in_channels = int(mod.weight.shape[0]), int(mod.weight.shape[1])
    elif isinstance(mod, nn.Linear):            # a classifier reading a residual group
        mod.out_features, mod.in_features = int(mod.weight.shape[0]), int(mod.weight.shape[1])
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = int(mod.weight.shape[0])
    elif isinstance(mod, nn.GroupNorm):
        raise ValueError(f"cannot narrow {name!r}: GroupNorm statistics span channel groups, so removing "
                         "channels changes the function; use masked training for GroupNorm models")


@torch.no_grad()
def resize_(model: nn.Module, groups: Sequence[ChannelGroup], held: Index, target: Index) -> int:
    """Narrow or widen (in place) every tensor of the narrowable groups of ``model`` from ``held`` to ``target``.

    Module objects are kept; their affected parameters and buffers are replaced by new tensors (parameters stay
    ``nn.Parameter`` with the same ``requires_grad``), and ``in_channels``/``out_channels``/``num_features`` follow.
    Tensors whose groups do not change keep their identity. Returns the number of tensors replaced.
    """
    sizes = {g.name: g.size for g in groups}
    mods = dict(model.named_modules())
    touched: set[str] = set()
    n = 0
    for (mname, attr), dims in channel_layout(groups).items():
        mod = mods[mname]
        t = getattr(mod, attr, None)
        if t is None:
            continue
        spec = {d: (held[g], target[g], sizes[g]) for d, g in dims.items() if not torch.equal(held[g], target[g])}
        if not spec:
            continue
        for d, (h, _, _) in spec.items():
            if t.shape[d] != h.numel():
                raise ValueError(f"{mname}.{attr} has {t.shape[d]} channels in dim {d}, expected {h.numel()}: "
                                 "the model is not at the widths this resize assumes")
        _set_tensor(mod, attr, t, remap_channels(t, spec))
        touched.add(mname)
        n += 1
    for mname in touched:
        _sync_sizes(mname, mods[mname])
    return n


def expand_state_dict(state: Mapping[str, torch.Tensor], groups: Sequence[ChannelGroup], held: Index) -> dict:
    """A compact model's ``state_dict`` mapped back to full size (pruned channels zero), e.g. to compare it with the
    masked run or to load it into the dense architecture."""
    sizes = {g.name: g.size for g in groups}
    layout = channel_layout(groups)
    out = {}
    for key, t in state.items():
        mname, _, attr = key.rpartition(".")
        dims = layout.get((mname, attr), {})
        spec = {d: (held[g], torch.arange(sizes[g]), sizes[g]) for d, g in dims.items()}
        out[key] = remap_channels(t, spec) if spec else t
    return out
