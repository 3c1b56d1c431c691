"""Masks on parameters and on optimizer state: the one place that zeroes pruned channels in both, and that prepares
the optimizer state of regrown channels.

Masked CHEX training keeps pruned channels at exactly zero by multiplying, after every optimizer step, each affected
parameter and every optimizer-state tensor shaped like it by a 0/1 multiplier (:func:`mask_multipliers`; a Bottleneck
``conv2.weight`` is masked on dim 0 by its own group and on dim 1 by ``conv1``'s, so its multiplier is the product).
Physically compact training masks the full-width downsample groups the same way.

Optimizer state of pruned channels is zeroed (upstream leaves it to decay; docs/algorithm.md §6.2 explains the choice).
For SGD momentum, zero is what a regrown channel should start from. For Adam-like optimizers it is not: with a zero
second moment and a large step count the bias corrections are ≈ 1, so the first update of a regrown weight would be
``lr·(1−β1)·g/√((1−β2)·g²) ≈ 3.2·lr·sign(g)`` whatever the gradient's size. :func:`fill_regrown_second_moments`
therefore gives regrown entries the mean second moment of the entries of the same tensor that stay live; the first
moment stays zero, so the first update is ``lr·(1−β1)·g/√(β2·v̄+(1−β2)·g²)``: at most ``lr`` while the gradient is
within ~10× the layer's RMS gradient, and never more than the 3.2·lr it was.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .layout import GroupLayout

__all__ = ["SECOND_MOMENT_KEYS", "liveness", "mask_multipliers", "MaskCache", "state_tensors_like",
           "mask_optimizer_state", "fill_regrown_second_moments"]

# optimizer-state entries that scale the step by 1/sqrt(state): Adam/AdamW/NAdam/RAdam (exp_avg_sq, AMSGrad's
# max_exp_avg_sq), RMSprop/Adadelta (square_avg), Adamax (exp_inf); zero there means an outsized first step
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "exp_inf")


def liveness(shape: Sequence[int], dims: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Full-shape bool: an entry is live when its index along every dim in ``dims`` is live (``dims[d]`` is a bool
    vector of length ``shape[d]``)."""
    device = next(iter(dims.values())).device if dims else None
    out = torch.ones(shape, dtype=torch.bool, device=device)
    for d, m in dims.items():
        view = [1] * len(shape)
        view[d] = -1
        out = out & m.view(view)
    return out


def mask_multipliers(modules: Mapping[str, nn.Module], layouts: Iterable[GroupLayout],
                     masks: Mapping[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """One multiplier per masked parameter (same shape, dtype, device and memory format), the product of the masks of
    every group whose channels it holds, so re-applying all masks is one fused ``_foreach_mul_``.

    Raises:
        ValueError: a parameter does not have its group's number of channels (e.g. the model was narrowed).
    """
    found: dict[int, tuple[nn.Parameter, dict[int, torch.Tensor]]] = {}
    for lay in layouts:
        for s, p in lay.parameters(modules):
            if p.dim() <= s.dim or p.shape[s.dim] != lay.size:
                raise ValueError(f"{s.module}.{s.tensor} has shape {tuple(p.shape)}, but group {lay.name!r} needs "
                                 f"{lay.size} channels in dim {s.dim}: masks can only be applied to the dense model")
            found.setdefault(id(p), (p, {}))[1][s.dim] = masks[lay.name]
    out = []
    for p, dims in found.values():
        mult = torch.ones_like(p, memory_format=torch.preserve_format, requires_grad=False)
        mult.mul_(liveness(p.shape, {d: m.to(p.device) for d, m in dims.items()}))
        out.append((p, mult))
    return out


class MaskCache:
    """The per-step masking of a set of groups: multipliers built once per mask change, re-applied to parameters
    and optimizer state with one fused multiply each.

    The model may be moved or cast between steps (``model.to(device)``, ``.double()``, ``.half()``), or a parameter
    replaced (``load_state_dict(assign=True)``): :meth:`is_current` notices, with one dict lookup and one storage
    pointer read per masked parameter, so the owner can rebuild instead of multiplying dead copies.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget everything (and drop the references to the parameters); :meth:`is_current` is then False."""
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._slots: list[tuple[dict, str]] | None = None
        self._data: list[torch.Tensor] = []
        self._mults: list[torch.Tensor] = []
        self._ptrs: list[int] = []

    def build(self, modules: Mapping[str, nn.Module], layouts: Iterable[GroupLayout],
              masks: Mapping[str, torch.Tensor]) -> None:
        layouts = list(layouts)
        self.pairs = mask_multipliers(modules, layouts, masks)
        slot_of = {id(p): (modules[s.module]._parameters, s.tensor)
                   for lay in layouts for s, p in lay.parameters(modules)}
        self._slots = [slot_of[id(p)] for p, _ in self.pairs]
        self._data = [p.data for p, _ in self.pairs]
        self._mults = [m for _, m in self.pairs]
        self._ptrs = [p.data_ptr() for p, _ in self.pairs]

    def is_current(self) -> bool:
        """True while every masked parameter is still the object, and holds the storage, it was built for
        (``Module._apply`` swaps ``param.data``; assigning loads replace the parameter)."""
        if self._slots is None:
            return False
        for (params, name), (p, _), ptr in zip(self._slots, self.pairs, self._ptrs):
            q = params.get(name)
            if q is not p or q.data_ptr() != ptr:
                return False
        return True

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned entries of the parameters and (if given) of their optimizer state."""
        if self._data:
            torch._foreach_mul_(self._data, self._mults)
        mask_optimizer_state(optimizer, self.pairs)


def state_tensors_like(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer-state tensors of ``param`` that are shaped like it (momentum, Adam moments, …)."""
    state = optimizer.state.get(param)
    if not state:
        return []
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape and v.dim() > 0]


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer | None,
                         pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Multiply every state tensor of each parameter by its multiplier (one fused ``_foreach_mul_``)."""
    if optimizer is None or not optimizer.state:
        return
    states, mults = [], []
    for p, m in pairs:
        for v in state_tensors_like(optimizer, p):
            states.append(v)
            mults.append(m)
    if states:
        torch._foreach_mul_(states, mults)


@torch.no_grad()
def fill_regrown_second_moments(optimizer: torch.optim.Optimizer | None,
                                entries: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> int:
    """Give regrown entries a usable second moment (see the module docstring).

    Args:
        optimizer: the optimizer (None or empty state: nothing to do).
        entries: ``(parameter, was_live, is_live)`` with full-shape bool tensors: liveness before and after the
            event. Regrown = ``is_live & ~was_live``; the fill is the mean over ``was_live & is_live`` (the entries
            that stay live, which compact and masked training hold identically).

    Returns:
        The number of state entries filled.
    """
    if optimizer is None or not optimizer.state:
        return 0
    filled = 0
    for p, was, now in entries:
        state = optimizer.state.get(p)
        if not state:
            continue
        keys = [k for k in SECOND_MOMENT_KEYS if torch.is_tensor(state.get(k)) and state[k].shape == p.shape]
        if not keys:
            continue
        was, now = was.to(p.device), now.to(p.device)
        regrown = now & ~was
        stay = now & was
        if not bool(regrown.any()) or not bool(stay.any()):
            continue
        for k in keys:
            v = state[k]
            v.masked_fill_(regrown, v[stay].mean())
            filled += int(regrown.sum())
    return filled
