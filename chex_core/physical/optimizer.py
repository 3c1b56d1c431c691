"""Optimizer rebuild after a shape change: same class, same hyper-parameters and groups, state moved by channel.

A resize replaces parameter tensors, and an optimizer keys its state by parameter object, so after every rebuild of a
compact model a new optimizer is made over the new parameters and the old state is transplanted into it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["rebuild_optimizer"]


def _constructor_kwargs(optimizer: torch.optim.Optimizer) -> dict:
    # optimizer.defaults may hold keys the constructor does not take (AdamW inherits Adam's); every group carries
    # its own hyper-parameters anyway, so only constructor arguments are passed
    params = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in params}


def _members(optimizer: torch.optim.Optimizer, param_map: Mapping[nn.Parameter, nn.Parameter],
             model: nn.Module | None,
             param_groups: Callable[[nn.Module], Sequence[Sequence[nn.Parameter]]] | None) -> list[list[nn.Parameter]]:
    """The new parameters of each param group, checked against the model."""
    if param_groups is not None:
        if model is None:
            raise ValueError("rebuild_optimizer: a param_groups policy needs the model")
        members = [list(ps) for ps in param_groups(model)]
        if len(members) != len(optimizer.param_groups):
            raise ValueError(f"param-group policy returned {len(members)} groups, the optimizer has "
                             f"{len(optimizer.param_groups)}")
    else:
        by_id = {id(old): new for old, new in param_map.items()}
        members = [[by_id.get(id(p), p) for p in g["params"]] for g in optimizer.param_groups]
    if model is not None:
        ids = [id(p) for ps in members for p in ps]
        want = {id(p) for p in model.parameters() if p.requires_grad}
        if len(ids) != len(set(ids)) or set(ids) != want:
            raise ValueError("the rebuilt optimizer's parameters are not exactly the model's trainable parameters "
                             f"({len(set(ids))} in groups, {len(want)} in the model, {len(ids) - len(set(ids))} "
                             "duplicated)")
    return members


def rebuild_optimizer(optimizer: torch.optim.Optimizer, param_map: Mapping[nn.Parameter, nn.Parameter],
                      transplant: Callable[[nn.Parameter, torch.Tensor], torch.Tensor] | None = None, *,
                      model: nn.Module | None = None,
                      param_groups: Callable[[nn.Module], Sequence[Sequence[nn.Parameter]]] | None = None
                      ) -> torch.optim.Optimizer:
    """A new optimizer of the same class over new parameters, with the old hyper-parameters and transplanted state.

    Args:
        optimizer: the optimizer over the old parameters.
        param_map: old parameter → its replacement; parameters not in the map are carried over as they are.
        transplant: ``(old parameter, state tensor shaped like it) → state tensor shaped like the new parameter``
            (channel-index transplant); default: the tensor unchanged. Other state (Adam's ``step``) is copied.
        model: the model the new parameters belong to (needed with ``param_groups``; also used to check that the
            optimizer covers exactly the model's trainable parameters).
        param_groups: the param-group *policy*: ``model → one list of parameters per group``, in the order of
            ``optimizer.param_groups`` (e.g. "BN γ/β" and "the rest"). Default: each group keeps its members
            through ``param_map``. Each group's hyper-parameters (lr as set by the scheduler, momentum, weight
            decay, ``initial_lr``…) are copied from the old group of the same position.

    Raises:
        ValueError: the policy returns another number of groups, or the groups do not cover the model's trainable
            parameters exactly once.
    """
    members = _members(optimizer, param_map, model, param_groups)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
              for g, ps in zip(optimizer.param_groups, members)]
    new = type(optimizer)(groups, **_constructor_kwargs(optimizer))
    old_of = {id(new_p): old_p for old_p, new_p in param_map.items()}
    for ps in members:
        for p in ps:
            old = old_of.get(id(p), p)
            state = optimizer.state.get(old)
            if not state:
                continue
            moved = {}
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == old.shape and v.dim() > 0:
                    moved[k] = transplant(old, v) if transplant is not None and old is not p else v
                else:
                    moved[k] = v.clone() if torch.is_tensor(v) else v
            new.state[p] = moved
    return new
