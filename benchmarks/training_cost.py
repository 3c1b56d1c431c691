"""What a CHEX training run costs in wall-clock time: dense vs masked CHEX vs physically compact CHEX (issue 9).

Measured side by side in one run (configurations interleaved step by step, so machine noise hits all alike):
  - a dense training step (forward + backward + SGD momentum step);
  - masked CHEX at S (upstream: dense compute, plus the per-step mask re-application);
  - compact CHEX at S (``chex_core.physical.PhysicalTraining``: the model holds only the active channels);
  - compact steps at a few more densities k (kept fraction of prunable channels) for the projection;
  - one exploration event, masked (``explore``) and compact (widen → explore → narrow → optimizer rebuild).
Widths are uniform per group at density k (CHEX allocates globally; the per-step cost depends mostly on k).
Every step is timed twice: wall clock and process CPU time (``time.process_time``). With one thread on a CPU they
agree on an idle machine; on a shared, oversubscribed machine (the CI box runs other jobs) the wall clock includes
time spent waiting for a core, while CPU time is what the step itself costs. Medians of both are reported and the
projection is printed for both; on CUDA only the wall clock is meaningful.

One *epoch-equivalent* here is ``--steps`` steps; its time is the median step time × steps. The whole-run projection
applies the measured per-image times to the upstream ResNet-50 recipe — 250 epochs of ImageNet (1 281 167 images),
events every ΔT = 2 epochs up to T_max = 180, δ0 = 0.3 — where compact training runs epoch e at density
k_e = 1 − S + δ_t (δ_t = δ0·(1+cos(π t/T_max))/2 at the last event t ≤ e, δ0 before the first) and the step
time at k_e is interpolated linearly between the measured densities. Events add their measured time each.

    python benchmarks/training_cost.py                      # ResNet-50, 128 px, batch 16, CPU, 1 thread
    python benchmarks/training_cost.py --device cuda --amp --image-size 224 --batch 128   # when a GPU is there
    python benchmarks/training_cost.py --quick              # seconds, for a CI smoke
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time

import torch
import torchvision
from torch import nn

from chex_core import ChannelExplorer, ExplorationSchedule, count_macs, resnet_groups
from chex_core.physical import PhysicalTraining

IMAGENET_TRAIN = 1_281_167


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def upstream_sgd(model: nn.Module) -> torch.optim.SGD:
    """The NVIDIA/upstream recipe: SGD momentum 0.875, wd 3.05e-5, BN without weight decay."""
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)}
    return torch.optim.SGD([{"params": [p for p in model.parameters() if id(p) not in bn], "weight_decay": 3.05e-5},
                            {"params": [p for p in model.parameters() if id(p) in bn], "weight_decay": 0.0}],
                           lr=0.256, momentum=0.875)


class Runner:
    """One training configuration: ``step()`` runs forward, backward, optimizer step and its CHEX hook."""

    def __init__(self, name: str, arch: str, kind: str, density: float, args, device: torch.device):
        self.name, self.kind, self.density = name, kind, density
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None, num_classes=args.num_classes).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.opt, self.hook, self.phys, self.explorer = model, upstream_sgd(model), None, None, None
        self.step_count = 0
        if kind in ("masked", "compact"):
            groups = resnet_groups(model)
            # delta0 = 0: the sub-model is at density k = 1 - S from the start (uniform widths); a far event keeps
            # the schedule valid without events during timing
            sched = ExplorationSchedule(10**6, 10**6, 1.0 - density, 0.0, steps_per_unit=1)
            self.explorer = ChannelExplorer(model, groups, sched, criterion=args.criterion, seed=0)
            self.explorer.start(self.opt)
            if kind == "compact":
                self.phys = PhysicalTraining(model, self.explorer, self.opt)
                self.phys.start()
        self.macs = count_macs(self.model, (3, args.image_size, args.image_size))
        self.times: list[float] = []

    @property
    def train_model(self) -> nn.Module:
        return self.phys.train_model if self.phys is not None else self.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.phys.optimizer if self.phys is not None else self.opt

    def step(self, x: torch.Tensor, y: torch.Tensor, amp: bool, device: torch.device) -> tuple[float, float]:
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        opt = self.optimizer
        with torch.autocast(device.type, enabled=amp,
                            dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
            loss = nn.functional.cross_entropy(self.train_model(x), y)
        loss.backward()   # AMP fp16 without a scaler is fine for timing (a scaler adds no per-width cost)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.phys is not None:
            self.phys.after_step(self.step_count, opt)
        elif self.explorer is not None:
            self.explorer.after_step(self.step_count, opt)
        _sync(device)
        return time.perf_counter() - t, time.process_time() - c


def event_times(arch: str, sparsity: float, delta0: float, args, device: torch.device) -> dict:
    """Median time of one exploration event, ``{clock: {"masked": s, "compact": s}}``: masked (``explore``) and
    compact (widen, explore, narrow, rebuild the optimizer). Events are forced every step with a long T_max so δ
    stays near δ0."""
    out = {}
    for kind in ("masked", "compact"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None, num_classes=args.num_classes).to(device)
        opt = upstream_sgd(model)
        sched = ExplorationSchedule(1, 10**6, sparsity, delta0, steps_per_unit=1)
        ex = ChannelExplorer(model, resnet_groups(model), sched, criterion=args.criterion, seed=0)
        ex.start(opt)
        phys = None
        if kind == "compact":
            phys = PhysicalTraining(model, ex, opt)
            phys.start()
        times = []
        for step in range(1, args.events + 1):
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            if phys is not None:
                phys.after_step(step, phys.optimizer)
            else:
                ex.after_step(step, opt)
            _sync(device)
            times.append((time.perf_counter() - t, time.process_time() - c))
        for i, clock in enumerate(("wall", "cpu")):
            out.setdefault(clock, {})[kind] = statistics.median(t[i] for t in times)
    return out


def density_curve(sparsity: float, delta0: float, epochs: int, delta_t: int, t_max: int) -> list[float]:
    """Kept fraction of prunable channels during each epoch of the recipe (1 − S + δ of the last event)."""
    curve = []
    for e in range(epochs):
        last = (min(e, t_max) // delta_t) * delta_t          # last event epoch ≤ e (0 = the initial sub-model)
        delta = delta0 * (1.0 + math.cos(math.pi * min(last, t_max) / t_max)) / 2.0 if last else delta0
        curve.append(1.0 - sparsity + delta)
    return curve


def interpolate(points: dict[float, float], k: float) -> float:
    """Piecewise-linear interpolation of ``points`` ({density: value}), clamped at the ends."""
    xs = sorted(points)
    if k <= xs[0]:
        return points[xs[0]]
    if k >= xs[-1]:
        return points[xs[-1]]
    for a, b in zip(xs, xs[1:]):
        if a <= k <= b:
            w = (k - a) / (b - a)
            return points[a] * (1 - w) + points[b] * w
    raise AssertionError("unreachable")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="torchvision architecture, built with weights=None (default resnet50)")
    p.add_argument("--batch", type=int, default=16, help="training batch size per step (default 16)")
    p.add_argument("--image-size", type=int, default=128, help="input resolution in pixels (default 128)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration = one epoch-equivalent")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first (default 1)")
    p.add_argument("--events", type=int, default=2, help="timed exploration events per mode (default 2)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7],
                   help="channel sparsities S compared with dense (default 0.5 0.7)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.85, 0.7, 0.6],
                   help="extra compact densities k measured for the projection, besides 1 and 1-S")
    p.add_argument("--epochs", type=int, default=250, help="recipe epochs for the projection (default 250)")
    p.add_argument("--delta-t", type=int, default=2, help="recipe ΔT in epochs (default 2)")
    p.add_argument("--t-max", type=int, default=180, help="recipe T_max in epochs (default 180)")
    p.add_argument("--delta0", type=float, default=0.3, help="recipe δ0, capped at S (default 0.3)")
    p.add_argument("--criterion", default="qr", choices=["qr", "leverage", "l1"], help="CSS criterion")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="compute device (default cpu)")
    p.add_argument("--amp", action="store_true", help="autocast fp16 (cuda) / bf16 (cpu)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true",
                   help="smoke settings (resnet18, 32 px, batch 4, 2 steps, 1 event, 10-epoch recipe)")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.image_size, args.steps, args.warmup, args.events = "resnet18", 4, 32, 2, 1, 1
        args.num_classes, args.densities, args.epochs, args.delta_t, args.t_max = 10, [0.7], 10, 2, 6
    for flag, v in (("--steps", args.steps), ("--batch", args.batch), ("--events", args.events)):
        if v < 1:
            parser.error(f"{flag} must be >= 1, got {v}")
    if any(not 0 < s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must be in (0, 1), got {args.sparsities}")
    if any(not 0 < k <= 1 for k in args.densities):
        parser.error(f"--densities must be in (0, 1], got {args.densities}")
    if args.t_max < args.delta_t or args.delta_t < 1:
        parser.error("--t-max must be >= --delta-t >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    runners = [Runner("dense", args.arch, "dense", 1.0, args, device)]
    for s in args.sparsities:
        runners.append(Runner(f"masked S={s:g}", args.arch, "masked", 1.0 - s, args, device))
        runners.append(Runner(f"compact S={s:g}", args.arch, "compact", 1.0 - s, args, device))
    have = {round(1.0 - s, 6) for s in args.sparsities} | {1.0}
    for k in args.densities:
        if round(k, 6) not in have:
            runners.append(Runner(f"compact k={k:g}", args.arch, "compact", k, args, device))
            have.add(round(k, 6))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for r in range(args.warmup + args.steps):          # interleaved: every configuration takes one step per round
        for run in runners:
            t = run.step(x, y, args.amp, device)
            if r >= args.warmup:
                run.times.append(t)
    clocks = ("wall",) if device.type == "cuda" else ("wall", "cpu")

    dense = next(r for r in runners if r.kind == "dense")
    def med(r: Runner, clock: str) -> float:
        return statistics.median(t[0 if clock == "wall" else 1] for t in r.times)

    rows = []
    for r in runners:
        row = {"config": r.name, "density": r.density, "macs_g": r.macs / 1e9, "macs_vs_dense": r.macs / dense.macs}
        for clock in clocks:
            row[f"{clock}_step_s"] = med(r, clock)
            row[f"{clock}_epoch_equiv_s"] = med(r, clock) * args.steps
            row[f"{clock}_vs_dense"] = med(r, clock) / med(dense, clock)
        rows.append(row)

    proj = {}
    steps_per_epoch = IMAGENET_TRAIN / args.batch             # steps of this batch size per ImageNet epoch
    events = {s: event_times(args.arch, s, min(args.delta0, s), args, device) for s in args.sparsities}
    for clock in clocks:
        t_dense = med(dense, clock)
        per_k = {1.0: t_dense}
        for r in runners:
            if r.kind == "compact":
                per_k[round(r.density, 6)] = med(r, clock)
        for s in args.sparsities:
            d0 = min(args.delta0, s)
            curve = density_curve(s, d0, args.epochs, args.delta_t, args.t_max)
            n_events = len(range(args.delta_t, args.t_max + 1, args.delta_t))
            ev = events[s][clock]
            t_masked = med(next(r for r in runners if r.name == f"masked S={s:g}"), clock)
            dense_run = args.epochs * steps_per_epoch * t_dense
            masked_run = args.epochs * steps_per_epoch * t_masked + n_events * ev["masked"]
            compact_run = sum(interpolate(per_k, k) for k in curve) * steps_per_epoch + n_events * ev["compact"]
            macs_run = sum(k_flops(rows, k) for k in curve) / args.epochs
            proj.setdefault(clock, {})[f"S={s:g}"] = {
                "delta0": d0, "events": n_events, "event_masked_s": ev["masked"], "event_compact_s": ev["compact"],
                "mean_density": sum(curve) / len(curve), "compact_vs_dense": compact_run / dense_run,
                "compact_vs_masked": compact_run / masked_run, "masked_vs_dense": masked_run / dense_run,
                "train_macs_vs_dense": macs_run, "goal_le_0.6x_dense": compact_run / dense_run <= 0.6}

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu, {torch.get_num_threads()} thread(s)", "arch": args.arch, "batch": args.batch,
            "image_size": args.image_size, "amp": args.amp, "steps": args.steps, "torch": torch.__version__}
    result = {"info": info, "measured": rows, "projection": proj,
              "recipe": {"epochs": args.epochs, "delta_t": args.delta_t, "t_max": args.t_max, "delta0": args.delta0}}
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def k_flops(rows: list[dict], k: float) -> float:
    """MACs/dense at density k, interpolated from the measured compact configurations (for the FLOPs projection)."""
    pts = {1.0: 1.0}
    for r in rows:
        if r["config"].startswith("compact"):
            pts[round(r["density"], 6)] = r["macs_vs_dense"]
    return interpolate(pts, k)


def _print(res: dict) -> None:
    i = res["info"]
    clocks = list(res["projection"])
    print(f"# training cost — {i['arch']}, batch {i['batch']}, {i['image_size']} px, amp={i['amp']}, {i['device']}, "
          f"torch {i['torch']}; epoch-equivalent = {i['steps']} steps (median step × steps)")
    head = "".join(f"{c + ' step s':>13}{c + ' epoch-eq s':>17}{'vs dense':>10}" for c in clocks)
    print(f"{'config':<18}{'density':>8}{head}{'MACs vs dense':>15}")
    for r in res["measured"]:
        cols = "".join(f"{r[c + '_step_s']:>13.3f}{r[c + '_epoch_equiv_s']:>17.2f}{r[c + '_vs_dense']:>9.2f}x"
                       for c in clocks)
        print(f"{r['config']:<18}{r['density']:>8.3f}{cols}{r['macs_vs_dense']:>14.2f}x")
    rc = res["recipe"]
    print(f"# projected whole run: {rc['epochs']} epochs, ΔT={rc['delta_t']}, T_max={rc['t_max']}, δ0={rc['delta0']}")
    for clock, per_s in res["projection"].items():
        for k, p in per_s.items():
            print(f"[{clock} clock] {k}: compact/dense {p['compact_vs_dense']:.3f}x, compact/masked "
                  f"{p['compact_vs_masked']:.3f}x, masked/dense {p['masked_vs_dense']:.3f}x, training MACs/dense "
                  f"{p['train_macs_vs_dense']:.3f}x, mean density {p['mean_density']:.3f}, {p['events']} events "
                  f"(masked {p['event_masked_s']:.2f} s, compact {p['event_compact_s']:.2f} s each); goal ≤ 0.6x "
                  f"dense: {'met' if p['goal_le_0.6x_dense'] else 'NOT met'}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
