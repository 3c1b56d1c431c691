"""Dense ResNet vs CHEX-compacted ResNets: FLOPs ratio next to measured speed-up, all in one run.

Widths: ``--widths-from FILE`` times the widths in a width-spec file — ``benchmarks/widths/resnet50_digits.json`` holds
widths from CHEX training (``benchmarks/width_specs.py``), and the README's table uses them. Without it, the widths
come from a short CHEX run on random data, made as follows (no ImageNet and no downloads here):
  1. ``torchvision.models.<arch>(weights=None)`` with seed ``--seed``; ``chex_core.resnet_groups`` (inner groups:
     Bottleneck conv1 and conv2; block outputs, stem, downsample and fc stay dense, as in the paper).
  2. For each budget (``--budgets``, G MACs at 224 px, ``chex_core.count_macs`` = the paper's convention; defaults
     are the upstream ResNet-50 table's 3G, 2G, 1G and 0.8G), a ``chex_core.ChannelExplorer`` with its defaults
     (QR column subset selection, importance regrowth, global |γ| allocation) explores for ``--mask-events`` events,
     one every ``--mask-steps-per-event`` SGD steps (lr 0.1, momentum 0.875, wd 3e-5) on *random* images of
     ``--mask-image-size`` px with random labels; δ0 = min(0.3, S/2), ΔT = 1 unit, T_max = the last event, so the last
     event regrows nothing.
  3. The global channel sparsity S is found by bisection: before the initial sub-model (uniform rule) and before every
     event, S is set so that the explorer's own allocation rule (``chex_core.allocate.keep_counts`` on the current
     γ·mask) gives the budget's MACs; the explorer then makes every decision itself. The final masked model's
     ``count_macs`` is checked against the budget (``--flops-tol``, default 2 %).
  4. ``chex_core.compact_model`` slices the masked model into a physically smaller one (its eval-mode output is
     checked against the masked model's); its width spec rebuilds a freshly initialised network
     (``chex_core.apply_width_spec``), which is what is timed — speed depends on the widths, not the values.
  Caveat: on random data γ barely moves in a few steps, so the global allocation mostly follows the explorer's
  random-init starting point and CSS choices — the widths are real CHEX masks at the right budget, but not the
  per-layer widths an ImageNet-trained CHEX run would pick. Latency depends on those widths.
  5. With ``--residual`` (default on) every budget is also explored with the residual streams as coupled groups
     (``--chex-residual``, docs/algorithm.md §2.1): row ``chex-res-<budget>``, same budget, same procedure, so the two
     kinds of compact model are timed side by side at equal MACs. With ``--widths-from`` those rows come from the
     file's ``chex-res-*`` entries (``benchmarks/width_specs.py train --residual``), and are skipped when it has none.

What is measured, side by side (every model in every round, rounds interleaved so machine-load drift hits all models
alike; the speed-up is the dense model's median time over the compact one's, both from this run):
  - latency at batch 1 and throughput at batch ``--batch`` (default 16), fp32, NCHW and channels_last, on CPU;
  - on CUDA (``--device cuda``, default when a GPU is visible) also AMP (fp16 autocast, channels_last) and a batch
    sweep (``--sweep``) of AMP throughput.

    python benchmarks/compact_speed.py                        # ResNet-50, 224 px, CPU (or GPU if present)
    python benchmarks/compact_speed.py --quick --out /tmp/q   # ResNet-18 at 64 px, 1-2 iterations: CI smoke
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

if __package__ in (None, ""):          # run as a script: make `benchmarks._common` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (WidthMacs, bisect_sparsity, machine_info, retarget_explorer, sync,  # noqa: E402
                                uniform_widths)
from benchmarks.width_specs import WidthSpecError, load_specs  # noqa: E402
from chex_core import (ChannelExplorer, ExplorationSchedule, apply_width_spec, compact_model,  # noqa: E402
                       count_macs, count_params, resnet_groups)

log = logging.getLogger("compact_speed")

FLOPS_SIZE = (3, 224, 224)          # the paper's FLOPs convention, whatever resolution the timing uses
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
_MASK_INFO = ("sparsity_initial", "sparsity_final", "events", "masked_macs", "macs_error", "compact_vs_masked_rel_err",
              "width_spec", "sparsity", "compact_top1", "epochs", "image_size", "command")


def chex_masks(arch: str, budget_macs: float, args: argparse.Namespace,
               residual: bool = False) -> tuple[nn.Module, list, dict, dict]:
    """Short CHEX run on random data that lands on ``budget_macs`` (see the module docstring, steps 1–3); with
    ``residual`` the residual streams are explored too (``resnet_groups(model, residual=True)``).

    Returns:
        (masked dense model in eval mode, groups, masks, info) — info holds S, events, achieved MACs.
    """
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, arch)(weights=None)
    groups = resnet_groups(model, residual=residual)
    macs_of = WidthMacs(model, groups, FLOPS_SIZE)
    s0, _ = bisect_sparsity(lambda s: uniform_widths(groups, s), macs_of, budget_macs)
    k = args.mask_steps_per_event
    schedule = ExplorationSchedule(1, args.mask_events, s0, min(0.3, s0 / 2), steps_per_unit=k)
    ex = ChannelExplorer(model, groups, schedule, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3e-5)
    ex.start(opt)
    gen = torch.Generator().manual_seed(args.seed)
    res = args.mask_image_size
    sparsities = []
    model.train()
    for step in range(1, args.mask_events * k + 1):
        x = torch.randn(args.mask_batch, 3, res, res, generator=gen)
        y = torch.randint(0, 1000, (args.mask_batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ex.schedule.is_event(step):
            sparsities.append(retarget_explorer(ex, macs_of, budget_macs))
        ex.after_step(step, opt)
    model.eval()
    macs = count_macs(model, FLOPS_SIZE)
    return model, groups, dict(ex.masks), {"sparsity_initial": s0, "sparsity_final": sparsities[-1],
                                           "events": ex.event_count, "masked_macs": macs,
                                           "macs_error": macs / budget_macs - 1}


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.float16) if enabled else contextlib.nullcontext()


def measure(models: dict[str, nn.Module], variants: list[tuple[str, bool, bool]], batches: list[int],
            image_size: int, device: torch.device, rounds: int, iters: dict[int, int], warmup: int,
            clock=time.perf_counter) -> dict:
    """Median seconds per forward for every (model, variant, batch), rounds interleaved across models.

    Args:
        clock: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU seconds: with one torch
            thread it is the compute time itself, unaffected by other programs competing for the cores).
        variants: ``(name, channels_last, amp)``.
        iters: batch → timed forwards per round.
    Returns:
        ``{(model, variant, batch): median seconds}``.
    """
    prepared = {}
    for mname, m in models.items():
        for vname, cl, _ in variants:
            mm = copy.deepcopy(m).to(device).eval()
            if cl:
                mm = mm.to(memory_format=torch.channels_last)
            prepared[(mname, vname)] = mm
    inputs = {}
    for b in batches:
        x = torch.randn(b, 3, image_size, image_size, generator=torch.Generator().manual_seed(b)).to(device)
        inputs[(b, False)] = x
        inputs[(b, True)] = x.contiguous(memory_format=torch.channels_last)
    samples: dict[tuple, list[float]] = {}
    with torch.inference_mode():
        for (mname, vname), mm in prepared.items():             # warm-up: allocator, oneDNN/cuDNN kernel choice
            cl, amp = next((c, a) for v, c, a in variants if v == vname)
            for b in batches:
                for _ in range(warmup):
                    with _autocast(device, amp):
                        mm(inputs[(b, cl)])
        sync(device)
        for r in range(rounds):
            for b in batches:
                for (mname, vname), mm in prepared.items():
                    cl, amp = next((c, a) for v, c, a in variants if v == vname)
                    x = inputs[(b, cl)]
                    for _ in range(iters[b]):
                        sync(device)
                        t = clock()
                        with _autocast(device, amp):
                            mm(x)
                        sync(device)
                        samples.setdefault((mname, vname, b), []).append(clock() - t)
            log.info("timing round %d/%d done", r + 1, rounds)
    return {k: statistics.median(v) for k, v in samples.items()}


def table(rows: list[dict], cols: list[tuple[str, str, int, str]]) -> str:
    """Markdown table: per model MACs, FLOPs ratio, params and each (variant, batch) measurement + speed-up."""
    head = ["model", "G MACs (224 px)", "FLOPs ratio", "params (M)"]
    for vname, _, b, kind in cols:
        head += [f"{kind} b{b} {vname}", "speed-up"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['macs'] / 1e9:.3f}", f"{r['flops_ratio']:.2f}×", f"{r['params'] / 1e6:.2f}"]
        for vname, _, b, kind in cols:
            key = f"{vname}_b{b}"
            val = f"{r['latency_ms'][key]:.1f} ms" if kind == "latency" else f"{r['throughput'][key]:.1f} img/s"
            cells += [val, f"{r['speedup'][key]:.2f}×"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _widths_note(args: argparse.Namespace) -> str:
    """Where the timed widths came from (one line for the report)."""
    if not args.widths_from:
        return (f"Widths: a short CHEX run on random {args.mask_image_size} px images ({args.mask_events} events of "
                f"{args.mask_steps_per_event} SGD steps), S bisected onto each budget.")
    prov = getattr(args, "widths_provenance", {}) or {}
    first = next(iter(args.reused.values()), {})
    how = prov.get("what", "")
    if first.get("epochs"):
        how += f"; {first['epochs']} epochs at {first.get('image_size')} px, e.g. `{first.get('command', '')}`"
    return f"Widths: `{args.widths_from}`" + (f" ({how})." if how else ".")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=ARCHS, help="torchvision architecture (default resnet50)")
    p.add_argument("--budgets", type=float, nargs="+", default=[3.0, 2.0, 1.0, 0.8],
                   help="compact model budgets in G MACs at 224 px (default: the upstream table's 3 2 1 0.8)")
    p.add_argument("--image-size", type=int, default=224, help="timing resolution in px (default 224)")
    p.add_argument("--batch", type=int, default=16, help="throughput batch size (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--iters", type=int, default=5, help="timed batch-1 forwards per model per round (default 5)")
    p.add_argument("--iters-batch", type=int, default=2,
                   help="timed large-batch forwards per model per round (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model and batch (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sweep", type=int, nargs="*", default=[1, 8, 32, 64, 128, 256],
                   help="CUDA only: AMP batch sweep sizes (default 1 8 32 64 128 256)")
    p.add_argument("--mask-events", type=int, default=4, help="CHEX events in the mask run (default 4)")
    p.add_argument("--mask-steps-per-event", type=int, default=2, help="SGD steps between events (default 2)")
    p.add_argument("--mask-batch", type=int, default=8, help="mask-run batch size (default 8)")
    p.add_argument("--mask-image-size", type=int, default=64,
                   help="mask-run image size in px (widths do not depend on it; default 64)")
    p.add_argument("--flops-tol", type=float, default=0.02,
                   help="allowed relative MACs mismatch vs each budget (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="model init / mask-run seed (default 0)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time with 1 torch thread, a load-independent "
                        "compute cost for a shared machine (CPU only; default wall)")
    p.add_argument("--widths-from", type=Path, default=None,
                   help="time the widths in this file instead of a new mask run on random data: a width-spec JSON "
                        "(benchmarks/width_specs.py; benchmarks/widths/resnet50_digits.json holds widths from CHEX "
                        "training) or an earlier compact_speed result JSON")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="also time, per budget, a model explored with the residual streams as coupled groups "
                        "(--chex-residual; rows chex-res-<budget>): from a mask run, or with --widths-from from the "
                        "file's chex-res-* entries when it has them (default: on)")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="also time each CHEX model with every pruned width rounded up to a multiple of N (the "
                        "--round-to training option's effect; default 1 = off)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: resnet18, budgets 1.2 0.8 G, 64 px, batch 4, 1 round of 1 iteration")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.budgets, args.image_size, args.batch = "resnet18", [1.2, 0.8], 64, 4
        args.rounds, args.iters, args.iters_batch, args.warmup = 1, 1, 1, 1
        args.mask_events, args.mask_steps_per_event, args.mask_batch, args.mask_image_size = 2, 1, 2, 32
        args.sweep = [1, 4]
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: {args.device!r} is not a torch device (use cpu or cuda)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch sees no GPU")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device}")
    for flag in ("image_size", "batch", "rounds", "iters", "iters_batch", "mask_events", "mask_steps_per_event",
                 "mask_batch", "mask_image_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.clock == "cpu":
        if args.device.type != "cpu":
            p.error("--clock cpu measures CPU time and needs --device cpu")
        torch.set_num_threads(1)      # CPU time of one thread = compute time; more threads would count spin-waits
    if args.widths_from is not None and not args.widths_from.is_file():
        p.error(f"--widths-from: no such file {args.widths_from}")
    if args.round_to < 1:
        p.error(f"--round-to must be >= 1, got {args.round_to}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if any(b < 1 for b in args.sweep):
        p.error(f"--sweep batch sizes must be >= 1, got {args.sweep}")
    dense = count_macs(getattr(torchvision.models, args.arch)(weights=None), FLOPS_SIZE, zero_aware=False)
    bad = [b for b in args.budgets if not 0 < b * 1e9 < dense]
    if bad:
        p.error(f"--budgets {bad} must be between 0 and the dense {args.arch}'s {dense / 1e9:.2f} G MACs")
    args.reused = {}
    if args.widths_from is not None:
        try:
            saved = load_specs(args.widths_from)
        except WidthSpecError as exc:
            p.error(f"--widths-from: {exc}")
        args.reused, arch, args.widths_provenance = saved["specs"], saved["arch"], saved["provenance"]
        if arch != args.arch:
            p.error(f"--widths-from: {args.widths_from} holds {arch} widths, not --arch {args.arch}")
        missing = [f"chex-{b:g}G" for b in args.budgets if f"chex-{b:g}G" not in args.reused]
        if missing:
            p.error(f"--widths-from: {args.widths_from} has no {missing} (has {sorted(args.reused)})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("chex_core").setLevel(logging.WARNING)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.set_flush_denormal(True)          # no denormal slow path on CPU skewing one model's timing
    load_before = machine_info().get("loadavg_1m")

    torch.manual_seed(args.seed)
    dense = getattr(torchvision.models, args.arch)(weights=None).eval()
    models, info = {"dense": dense}, {"dense": {}}
    jobs = [(b, res) for b in args.budgets for res in ((False, True) if args.residual else (False,))]
    if args.widths_from and args.residual:          # one table, one source of widths: no random-data rows mixed in
        absent = [f"chex-res-{b:g}G" for b in args.budgets if f"chex-res-{b:g}G" not in args.reused]
        if absent:
            log.warning("%s has no %s: those residual-group rows are skipped (make them with "
                        "benchmarks/width_specs.py train --residual)", args.widths_from, absent)
        jobs = [(b, res) for b, res in jobs if not res or f"chex-res-{b:g}G" in args.reused]
    for b, residual in jobs:
        t = time.perf_counter()
        name = f"chex-{'res-' if residual else ''}{b:g}G"
        if name in args.reused:
            minfo = {k: v for k, v in args.reused[name].items() if k in _MASK_INFO}
            spec, groups = minfo["width_spec"], resnet_groups(dense, residual=residual)
            minfo["widths_from"] = str(args.widths_from)
        else:
            masked, groups, masks, minfo = chex_masks(args.arch, b * 1e9, args, residual)
            small, spec = compact_model(masked, groups, masks)
            small.eval()
            x = torch.randn(2, 3, args.mask_image_size, args.mask_image_size)
            with torch.inference_mode():
                ref = masked(x)
                minfo["compact_vs_masked_rel_err"] = float((small(x) - ref).abs().max() / ref.abs().max())
        # time a freshly initialised network of the compact architecture: speed depends on the widths only, and the
        # few random-data steps leave activations large enough that value-dependent CPU paths could skew timings
        torch.manual_seed(args.seed)
        small = apply_width_spec(getattr(torchvision.models, args.arch)(weights=None), spec).eval()
        minfo["compact_macs"] = count_macs(small, FLOPS_SIZE)
        inner = {g.name: g.size for g in groups if g.kind == "inner"}
        minfo["keep_fraction_per_stage"] = {
            stage: round(sum(w for n, w in spec.items() if n in inner and n.startswith(stage)) /
                         sum(size for n, size in inner.items() if n.startswith(stage)), 3)
            for stage in ("layer1", "layer2", "layer3", "layer4")}
        minfo["keep_fraction_residual"] = {g.name: round(spec[g.name] / g.size, 3) for g in groups
                                           if g.kind == "residual" and g.name in spec}
        minfo["width_spec"] = spec
        models[name], info[name] = small, minfo
        if args.round_to > 1:
            # the same widths rounded up to multiples of N (what --round-to N would have kept), capped at dense
            sizes = {g.name: g.size for g in groups if g.kind != "downsample"}
            rspec = {n: min(sizes[n], -(-w // args.round_to) * args.round_to) for n, w in spec.items()}
            torch.manual_seed(args.seed)
            rsmall = apply_width_spec(getattr(torchvision.models, args.arch)(weights=None), rspec).eval()
            rname = f"{name}-round{args.round_to}"
            models[rname] = rsmall
            info[rname] = {**minfo, "width_spec": rspec, "round_to": args.round_to,
                           "compact_macs": count_macs(rsmall, FLOPS_SIZE)}
        minfo["macs_error"] = minfo["compact_macs"] / (b * 1e9) - 1
        log.info("%s: MACs %.3f G (%+.2f %% vs budget), keep per stage %s, residual streams %s (%.0f s)%s", name,
                 minfo["compact_macs"] / 1e9, 100 * minfo["macs_error"], minfo["keep_fraction_per_stage"],
                 minfo["keep_fraction_residual"], time.perf_counter() - t, "" if args.widths_from else
                 f"; S {minfo['sparsity_initial']:.3f} → {minfo['sparsity_final']:.3f}, {minfo['events']} events, "
                 f"compact vs masked rel. err {minfo['compact_vs_masked_rel_err']:.1e}")
        if abs(minfo["macs_error"]) > args.flops_tol:
            log.warning("%s misses its budget by %+.2f %% (tolerance %.0f %%)", name, 100 * minfo["macs_error"],
                        100 * args.flops_tol)

    variants = [("fp32", False, False), ("fp32-cl", True, False)]
    if device.type == "cuda":
        variants.append(("amp-cl", True, True))
    batches = sorted({1, args.batch})
    iters = {b: (args.iters if b == 1 else args.iters_batch) for b in batches}
    t_meas = time.perf_counter()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = measure(models, variants, batches, args.image_size, device, args.rounds, iters, args.warmup, clock)
    sweep_times = {}
    if device.type == "cuda" and args.sweep:
        sweep_times = measure(models, [("amp-cl", True, True)], sorted(set(args.sweep)), args.image_size, device,
                              args.rounds, {b: args.iters for b in args.sweep}, args.warmup)
    meas_s = time.perf_counter() - t_meas

    all_times = {**times, **{(m, f"sweep-{v}", b): t for (m, v, b), t in sweep_times.items()}}
    rows = []
    dense_macs = count_macs(dense, FLOPS_SIZE)
    for name, m in models.items():
        macs = count_macs(m, FLOPS_SIZE)
        row = {"model": name, "macs": macs, "flops_ratio": dense_macs / macs, "params": count_params(m),
               "latency_ms": {}, "throughput": {}, "speedup": {}, **info[name]}
        for (mname, vname, b), t in all_times.items():
            if mname == name:
                key = f"{vname}_b{b}"
                row["latency_ms"][key] = 1e3 * t
                row["throughput"][key] = b / t
                row["speedup"][key] = all_times[("dense", vname, b)] / t
        rows.append(row)

    cols = [(v, cl, 1, "latency") for v, cl, _ in variants] + [(v, cl, args.batch, "throughput")
                                                               for v, cl, _ in variants]
    meta = {"machine": machine_info(), "device": str(device), "arch": args.arch, "image_size": args.image_size,
            "batch": args.batch, "rounds": args.rounds, "iters": args.iters, "iters_batch": args.iters_batch,
            "measure_s": meas_s, "clock": args.clock, "loadavg_1m_before": load_before, "command": " ".join(sys.argv)}
    meta["loadavg_1m_after"] = meta["machine"].get("loadavg_1m")
    where = f"GPU {meta['machine']['gpu']}" if device.type == "cuda" else \
        f"{meta['machine']['cpu_count']}-core CPU, no GPU, {meta['machine']['torch_threads']} torch threads"
    what = "process CPU time (1 thread)" if args.clock == "cpu" else "wall time"
    md = [f"{args.arch} at {args.image_size} px on {where}; timing = {what}; FLOPs = `chex_core.count_macs` at 224 px; speed-up = "
          f"dense time / model time, medians of {args.rounds} interleaved rounds in this one run; 1-min load average "
          f"{load_before} before / {meta['loadavg_1m_after']} after.", "", _widths_note(args), "", table(rows, cols)]
    if sweep_times:
        md += ["", "AMP (fp16, channels_last) batch sweep, images/s (speed-up vs dense):", "",
               "| model | " + " | ".join(f"b{b}" for b in sorted(set(args.sweep))) + " |",
               "|" + "---|" * (len(set(args.sweep)) + 1)]
        for r in rows:
            md.append(f"| {r['model']} | " + " | ".join(
                f"{r['throughput'][f'sweep-amp-cl_b{b}']:.0f} ({r['speedup'][f'sweep-amp-cl_b{b}']:.2f}×)"
                for b in sorted(set(args.sweep))) + " |")
    md = "\n".join(md) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compact_speed_{args.arch}_{device.type}" + ("_cputime" if args.clock == "cpu" else "") + \
        (f"_round{args.round_to}" if args.round_to > 1 else "") + \
        ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log.info("wrote %s/%s.{json,md}", args.out, stem)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
