"""Compact inference: dense ResNet-50 vs the CHEX widths, fp16 + channels_last, eager and ``torch.compile``.

The models are built from a width-spec file (``benchmarks/width_specs.py``; by default the committed widths from CHEX
training) with ``chex_core.apply_width_spec``, each also with every width rounded up to a multiple of ``round_to``
(what ``--round-to 8`` would keep; 8 fp16 channels fill a tensor-core tile). Values are random: speed depends on the
widths only. Each model runs in half precision (fp16 weights and inputs, the deployment path; bf16 on CPU) in channels_last,
at batch 1 (latency) and 256 (throughput), eagerly and compiled (Inductor on GPU, one static-shape compile per batch
size). Timings are CUDA-event medians, models interleaved round by round; every speed-up is dense's time over the
model's in the same variant and batch.

Compiling takes tens of seconds per (model, batch); compile jobs run dense first and then in the width file's order,
and stop when the run's time budget gets short (those cells are reported as skipped, never estimated).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from benchmarks.width_specs import build_compact, group_sizes, load_specs, rounded
from chex_core import count_macs, count_params

from .common import Config, Deadline, median, time_once

CL = torch.channels_last
COMPILE_RESERVE_S = 60.0       # time left for the sections after this one


def build_models(cfg: Config) -> tuple[dict[str, nn.Module], dict]:
    """``{"dense": …, "chex-1G": …, "chex-1G-round8": …}`` and the width file's metadata."""
    data = load_specs(cfg.widths)
    arch, specs = data["arch"], data["specs"]
    # default: the internal-only specs (the upstream kind), as before chex-res-* specs joined the file; time those
    # with --budgets chex-res-1G ...
    names = list(cfg.budgets) or [n for n in specs if not n.startswith("chex-res-")]
    missing = [n for n in names if n not in specs]
    if missing:
        raise ValueError(f"--budgets {missing} not in {cfg.widths} (has {sorted(specs)})")
    sizes = group_sizes(arch, residual=True)    # chex-res-* specs (--chex-residual runs) round their streams too
    models = {"dense": build_compact(arch, sizes, cfg.seed)}
    for n in names:
        models[n] = build_compact(arch, specs[n]["width_spec"], cfg.seed)
        if cfg.round_to > 1:
            models[f"{n}-round{cfg.round_to}"] = build_compact(arch, rounded(specs[n]["width_spec"], sizes,
                                                                               cfg.round_to), cfg.seed)
    return models, {"arch": arch, "source": data["source"], "provenance": data.get("provenance", {})}


def run(cfg: Config, deadline: Deadline | None = None) -> dict:
    deadline = deadline or Deadline(float("inf"))
    models, meta = build_models(cfg)
    dtype, dev = cfg.amp_dtype, cfg.device
    facts = {n: {"macs": count_macs(m, (3, 224, 224), zero_aware=False), "params": count_params(m, zero_aware=False)}
             for n, m in models.items()}
    eager = {n: copy.deepcopy(m).eval().to(dev, dtype=dtype, memory_format=CL) for n, m in models.items()}
    inputs = {b: torch.randn(b, 3, cfg.image_size, cfg.image_size, device=dev, dtype=dtype).contiguous(memory_format=CL)
              for b in cfg.infer_batches}
    fns = {(n, "eager", b): (lambda m=m, x=x: m(x)) for n, m in eager.items() for b, x in inputs.items()}
    compile_s, skipped = {}, []
    if cfg.compile:
        order = list(eager)[: cfg.compile_models or None]
        compiled = {n: torch.compile(eager[n], backend=cfg.compile_backend, dynamic=False) for n in order}
        for b in cfg.compile_batches or cfg.infer_batches:     # every model at one batch before the next batch
            for n in order:
                if deadline.left() < COMPILE_RESERVE_S + max(compile_s.values(), default=0.0):
                    skipped.append(f"{n} b{b}")
                    continue
                t = time.perf_counter()
                with torch.inference_mode():
                    compiled[n](inputs[b])        # compiles (Dynamo + the backend) for this batch size
                compile_s[f"{n} b{b}"] = time.perf_counter() - t
                fns[(n, "compile", b)] = (lambda m=compiled[n], x=inputs[b]: m(x))
    samples: dict[tuple, list[float]] = {}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(cfg.infer_warmup):
                fn()
        for _ in range(cfg.infer_rounds):
            for key, fn in fns.items():
                samples.setdefault(key, []).extend(time_once(fn, dev) for _ in range(cfg.infer_iters))
    return {"ok": True, "problems": [], "dtype": str(dtype), "widths": meta, "models": rows(models, facts, samples),
            "compile_s": compile_s, "compile_skipped_for_time": skipped,
            "compile_backend": cfg.compile_backend if cfg.compile else None, "batches": list(cfg.infer_batches)}


def rows(models: dict, facts: dict, samples: dict) -> list[dict]:
    """Per model: MACs, params, and per (variant, batch) median ms, images/s and speed-up vs dense."""
    t = {k: median(v) for k, v in samples.items()}
    out = []
    for n in models:
        r = {"model": n, "macs": facts[n]["macs"], "params": facts[n]["params"],
             "flops_ratio": facts["dense"]["macs"] / facts[n]["macs"], "ms": {}, "images_per_s": {}, "speedup": {}}
        for (m, variant, b), s in t.items():
            if m != n:
                continue
            key = f"{variant}_b{b}"
            r["ms"][key], r["images_per_s"][key] = 1e3 * s, b / s
            if ("dense", variant, b) in t:
                r["speedup"][key] = t[("dense", variant, b)] / s
        out.append(r)
    base = {r["model"]: r for r in out}
    for r in out:                                   # effect of rounding: rounded model vs the unrounded one
        if "-round" in r["model"]:
            plain = base[r["model"].rsplit("-round", 1)[0]]
            r["vs_unrounded"] = {k: plain["ms"][k] / v for k, v in r["ms"].items() if k in plain["ms"]}
    return out
