"""Compact models: the one compact-checkpoint format of CLS, DET and SEG, and deployment exports (ONNX with
onnxruntime parity, torch.export).

The *compact checkpoint* is a plain dict, loadable with ``torch.load(weights_only=True)`` and free of this project's
classes, so it can be read anywhere torch exists::

    {"format": "chex-compact", "version": 1, "task": "CLS",    # which task folder rebuilds the network
     "state_dict": {name: tensor},           # the whole network, its explored part physically smaller (CPU)
     "module": "",                           # dotted path of the explored sub-module ("backbone" in DET,
                                             # "backbone.body" in SEG, "" = the whole model in CLS)
     "width_spec": {"layer1.0.conv1": 23, ...},  # chex_core.compact_model's spec: channel group (relative to
                                                 # "module": a producer conv, or a stream "layer2.residual"
                                                 # after --chex-residual) -> kept channels
     ...task metadata: CLS "arch", "num_classes", "cifar_stem", "image_size"; DET "backbone", "label_map"...}

Rebuild: the task's dense network, ``chex_core.apply_width_spec(model, width_spec, groups=...)`` with the task's
channel groups found within ``module`` (``CLS``: ``apply_width_spec(model, width_spec)``; DET and SEG:
``channel_groups(model, residual=True)``, whose streams also narrow the heads or FPN laterals reading them), then a
strict ``load_state_dict``. :func:`read_compact` also reads the earlier per-task layouts (CLS ``compact.pth``
``{state_dict, cfg}``, DET ``model_compact.pt`` ``{model, width_spec}``, SEG ``model_compact.pth``
``{model, body_spec}``). Channel removal itself is ``chex_core.compact_model``; nothing here re-implements it.

Exports (both traced with an example batch ``(B, 3, H, W)`` float32; the batch dimension stays dynamic by default):

- ONNX via ``torch.onnx.export(..., dynamo=True)`` at opset >= 17; :func:`onnx_parity` compares onnxruntime's CPU
  output with the eager model's;
- ``torch.export.export`` → ``ExportedProgram``, saved with ``torch.export.save`` (``.pt2``); TorchScript is
  deprecated upstream and is not offered.
"""
from __future__ import annotations

import io
import logging
import os
import pickletools
import zipfile
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from chex_core.checkpoint import save_checkpoint
from chex_core.flops import count_macs, count_params, flop_counter_macs

__all__ = ["MIN_OPSET", "DEFAULT_OPSET", "PORTABLE_MODULES", "ExportError", "COMPACT_FORMAT", "CompactFile",
           "compact_checkpoint", "read_compact", "make_compact_checkpoint", "save_compact_checkpoint",
           "checkpoint_globals", "assert_portable", "flops_report", "example_input", "export_onnx", "onnx_parity",
           "export_program", "program_parity"]

log = logging.getLogger(__name__)

# opset 17 is the oldest the dynamo exporter targets without a version-conversion pass.
MIN_OPSET = 17
DEFAULT_OPSET = 18
# Top-level modules a portable checkpoint's pickle may reference (tensor rebuild helpers, OrderedDict).
PORTABLE_MODULES = frozenset({"torch", "collections", "builtins", "_codecs"})


class ExportError(RuntimeError):
    """A checkpoint is not portable, or an exported graph disagrees with the eager model."""


# ---------------------------------------------------------------------------------------------- compact checkpoints
COMPACT_FORMAT = "chex-compact"


class CompactFile(NamedTuple):
    """What :func:`read_compact` found: the whole model's state dict, the width spec and where it applies."""

    state_dict: dict
    width_spec: dict
    module: str


def compact_checkpoint(model: nn.Module, width_spec: Mapping[str, int], *, task: str, module: str = "",
                       meta: Mapping | None = None) -> dict:
    """The compact checkpoint dict of ``model`` (whole network, explored part compact) and its width spec."""
    return {"format": COMPACT_FORMAT, "version": 1, "task": str(task),
            # dict(), not the module's OrderedDict with _metadata: only plain containers go into the pickle
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "module": str(module), "width_spec": {str(k): int(v) for k, v in width_spec.items()},
            **dict(meta or {})}


def read_compact(obj: Mapping) -> CompactFile | None:
    """The compact model in ``obj`` (this format or the earlier CLS/DET/SEG ones), or None if ``obj`` is not one."""
    if obj.get("format") == COMPACT_FORMAT:
        return CompactFile(dict(obj["state_dict"]), dict(obj["width_spec"]), str(obj.get("module", "")))
    for weights, spec, module in (("state_dict", "cfg", ""), ("model", "width_spec", "backbone"),
                                  ("model", "body_spec", "backbone.body")):
        if isinstance(obj.get(weights), Mapping) and isinstance(obj.get(spec), Mapping) and obj[spec]:
            return CompactFile(dict(obj[weights]), dict(obj[spec]), module)
    return None


def make_compact_checkpoint(model: nn.Module, width_spec: Mapping[str, int], *, arch: str, num_classes: int,
                            image_size: int, cifar_stem: bool = False) -> dict:
    """The compact checkpoint of a CLS ResNet from ``chex_core.compact_model``."""
    return compact_checkpoint(model, width_spec, task="CLS",
                              meta={"arch": str(arch), "num_classes": int(num_classes), "cifar_stem": bool(cifar_stem),
                                    "image_size": int(image_size)})


def save_compact_checkpoint(ckpt: Mapping, path: str) -> str:
    """Atomic write via ``chex_core.checkpoint.save_checkpoint`` (any rank: export is a single-process job)."""
    return save_checkpoint(ckpt, path, all_ranks=True)


def checkpoint_globals(path: str) -> set[str]:
    """Every ``module.qualname`` global that a ``torch.save`` file's pickle references (read without unpickling)."""
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"))
    except (zipfile.BadZipFile, StopIteration, OSError) as e:
        raise ExportError(f"{path} is not a torch.save zip archive: {e}") from e
    # Track what each push put on the stack (strings, memo fetches) so STACK_GLOBAL's two operands are known even
    # when the pickler re-uses a memoised module string.
    found: set[str] = set()
    pushed: list = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(arg))
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name == "STACK_GLOBAL":
            mod, name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else ("?", "?")
            found.add(f"{mod}.{name}")
            pushed.append(None)
        elif op.name in ("GLOBAL", "INST"):
            found.add(str(arg).replace(" ", "."))
            pushed.append(None)
        elif op.stack_after and op.name not in ("MARK", "STOP"):
            pushed.append(None)  # some other value (tuple, dict, int...) now on top
    return found


def assert_portable(path: str) -> set[str]:
    """Raise :class:`ExportError` unless the file loads with ``weights_only=True`` and its pickle names only
    :data:`PORTABLE_MODULES` globals (so no class of this project is needed to read it). Returns the globals."""
    refs = checkpoint_globals(path)
    foreign = sorted(r for r in refs if r.split(".")[0] not in PORTABLE_MODULES)
    if foreign:
        raise ExportError(f"{path} references non-torch globals {foreign[:5]}; it needs more than torch to load")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types
        raise ExportError(f"{path} does not load with weights_only=True: {str(e).splitlines()[0][:200]}") from e
    return refs


def flops_report(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """MACs (paper "FLOPs", batch 1), FlopCounterMode MACs and parameters of ``model`` for a ``(C, H, W)`` input."""
    return {"macs": count_macs(model, input_size, zero_aware=False),
            "flop_counter_macs": flop_counter_macs(model, input_size),
            "params": count_params(model, zero_aware=False)}


# ------------------------------------------------------------------------------------------------------- exports
def example_input(input_size: Sequence[int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A reproducible ``(batch, C, H, W)`` float32 normal tensor (values only matter for parity checks)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *[int(s) for s in input_size], generator=g)


def _batch_dim(dynamic_batch: bool):
    # min=1 so batch-1 serving is allowed; the example batch must be ≥ 2 or torch.export specialises the dimension.
    return ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None


def export_onnx(model: nn.Module, path: str, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True) -> str:
    """Write ``model`` (switched to eval) to ONNX at ``path``; input ``images`` ``(B, C, H, W)``, output ``logits``.

    Raises ``ValueError`` for ``opset < 17`` and :class:`ExportError` if the ONNX checker rejects the file.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError("a dynamic-batch export needs an example batch of at least 2")
    model.eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.onnx.export(model, (example,), path, dynamo=True, opset_version=opset, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=_batch_dim(dynamic_batch), external_data=False)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"ONNX checker rejected {path}: {str(e).splitlines()[0]}") from e
    return path


@torch.no_grad()
def onnx_parity(model: nn.Module, path: str, inputs: Sequence[torch.Tensor], *, atol: float = 1e-4,
                rtol: float = 1e-3) -> float:
    """Max |onnxruntime − eager| over ``inputs``; raises :class:`ExportError` if any element exceeds atol+rtol·|ref|."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    model.eval()
    worst = 0.0
    for x in inputs:
        ref = model(x)
        got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        worst = max(worst, _check_close(ref, got, atol, rtol, f"onnxruntime({os.path.basename(path)})", x))
    return worst


def export_program(model: nn.Module, example: torch.Tensor, path: str | None = None, *,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode; saved to ``path`` (``.pt2``) when given."""
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError("a dynamic-batch export needs an example batch of at least 2")
    model.eval()
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim(dynamic_batch))
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.export.save(program, path)
    return program


@torch.no_grad()
def program_parity(model: nn.Module, program: torch.export.ExportedProgram | str, inputs: Sequence[torch.Tensor],
                   *, atol: float = 1e-5, rtol: float = 1e-4) -> float:
    """Max |program − eager| over ``inputs`` (``program`` may be a saved ``.pt2`` path); raises on a mismatch."""
    if isinstance(program, str):
        program = torch.export.load(program)
    run = program.module()
    model.eval()
    worst = 0.0
    for x in inputs:
        worst = max(worst, _check_close(model(x), run(x), atol, rtol, "torch.export program", x))
    return worst


def _check_close(ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float, what: str,
                 x: torch.Tensor) -> float:
    if got.shape != ref.shape:
        raise ExportError(f"{what}: output shape {tuple(got.shape)} != eager {tuple(ref.shape)} "
                          f"for input {tuple(x.shape)}")
    err = (got - ref).abs()
    bad = err > atol + rtol * ref.abs()
    if bool(bad.any()):
        raise ExportError(f"{what}: {int(bad.sum())} of {ref.numel()} outputs differ from eager for input "
                          f"{tuple(x.shape)} (max abs error {float(err.max()):.3g}, atol {atol}, rtol {rtol})")
    return float(err.max())
