"""ResNet-18/34/50/101 for CLS with torchvision parameter names, CHEX init, and weight-file loading.

Models are ``torchvision.models.resnetXX(weights=None)`` (never downloaded), so every checkpoint key matches
torchvision's (``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}``, ``bn{1,2,3}``, ``downsample.{0,1}``, ``fc``) and
upstream's released files load directly. ``cifar_stem`` swaps the 7×7/2 stem + max-pool for a 3×3/1 conv (same
name ``conv1``) so 32-px images keep spatial resolution.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
from torch import nn

from chex_core import apply_width_spec, resnet_groups
from chex_core.checkpoint import CheckpointError, load_checkpoint, state_dict_problems, strip_prefix
from chex_tasks.export import read_compact

log = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class WeightsError(ValueError):
    """A weight file that cannot be used for the requested model (one-line, user-facing message)."""


def init_weights(model: nn.Module, conv_mode: str = "fan_out", bn_gamma: float = 1.0) -> None:
    """Re-initialise ``model`` in place: kaiming-normal convs (``conv_mode`` fan_out|fan_in, ReLU gain),
    every BatchNorm ``γ = bn_gamma, β = 0``; the classifier keeps torchvision's default init.

    CHEX (upstream ``resnet.py``) uses fan_out with ``γ = 0.5``: the global |γ| ranking that allocates channels
    starts from equal scales, and 0.5 leaves room for γ to grow or shrink.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, bn_gamma)
            nn.init.zeros_(m.bias)


def build_model(arch: str, num_classes: int = 1000, *, cifar_stem: bool = False, conv_init: str = "fan_out",
                bn_gamma: float = 1.0) -> nn.Module:
    """A randomly initialised torchvision ResNet (``arch`` in :data:`ARCHS`), see :func:`init_weights`."""
    import torchvision

    if arch not in ARCHS:
        raise WeightsError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    init_weights(model, conv_init, bn_gamma)
    return model


# --------------------------------------------------------------------------------------------------- weight files
def read_weight_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a CLS weight file and return ``(state_dict, meta)``.

    Accepted layouts (all via ``torch.load(weights_only=True)``):
      * upstream/NVIDIA checkpoints: ``{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer', ...}`` with or
        without the ``module.`` prefix (full-size tensors, pruned channels zeroed);
      * this project's checkpoints (the same plus ``explorer``, ``args`` …) and compact checkpoints
        (``compact.pth``, any layout :func:`chex_tasks.export.read_compact` reads);
      * a plain state dict (e.g. torchvision's ``resnet50-*.pth``), or one under a ``model`` key.

    ``meta`` holds ``arch`` (str or None), ``cfg`` (width spec or None), ``cifar_stem`` (bool or None) and
    ``image_size`` (int or None), the last two as recorded by this project's training runs.
    """
    try:
        obj = _load_allowing_numpy_scalars(path)
    except CheckpointError as exc:
        raise WeightsError(str(exc).splitlines()[0]) from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
    compact = read_compact(obj)
    if compact is not None:
        sd = compact.state_dict
    elif "state_dict" in obj:
        sd = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    else:
        sd = obj
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: no state_dict of tensors found (keys: {', '.join(list(obj)[:6])})")
    arch = obj.get("arch")
    if isinstance(arch, (list, tuple)):  # upstream stores (arch, model_config, num_classes, cfg)
        arch = arch[0] if arch else None
    args = obj.get("args") if isinstance(obj.get("args"), Mapping) else {}
    meta = {"arch": arch if isinstance(arch, str) else None,
            "cfg": compact.width_spec if compact is not None else None,
            "cifar_stem": obj.get("cifar_stem", args.get("cifar_stem")),
            "image_size": obj.get("image_size", args.get("image_size"))}
    return dict(strip_prefix(dict(sd))), meta


def _load_allowing_numpy_scalars(path: str):
    """``load_checkpoint`` with numpy scalar types allow-listed: NVIDIA-era files may store ``best_prec1`` as a
    numpy float, which ``weights_only=True`` otherwise rejects. Nothing executable is allow-listed."""
    import numpy as np

    safe: list = [np.dtype, np.ndarray]
    core = getattr(np, "_core", None) or getattr(np, "core")
    safe.append(core.multiarray.scalar)
    safe.append(core.multiarray._reconstruct)
    safe.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32"))
    with torch.serialization.safe_globals(safe):
        return load_checkpoint(path)


def width_spec_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    """The compact width spec implied by ``state_dict``'s producer shapes, or None when it is full width. Residual
    streams (``--chex-residual``) appear in it only when narrowed."""
    spec, narrowed = {}, False
    for g in resnet_groups(model, residual=True):
        w = state_dict.get(f"{g.producer}.weight")
        if w is None:
            return None  # let the key check report what is missing
        width = int(w.shape[0])
        if g.kind != "residual" or width != g.size:
            spec[g.name] = width
        narrowed |= width != g.size
    return spec if narrowed else None


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, arch: str,
                 cfg: Mapping[str, int] | None = None) -> nn.Module:
    """Load ``state_dict`` strictly into ``model`` (rebuilt to a compact width spec first when needed).

    The spec comes from ``cfg`` or, failing that, from the producer weight shapes, so compact files from other
    tools load too. Every mismatch (missing/unexpected keys, shapes) becomes one :class:`WeightsError` line that
    names the file and ``--arch``, instead of torch's multi-line ``RuntimeError``.
    """
    spec = dict(cfg) if isinstance(cfg, Mapping) else width_spec_from_state_dict(model, state_dict)
    if spec:
        unknown = sorted(set(spec) - {g.name for g in resnet_groups(model, residual=True)})
        if unknown:
            raise WeightsError(f"{source}: width spec names layers that --arch {arch} does not have "
                               f"({', '.join(unknown[:3])})")
        apply_width_spec(model, spec)
    problems = state_dict_problems(model.state_dict(), state_dict, optional=())
    if problems:
        raise WeightsError(f"{source} does not fit --arch {arch}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model


def masks_from_zeros(model: nn.Module, groups) -> dict[str, torch.Tensor]:
    """Keep-masks of a masked dense model (e.g. an upstream released checkpoint): a channel is pruned when its
    norm γ and β are both exactly zero (in every norm of a residual group), which makes its output identically zero
    whatever the convs compute.

    At least one channel is kept per group so the compact model stays a valid network.
    """
    named = dict(model.named_modules())
    masks = {}
    for g in groups:
        keep = torch.zeros(g.size, dtype=torch.bool, device=named[g.norm].weight.device)
        for n in g.norms:
            keep |= (named[n].weight.detach() != 0) | (named[n].bias.detach() != 0)
        if not bool(keep.any()):
            keep[0] = True
        masks[g.name] = keep.cpu()
    return masks


def dense_macs_of(arch: str, num_classes: int, cifar_stem: bool, image_size: int) -> int:
    """MACs of the unpruned architecture (batch 1, ``3×S×S``), the denominator of every reduction figure."""
    from chex_core import count_macs

    ref = build_model(arch, num_classes, cifar_stem=cifar_stem)
    return int(count_macs(ref, (3, image_size, image_size), zero_aware=False))


def reduction(part: float, whole: float) -> float:
    """``1 - part/whole`` in percent (0 when ``whole`` is 0)."""
    return 0.0 if whole == 0 or math.isnan(whole) else 100.0 * (1.0 - part / whole)
