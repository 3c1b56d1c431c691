"""Physical channel removal: a masked model → a smaller model, plus the width spec that rebuilds it.

``compact_model`` slices every tensor of every narrowable group, as :mod:`chex_core.layout` lists them: producer
convs (output rows), norms (entries) and consumer convs (input columns). Downsample groups keep their full width: a
plain ResNet adds the shortcut to the full residual stream, so a narrowed shortcut cannot be expressed
(docs/algorithm.md §2); their masked channels stay as zeros. In eval mode the compact model computes exactly what
the masked model computes (up to float rounding).

GroupNorm is rejected: its statistics are taken over groups of channels, so removing channels changes what the
remaining ones compute (docs/algorithm.md §7.1).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .groups import _NORM_TYPES, ChannelGroup, resnet_groups
from .layout import model_layout

__all__ = ["compact_model", "apply_width_spec"]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _new_conv(conv: nn.Conv2d, c_in: int, c_out: int) -> nn.Conv2d:
    if conv.groups != 1:
        raise ValueError("grouped/depthwise convolutions are not supported by compact export")
    return nn.Conv2d(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1,
                     conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)


def _new_norm(norm: nn.Module, name: str, c: int) -> nn.Module:
    if isinstance(norm, nn.GroupNorm):
        raise ValueError(f"cannot compact {name!r}: GroupNorm statistics span channel groups, so removing channels "
                         "changes the function (use BatchNorm for a compact export, or keep the masked model)")
    cls = type(norm)
    new = cls(c, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
              track_running_stats=norm.track_running_stats, device=norm.weight.device, dtype=norm.weight.dtype)
    return new


def _plan(groups: Sequence[ChannelGroup], index: Mapping[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """Per module: the kept channel indices along each of its channel dims (conv: 0 = out, 1 = in; norm: 0)."""
    plan: dict[str, dict[int, torch.Tensor]] = {}
    for lay in model_layout(groups):
        if not lay.narrowable or lay.name not in index:
            continue
        idx = index[lay.name]
        if idx.numel() == 0:
            raise ValueError(f"group {lay.name!r} has no channels left; a compact model needs at least one")
        for s in lay.slices:
            plan.setdefault(s.module, {})[s.dim] = idx
    return plan


@torch.no_grad()
def _new_conv_from(conv: nn.Module, name: str, dims: Mapping[int, torch.Tensor], copy_values: bool) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"compact export slices convolutions and norm layers; {name!r} is {type(conv).__name__}")
    o = dims.get(0, torch.arange(conv.out_channels))
    i = dims.get(1, torch.arange(conv.in_channels))
    new = _new_conv(conv, len(i), len(o))
    if copy_values:
        dev = conv.weight.device
        new.weight.copy_(conv.weight[o.to(dev)][:, i.to(dev)])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[o.to(dev)])
    return new


@torch.no_grad()
def _new_norm_from(norm: nn.Module, name: str, idx: torch.Tensor, copy_values: bool) -> nn.Module:
    new = _new_norm(norm, name, len(idx))
    if copy_values:
        idx = idx.to(norm.weight.device)
        new.weight.copy_(norm.weight[idx])
        new.bias.copy_(norm.bias[idx])
        if getattr(norm, "running_mean", None) is not None:
            new.running_mean.copy_(norm.running_mean[idx])
            new.running_var.copy_(norm.running_var[idx])
            new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new


@torch.no_grad()
def _rebuild(model: nn.Module, groups: Sequence[ChannelGroup], index: Mapping[str, torch.Tensor],
             copy_values: bool) -> None:
    mods = dict(model.named_modules())
    for name, dims in sorted(_plan(groups, index).items()):
        old = mods[name]
        if isinstance(old, _NORM_TYPES):
            new = _new_norm_from(old, name, dims[0], copy_values)
        else:
            new = _new_conv_from(old, name, dims, copy_values)
        _set_module(model, name, new)


def compact_model(model: nn.Module, groups: Sequence[ChannelGroup],
                  masks: Mapping[str, torch.Tensor]) -> tuple[nn.Module, dict[str, int]]:
    """Return a physically smaller deep copy of ``model`` and its width spec ``{producer name: width}``.

    Args:
        model: the masked dense model (unwrapped); left untouched.
        groups: its channel groups; downsample groups stay full width.
        masks: group name → bool keep vector (``ChannelExplorer.masks``).
    """
    index = {g.name: masks[g.name].nonzero().flatten().cpu() for g in groups
             if g.kind != "downsample" and g.name in masks}
    small = copy.deepcopy(model)
    _rebuild(small, groups, index, copy_values=True)
    spec = {g.producer: int(index[g.name].numel()) for g in groups if g.name in index}
    return small, spec


def apply_width_spec(model: nn.Module, spec: Mapping[str, int]) -> nn.Module:
    """Rebuild a freshly built dense ``model`` (in place) to the widths in ``spec`` so a compact state_dict loads
    strictly. Unknown names in ``spec`` raise ``ValueError``."""
    groups = {g.producer: g for g in resnet_groups(model)}
    unknown = sorted(set(spec) - set(groups))
    if unknown:
        raise ValueError(f"width spec names layers this model does not have as prunable groups: {unknown[:5]}")
    for name, w in spec.items():
        if not 1 <= int(w) <= groups[name].size:
            raise ValueError(f"width spec gives {name!r} {w} channels; it must be in [1, {groups[name].size}]")
    index = {groups[n].name: torch.arange(int(w)) for n, w in spec.items()}
    _rebuild(model, [groups[n] for n in spec], index, copy_values=False)
    return model
