"""Physical channel removal: a masked model → a smaller model, plus the width spec that rebuilds it.

``compact_model`` slices every tensor of every narrowable group, as :mod:`chex_core.layout` lists them: producer
convs (output rows), norms (entries) and consumer convs and linear layers (input columns). A downsample group explored
on its own keeps its full width: a plain ResNet adds the shortcut to the full residual stream, so a narrowed shortcut
cannot be expressed (docs/algorithm.md §2); its masked channels stay as zeros. A residual group narrows the whole
stream at once, shortcut included. In eval mode the compact model computes exactly what the masked model computes
(up to float rounding).

The width spec is ``{group name: width}``. Internal groups are named after their producer conv (``layer1.0.conv1``,
as in upstream's ``cfg``); residual groups ``<stage>.residual`` (or ``conv1`` for a stem of its own), which no conv
is called, so a spec says unambiguously which streams were narrowed.

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
def _new_linear_from(lin: nn.Linear, dims: Mapping[int, torch.Tensor], copy_values: bool) -> nn.Linear:
    o = dims.get(0, torch.arange(lin.out_features))
    i = dims.get(1, torch.arange(lin.in_features))
    new = nn.Linear(len(i), len(o), lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
    if copy_values:
        dev = lin.weight.device
        new.weight.copy_(lin.weight[o.to(dev)][:, i.to(dev)])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[o.to(dev)])
    return new


@torch.no_grad()
def _new_conv_from(conv: nn.Module, name: str, dims: Mapping[int, torch.Tensor], copy_values: bool) -> nn.Module:
    if isinstance(conv, nn.Linear):
        return _new_linear_from(conv, dims, copy_values)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"compact export slices convolutions, linear and norm layers; {name!r} is "
                         f"{type(conv).__name__}")
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
    """Return a physically smaller deep copy of ``model`` and its width spec ``{group name: width}`` (module
    docstring).

    Args:
        model: the masked dense model (unwrapped); left untouched.
        groups: its channel groups; downsample groups stay full width.
        masks: group name → bool keep vector (``ChannelExplorer.masks``).
    """
    index = {g.name: masks[g.name].nonzero().flatten().cpu() for g in groups
             if g.kind != "downsample" and g.name in masks}
    small = copy.deepcopy(model)
    _rebuild(small, groups, index, copy_values=True)
    spec = {g.name: int(index[g.name].numel()) for g in groups if g.name in index}
    return small, spec


def _spec_groups(model: nn.Module, spec: Mapping[str, int]) -> list[ChannelGroup]:
    """The groups a spec can name on a whole torchvision-style classifier: the internal ones, plus the residual ones
    when the spec names any group that is not internal."""
    groups = resnet_groups(model)
    if set(spec) <= {g.name for g in groups}:
        return groups
    try:
        return resnet_groups(model, residual=True)
    except ValueError:
        return groups           # reported below as unknown names


def apply_width_spec(model: nn.Module, spec: Mapping[str, int],
                     groups: Sequence[ChannelGroup] | None = None) -> nn.Module:
    """Rebuild a freshly built dense ``model`` (in place) to the widths in ``spec`` (from :func:`compact_model`)
    so a compact state_dict loads strictly.

    Args:
        model: the dense network.
        spec: ``{group name: width}``; groups it does not name keep their full width.
        groups: the model's channel groups, as built for the run that wrote the spec (needed when residual groups
            have consumers outside the ResNet, e.g. ``resnet_groups(ssd, residual=True, within="backbone",
            stage_consumers=...)``). Default: found on ``model`` itself, residual ones included when the spec names
            any (a whole classifier).

    Raises:
        ValueError: ``spec`` names a group the model does not have, or a width outside ``[1, size]``.
    """
    by_name = {g.name: g for g in (_spec_groups(model, spec) if groups is None else groups)
               if g.kind != "downsample"}
    unknown = sorted(set(spec) - set(by_name))
    if unknown:
        raise ValueError(f"width spec names layers this model does not have as prunable groups: {unknown[:5]}")
    for name, w in spec.items():
        if not 1 <= int(w) <= by_name[name].size:
            raise ValueError(f"width spec gives {name!r} {w} channels; it must be in [1, {by_name[name].size}]")
    index = {n: torch.arange(int(w)) for n, w in spec.items()}
    _rebuild(model, [by_name[n] for n in spec], index, copy_values=False)
    return model
