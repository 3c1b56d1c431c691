"""The channel layout: for every channel group, each (module, tensor, dim) its channels live in.

CHEX moves, masks, stores and slices the same channels in four places: the explorer's per-step masks, its store of
most-recently-used (MRU) values, compact export and physically compact training. All four read this one description
so they cannot disagree about which tensors a channel touches. A group's entries come in three roles:

- ``producer``: a conv whose *output* channels are the group's channels: ``weight`` and ``bias`` along dim 0;
- ``norm``: the norm layer on the producer's output: ``weight`` (γ), ``bias`` (β), ``running_mean`` and
  ``running_var`` along dim 0;
- ``consumer``: a layer that reads the channels as its *input*: ``weight`` along dim 1.

Each role may list several modules: an internal :class:`~chex_core.groups.ChannelGroup` has one producer and one
norm; a coupled residual group (a stream written by several convs, docs/algorithm.md §2.1) lists several of each, and
its consumers may be ``nn.Linear`` layers (the classifier), whose ``weight`` dim 1 is the input like a conv's.

The layout holds names only. Tensors are looked up on the live model each time (:meth:`GroupLayout.resolve`), because
``model.to()``, ``model.half()`` and compact rebuilds replace them; a tensor a module does not have (a conv without
bias, a norm without running statistics) is skipped.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .groups import ChannelGroup

__all__ = ["ROLES", "ROLE_TENSORS", "ChannelSlice", "GroupLayout", "group_layout", "model_layout", "tensor_dims"]

ROLES = ("producer", "norm", "consumer")
# (tensor attribute, channel dim) per role; optional tensors are skipped when a module lacks them
ROLE_TENSORS: dict[str, tuple[tuple[str, int], ...]] = {
    "producer": (("weight", 0), ("bias", 0)),
    "norm": (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)),
    "consumer": (("weight", 1),),
}


@dataclass(frozen=True)
class ChannelSlice:
    """One tensor a group's channels live in.

    Attributes:
        role: ``producer``, ``norm`` or ``consumer``.
        index: position of the module among the group's modules of that role.
        module: module name (relative to the model the group names refer to).
        tensor: attribute name on the module (``weight``, ``bias``, ``running_mean``, ``running_var``).
        dim: the dim of that tensor that indexes the group's channels.
    """

    role: str
    index: int
    module: str
    tensor: str
    dim: int

    @property
    def key(self) -> str:
        """A stable name inside the group, used as the MRU store's key: ``producer.weight``, ``norm.running_var``,
        ``consumer0.weight``; a second producer or norm would be ``producer1.weight`` / ``norm1.weight``."""
        n = str(self.index) if self.role == "consumer" or self.index else ""
        return f"{self.role}{n}.{self.tensor}"


@dataclass(frozen=True)
class GroupLayout:
    """Every tensor slot of one channel group.

    Attributes:
        name: the group's name.
        size: its number of channels in the dense model.
        narrowable: whether a compact model may remove its channels (False for a downsample shortcut explored on
            its own, whose output is added to the full-width residual stream; such groups stay full width and are
            masked). Residual groups are narrowable: every conv adding into the stream narrows with it.
        slices: the slots, producers first, then norms, then consumers.
    """

    name: str
    size: int
    narrowable: bool
    slices: tuple[ChannelSlice, ...]

    def modules(self, role: str | None = None) -> tuple[str, ...]:
        """Module names of one role (or all roles), each once, in layout order."""
        seen: dict[str, None] = {}
        for s in self.slices:
            if role is None or s.role == role:
                seen.setdefault(s.module, None)
        return tuple(seen)

    def resolve(self, modules: Mapping[str, nn.Module]) -> list[tuple[ChannelSlice, torch.Tensor]]:
        """The slots' tensors as the model holds them *now* (parameters stay ``nn.Parameter``); absent ones skipped."""
        out = []
        for s in self.slices:
            t = getattr(modules[s.module], s.tensor, None)
            if isinstance(t, torch.Tensor):
                out.append((s, t))
        return out

    def parameters(self, modules: Mapping[str, nn.Module]) -> list[tuple[ChannelSlice, nn.Parameter]]:
        """The trainable slots (what masking zeroes every step and what has optimizer state)."""
        return [(s, t) for s, t in self.resolve(modules) if isinstance(t, nn.Parameter)]


def _role_slices(role: str, names: Sequence[str]) -> list[ChannelSlice]:
    return [ChannelSlice(role, i, name, tensor, dim) for i, name in enumerate(names)
            for tensor, dim in ROLE_TENSORS[role]]


def group_layout(group: ChannelGroup) -> GroupLayout:
    """The layout of one :class:`ChannelGroup`."""
    slices = (_role_slices("producer", group.producers) + _role_slices("norm", group.norms)
              + _role_slices("consumer", group.consumers))
    return GroupLayout(group.name, int(group.size), group.kind != "downsample", tuple(slices))


def model_layout(groups: Iterable[ChannelGroup]) -> list[GroupLayout]:
    """One :class:`GroupLayout` per group, in order."""
    return [group_layout(g) for g in groups]


def tensor_dims(layouts: Iterable[GroupLayout], narrowable_only: bool = True) -> dict[tuple[str, str], dict[int, str]]:
    """``{(module, tensor): {dim: group name}}``: which dims of which tensors follow which group (a Bottleneck
    ``conv2.weight`` follows its own group on dim 0 and ``conv1``'s on dim 1). With ``narrowable_only`` the groups a
    compact model keeps full width are left out.

    Raises:
        ValueError: two groups claim the same dim of the same tensor.
    """
    out: dict[tuple[str, str], dict[int, str]] = {}
    for lay in layouts:
        if narrowable_only and not lay.narrowable:
            continue
        for s in lay.slices:
            dims = out.setdefault((s.module, s.tensor), {})
            if dims.get(s.dim, lay.name) != lay.name:
                raise ValueError(f"{s.module}.{s.tensor} dim {s.dim} belongs to two channel groups "
                                 f"({dims[s.dim]!r} and {lay.name!r}); couple them into one group")
            dims[s.dim] = lay.name
    return out
