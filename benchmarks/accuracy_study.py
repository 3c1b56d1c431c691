"""Small-scale accuracy study: does CHEX beat simple channel-pruning baselines at equal FLOPs and equal epochs?

Data: scikit-learn's built-in ``load_digits`` (1797 real 8×8 grey-scale handwritten digits, 10 classes, shipped inside
the package — nothing is downloaded), bilinearly upsampled to ``--res`` px, standardised with the training split's
mean/std. A stratified held-out validation split (``--val-frac``) is fixed by ``--split-seed``: every method and every
training seed is scored on the same images.

Model: a CIFAR-style ResNet built from torchvision's ``BasicBlock`` (3×3 stem, 3 stages of ``--blocks`` blocks with
``--widths`` channels, strides 1/2/2, global average pool, linear), so ``chex_core.resnet_groups`` finds one prunable
group per block (``conv1 → bn1``, consumer ``conv2``); stem, block outputs (residual stream) and the classifier are
never pruned, exactly as for ResNet-50.

Budgets: ``--reductions`` (default 30 %, 50 %, 70 % fewer MACs than dense; MACs = ``chex_core.count_macs`` at
``(1, res, res)``, the paper's convention). Every method reaches the same MACs by choosing its own channel sparsity S
(bisection; see each method), and every method trains ``--epochs`` epochs in total with the same optimiser (SGD,
momentum 0.9, Nesterov off, cosine learning rate, weight decay ``--wd``, batch ``--batch``). Each run's own achieved
MACs are recorded and checked against the budget (``--flops-tol``).

Methods (one row each):
  dense        the unpruned network.
  chex         CHEX as in ``chex_core`` defaults: QR column subset selection, importance-sampling regrowth with MRU
               values, global |γ| re-allocation; exploration events every ``--delta-t`` epochs up to
               ``--t-max-frac``·epochs; δ0 = min(``--delta0``, S/2). Equal FLOPs: before the initial sub-model and
               before every event, S is set by bisection so that the explorer's own allocation rule
               (``chex_core.allocate.keep_counts`` on the current γ) gives the budget's MACs — the explorer then makes
               every decision itself. So each event's pruned sub-model (before the δ_t regrowth, which vanishes at
               T_max) and the final model cost the budget.
  chex-noregrow  ablation: δ0 = 0 (prune-only exploration: CSS re-selects, nothing regrows).
  chex-uniform   ablation: allocation "uniform" (no inter-layer re-allocation; every layer keeps the same share).
  chex-leverage  ablation: CSS criterion = leverage scores (the official CLS code's).
  chex-l1        ablation: CSS criterion = filter L1 norm.
  l1-init      uniform per-layer sparsity, top-L1 filters of the random initialisation kept; the physically smaller
               network is trained from there.
  random-init  random channel pruning at initialisation: every channel gets a uniform random score and one global
               ranking of the scores decides which survive (so widths are random too), then the smaller net is trained.
  slimming     network slimming (Liu et al. 2017): ``--slim-frac`` of the epochs with an L1 penalty ``--slim-lambda``
               on the γ of the prunable BN layers, one-shot global |γ| prune to the budget (top-|γ| channels, the same
               ``keep_counts`` rule), then fine-tuning of the smaller net for the remaining epochs (fresh cosine).

Ablations run at the budgets in ``--ablation-reductions`` (default: the 50 % one). Results (JSON with every run,
CSV, a markdown table and PNG plots) go to ``--out``. All numbers come from this run.

    python benchmarks/accuracy_study.py                      # full sweep (2 CPU cores: see README for the time)
    python benchmarks/accuracy_study.py --quick --out /tmp/q # seconds, for CI smoke
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

if __package__ in (None, ""):          # run as a script: make `benchmarks._common` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import WidthMacs, bisect_sparsity, machine_info, retarget_explorer, uniform_widths  # noqa: E402
from chex_core import ChannelExplorer, ExplorationSchedule, compact_model, count_macs, resnet_groups  # noqa: E402
from chex_core.allocate import keep_counts  # noqa: E402
from chex_core.css import select_channels  # noqa: E402

log = logging.getLogger("accuracy_study")

BASELINES = ("dense", "chex", "l1-init", "random-init", "slimming")
ABLATIONS = ("chex-noregrow", "chex-uniform", "chex-leverage", "chex-l1")
CHEX_VARIANTS = {            # method → (criterion, allocation, regrowth on)
    "chex": ("qr", "global", True),
    "chex-noregrow": ("qr", "global", False),
    "chex-uniform": ("qr", "uniform", True),
    "chex-leverage": ("leverage", "global", True),
    "chex-l1": ("l1", "global", True),
}


# ---------------------------------------------------------------------------------------------------------- model
class CifarResNet(nn.Module):
    """CIFAR-style ResNet with torchvision ``BasicBlock``s (module names as torchvision: conv1, bn1, layerK.i, fc).

    Input ``(N, in_ch, H, W)`` → logits ``(N, num_classes)``. Stages run at H, H/2, H/4.
    """

    def __init__(self, blocks: int = 2, widths: tuple[int, int, int] = (16, 32, 64), in_ch: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], blocks, 1)
        self.layer2 = self._stage(widths[1], blocks, 2)
        self.layer3 = self._stage(widths[2], blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)     # once per worker process: importing sklearn costs seconds
def load_data(res: int, val_frac: float, split_seed: int) -> dict[str, torch.Tensor]:
    """sklearn digits → standardised ``(N, 1, res, res)`` float tensors and int64 labels, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0          # (1797, 1, 8, 8) in [0, 1]
    if res != 8:
        x = nn.functional.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_tr, idx_va = train_test_split(np.arange(len(y)), test_size=val_frac, stratify=digits.target,
                                      random_state=split_seed)
    idx_tr, idx_va = torch.from_numpy(idx_tr), torch.from_numpy(idx_va)
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std
    return {"x_train": x[idx_tr], "y_train": y[idx_tr], "x_val": x[idx_va], "y_val": y[idx_va]}


# ------------------------------------------------------------------------------------------------------- training
def build_model(cfg: dict, seed: int) -> CifarResNet:
    torch.manual_seed(seed)
    return CifarResNet(cfg["blocks"], tuple(cfg["widths"]))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return 100.0 * correct / len(y)


def train(model: nn.Module, data: dict, cfg: dict, epochs: int, seed: int, explorer_hook=None,
          gamma_l1: tuple[list[nn.Parameter], float] | None = None) -> None:
    """SGD + cosine LR over ``epochs`` epochs of the training split (data order from ``seed``).

    Args:
        explorer_hook: ``f(step, optimizer)`` called after every optimizer step (CHEX masks/events).
        gamma_l1: ``(γ parameters, λ)`` — adds the sub-gradient of ``λ·Σ|γ|`` (network slimming's sparsity term).
    """
    x, y = data["x_train"], data["y_train"]
    steps_per_epoch = math.ceil(len(y) / cfg["batch"])
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["wd"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    if explorer_hook is not None:
        explorer_hook(0, opt)                   # initial sub-model (before the first step)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg["batch"]):
            b = perm[i:i + cfg["batch"]]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if gamma_l1 is not None:
                params, lam = gamma_l1
                for p in params:
                    p.grad.add_(torch.sign(p.detach()), alpha=lam)
            opt.step()
            sched.step()
            step += 1
            if explorer_hook is not None:
                explorer_hook(step, opt)
    return steps_per_epoch


def masks_from_indices(groups, chosen: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = {}
    for g, idx in zip(groups, chosen):
        m = torch.zeros(g.size, dtype=torch.bool)
        m[idx] = True
        masks[g.name] = m
    return masks


def run_one(job: dict) -> dict:
    """Train and score one (method, budget, seed). Returns a plain dict (JSON-serialisable)."""
    torch.set_num_threads(job["threads"])
    cfg, method, seed, target = job["cfg"], job["method"], job["seed"], job["target_macs"]
    data = load_data(cfg["res"], cfg["val_frac"], cfg["split_seed"])
    in_size = (1, cfg["res"], cfg["res"])
    model = build_model(cfg, seed)
    groups = resnet_groups(model)
    macs_of = WidthMacs(model, groups, in_size)
    t0, cpu0 = time.perf_counter(), time.process_time()
    info: dict = {}
    epochs = cfg["epochs"]

    if method == "dense":
        train(model, data, cfg, epochs, seed)
        final = model
    elif method in CHEX_VARIANTS:
        criterion, allocation, regrow_on = CHEX_VARIANTS[method]
        s0, _ = bisect_sparsity(lambda s: uniform_widths(groups, s), macs_of, target)
        delta0 = min(cfg["delta0"], s0 / 2) if regrow_on else 0.0
        steps_per_epoch = math.ceil(len(data["y_train"]) / cfg["batch"])
        t_max = max(cfg["delta_t"], round(cfg["t_max_frac"] * epochs))
        schedule = ExplorationSchedule(cfg["delta_t"], t_max, s0, delta0, steps_per_unit=steps_per_epoch)
        ex = ChannelExplorer(model, groups, schedule, criterion=criterion, allocation=allocation, seed=seed)
        sparsities: list[float] = []

        def hook(step: int, opt: torch.optim.Optimizer) -> None:
            if step == 0:
                ex.start(opt)
                return
            if ex.schedule.is_event(step):
                sparsities.append(retarget_explorer(ex, macs_of, target))
            ex.after_step(step, opt)

        train(model, data, cfg, epochs, seed, explorer_hook=hook)
        final, _ = compact_model(model, groups, ex.masks)
        info.update(events=ex.event_count, delta0=delta0, sparsity_first=s0,
                    sparsity_final=sparsities[-1] if sparsities else s0, widths=list(ex.widths().values()),
                    masked_macs=count_macs(model, in_size))
    elif method in ("l1-init", "random-init"):
        if method == "l1-init":
            s, _ = bisect_sparsity(lambda s: uniform_widths(groups, s), macs_of, target)
            chosen = [select_channels(model.get_submodule(g.producer).weight, w, "l1")
                      for g, w in zip(groups, uniform_widths(groups, s))]
        else:
            gen = torch.Generator().manual_seed(10_000 + seed)
            scores = [torch.rand(g.size, generator=gen) for g in groups]
            s, _ = bisect_sparsity(lambda s: keep_counts("global", scores, s), macs_of, target)
            chosen = [torch.sort(torch.sort(sc, descending=True, stable=True).indices[:w]).values
                      for sc, w in zip(scores, keep_counts("global", scores, s))]
        final, _ = compact_model(model, groups, masks_from_indices(groups, chosen))
        train(final, data, cfg, epochs, seed)
        info.update(sparsity_final=s, widths=[len(c) for c in chosen])
    elif method == "slimming":
        e1 = max(1, round(cfg["slim_frac"] * epochs))
        gammas = [model.get_submodule(g.norm).weight for g in groups]
        train(model, data, cfg, e1, seed, gamma_l1=(gammas, cfg["slim_lambda"]))
        g_abs = [g.detach().abs() for g in gammas]
        s, _ = bisect_sparsity(lambda s: keep_counts("global", g_abs, s), macs_of, target)
        widths = keep_counts("global", g_abs, s)
        chosen = [torch.sort(torch.sort(ga, descending=True, stable=True).indices[:w]).values
                  for ga, w in zip(g_abs, widths)]
        info["acc_before_finetune"] = evaluate(model, data["x_val"], data["y_val"])
        final, _ = compact_model(model, groups, masks_from_indices(groups, chosen))
        train(final, data, cfg, epochs - e1, seed + 1)
        info.update(sparsity_final=s, widths=widths, sparsity_epochs=e1)
    else:
        raise ValueError(f"unknown method {method!r}")

    macs = count_macs(final, in_size)
    return {"method": method, "reduction": job["reduction"], "seed": seed, "target_macs": target,
            "macs": macs, "dense_macs": macs_of.dense, "macs_error": macs / target - 1 if target else 0.0,
            "val_top1": evaluate(final, data["x_val"], data["y_val"]), "train_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
            "epochs": epochs, **info}


# -------------------------------------------------------------------------------------------------------- reports
def summarise(runs: list[dict]) -> list[dict]:
    """Mean ± std (sample std over seeds) per (method, budget)."""
    by = defaultdict(list)
    for r in runs:
        by[(r["method"], r["reduction"])].append(r)
    rows = []
    for (method, red), rs in by.items():
        accs = [r["val_top1"] for r in rs]
        rows.append({"method": method, "reduction": red, "n": len(rs),
                     "top1_mean": statistics.mean(accs), "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "macs_mean": statistics.mean(r["macs"] for r in rs),
                     "macs_reduction_mean": 1 - statistics.mean(r["macs"] for r in rs) / rs[0]["dense_macs"],
                     "max_abs_macs_error": max(abs(r["macs_error"]) for r in rs),
                     "train_s_mean": statistics.mean(r["train_s"] for r in rs),
                     "cpu_s_mean": statistics.mean(r["cpu_s"] for r in rs)})
    order = {m: i for i, m in enumerate(BASELINES + ABLATIONS)}
    return sorted(rows, key=lambda r: (r["reduction"], order[r["method"]]))


def markdown(rows: list[dict], cfg: dict, meta: dict) -> str:
    """Main table (methods × budgets), ablation table, and an automatic CHEX-vs-baseline verdict per budget."""
    cell = {(r["method"], r["reduction"]): r for r in rows}
    reds = sorted({r["reduction"] for r in rows if r["method"] != "dense"})
    dense = cell.get(("dense", 0.0))
    n = dense["n"] if dense else max(r["n"] for r in rows)
    out = [f"Val top-1 (%) on sklearn digits ({cfg['res']}×{cfg['res']} px, {meta['n_val']} held-out images), "
           f"CIFAR-style ResNet ({cfg['blocks']} BasicBlocks × 3 stages, widths {tuple(cfg['widths'])}, "
           f"{meta['dense_macs'] / 1e6:.2f} M MACs dense), {cfg['epochs']} epochs for every method, mean ± std over "
           f"{n} seeds. Column headers: target MACs reduction; the number under each accuracy is the MACs reduction "
           f"the runs achieved.", ""]
    head = "| method | " + " | ".join(f"−{100 * r:.0f} % MACs" for r in reds) + " |"
    out += [head, "|" + "---|" * (len(reds) + 1)]
    if dense:
        out.append(f"| dense ({dense['macs_mean'] / 1e6:.2f} M MACs) | " +
                   " | ".join(f"{dense['top1_mean']:.2f} ± {dense['top1_std']:.2f}" for _ in reds) + " |")

    def line(method: str) -> str | None:
        cells = []
        for red in reds:
            r = cell.get((method, red))
            cells.append("—" if r is None else f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f} "
                                               f"(−{100 * r['macs_reduction_mean']:.1f} %)")
        return None if all(c == "—" for c in cells) else f"| {method} | " + " | ".join(cells) + " |"

    out += [ln for m in BASELINES[1:] if (ln := line(m))]
    abl = [ln for m in ("chex",) + ABLATIONS if (ln := line(m))]
    if any(cell.get((m, red)) for m in ABLATIONS for red in reds):
        out += ["", "Ablations (same budgets and epochs; `chex` = QR + importance regrowth + global re-allocation):",
                "", head.replace("method", "variant"), "|" + "---|" * (len(reds) + 1)] + abl
    one_image = 100.0 / meta["n_val"]
    out += ["", f"CHEX minus each alternative, in percentage points of top-1 (one validation image = {one_image:.2f} "
            "pp). 'beats'/'loses to' only when the gap exceeds both two standard errors of the difference of the "
            "means, 2·sqrt(s₁²/n₁ + s₂²/n₂), and one validation image; otherwise 'ties with':", ""]
    for red in reds:
        c = cell.get(("chex", red))
        if c is None:
            continue
        parts = []
        for m in BASELINES[2:] + ABLATIONS:
            b = cell.get((m, red))
            if b is None:
                continue
            d = c["top1_mean"] - b["top1_mean"]
            noise = max(2 * math.sqrt(c["top1_std"] ** 2 / c["n"] + b["top1_std"] ** 2 / b["n"]), one_image)
            verdict = "beats" if d > noise else ("loses to" if -d > noise else "ties with")
            parts.append(f"{verdict} {m} ({d:+.2f} ± {noise:.2f})")
        out.append(f"- −{100 * red:.0f} % MACs: CHEX " + ", ".join(parts) + ".")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Accuracy vs MACs (mean ± std error bars); returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install matplotlib)", path.name)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for ax, methods, sub in ((axes[0], BASELINES[1:], "CHEX vs baselines"), (axes[1], ("chex",) + ABLATIONS,
                                                                              "CHEX ablations")):
        for i, m in enumerate(methods):
            rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["macs_mean"])
            shift = 1 + 0.012 * (i - (len(methods) - 1) / 2)      # small x offset so equal-FLOPs bars stay apart
            if rs:
                ax.errorbar([shift * r["macs_mean"] / 1e6 for r in rs], [r["top1_mean"] for r in rs],
                            yerr=[r["top1_std"] for r in rs], marker="o", capsize=3, label=m)
        if dense:
            ax.axhline(dense["top1_mean"], color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("MACs per image (M, count_macs; points nudged apart)")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(sub)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per (method, budget) (default 3)")
    p.add_argument("--epochs", type=int, default=15, help="total epochs for every method (default 15)")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                   help="MACs reduction budgets, fractions in (0, 1) (default 0.3 0.5 0.7)")
    p.add_argument("--ablation-reductions", type=float, nargs="*", default=[0.5],
                   help="budgets at which the ablations run (default 0.5; none to skip)")
    p.add_argument("--methods", nargs="+", choices=BASELINES + ABLATIONS, default=list(BASELINES + ABLATIONS),
                   help="methods to run (default all)")
    p.add_argument("--res", type=int, default=16, help="input resolution in px (digits are 8×8; default 16)")
    p.add_argument("--blocks", type=int, default=2, help="BasicBlocks per stage (default 2)")
    p.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], help="stage widths (default 16 32 64)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate, cosine to 0 (default 0.1)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--val-frac", type=float, default=0.25, help="held-out validation fraction (default 0.25)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--delta-t", type=int, default=1, help="CHEX ΔT in epochs (default 1)")
    p.add_argument("--t-max-frac", type=float, default=0.7,
                   help="CHEX T_max as a fraction of the epochs (paper: 180/250; default 0.7)")
    p.add_argument("--delta0", type=float, default=0.3, help="CHEX δ0 cap; δ0 = min(this, S/2) (default 0.3)")
    p.add_argument("--slim-lambda", type=float, default=5e-3, help="network slimming L1 weight on γ (default 5e-3)")
    p.add_argument("--slim-frac", type=float, default=0.5,
                   help="share of the epochs spent in slimming's sparsity training (default 0.5)")
    p.add_argument("--flops-tol", type=float, default=0.03,
                   help="allowed relative MACs mismatch vs the budget; a run outside it is flagged (default 0.03)")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: OMP_NUM_THREADS or cores // jobs)")
    p.add_argument("--name", default="accuracy_study",
                   help="stem of the output files (default %(default)s; --quick appends _quick)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--from-json", type=Path, default=None,
                   help="do not train: rewrite the CSV/markdown/PNG next to this saved sweep JSON from its runs")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 2 seeds, 1 epoch, budgets 0.5 only, tiny net at 8 px (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.reductions, args.ablation_reductions = 2, 2, [0.5], [0.5]
        args.res, args.blocks, args.widths, args.val_frac = 8, 1, [8, 8, 16], 0.5
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs < 2:
        p.error(f"--epochs must be >= 2 (slimming needs a sparsity phase and a fine-tune phase), got {args.epochs}")
    for flag, vals in (("--reductions", args.reductions), ("--ablation-reductions", args.ablation_reductions)):
        bad = [v for v in vals if not 0 < v < 1]
        if bad:
            p.error(f"{flag} must be fractions in (0, 1), got {bad}")
    if args.res < 4:
        p.error(f"--res must be >= 4 px, got {args.res}")
    if not 0 < args.val_frac < 1:
        p.error(f"--val-frac must be in (0, 1), got {args.val_frac}")
    if not 0 < args.slim_frac < 1:
        p.error(f"--slim-frac must be in (0, 1), got {args.slim_frac}")
    if not 0 < args.t_max_frac <= 1:
        p.error(f"--t-max-frac must be in (0, 1], got {args.t_max_frac}")
    if args.delta_t < 1:
        p.error(f"--delta-t must be >= 1, got {args.delta_t}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.from_json is not None and not args.from_json.is_file():
        p.error(f"--from-json: no such file {args.from_json}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows = write_reports(saved["config"], saved["runs"], saved["meta"], args.from_json.parent,
                             args.from_json.stem, plot_png=not args.no_plot)
        return {"summary": rows, "runs": saved["runs"], "meta": saved["meta"]}
    logging.getLogger("chex_core").setLevel(logging.WARNING)         # one line per event would drown the progress
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) // args.jobs or \
        max(1, (os.cpu_count() or 1) // args.jobs)
    cfg = {k: getattr(args, k) for k in ("epochs", "res", "blocks", "widths", "batch", "lr", "wd", "val_frac",
                                         "split_seed", "delta_t", "t_max_frac", "delta0", "slim_lambda", "slim_frac")}
    # zero_aware=False: a random init may hold an exact 0.0 weight, which must not shave the dense reference
    dense_macs = count_macs(CifarResNet(args.blocks, tuple(args.widths)), (1, args.res, args.res), zero_aware=False)
    jobs = []
    for seed in range(args.seeds):
        for m in args.methods:
            reds = [0.0] if m == "dense" else (args.ablation_reductions if m in ABLATIONS else args.reductions)
            for red in reds:
                jobs.append({"cfg": cfg, "method": m, "seed": seed, "reduction": red, "threads": threads,
                             "target_macs": dense_macs * (1 - red)})
    log.info("%d runs, %d worker(s) × %d thread(s); dense net %.2f M MACs", len(jobs), args.jobs, threads,
             dense_macs / 1e6)
    load_before = machine_info().get("loadavg_1m")
    t0 = time.perf_counter()
    runs = []
    if args.jobs == 1:
        for j in jobs:
            runs.append(run_one(j))
            _progress(runs[-1], len(runs), len(jobs), args.flops_tol)
    else:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in cf.as_completed([pool.submit(run_one, j) for j in jobs]):
                runs.append(fut.result())
                _progress(runs[-1], len(runs), len(jobs), args.flops_tol)
    wall = time.perf_counter() - t0
    meta = {"machine": machine_info(), "loadavg_1m_before": load_before, "wall_s": wall, "jobs": args.jobs,
            "cpu_s_total": sum(r["cpu_s"] for r in runs), "threads_per_job": threads, "dense_macs": dense_macs,
            "command": " ".join(sys.argv), "flops_tol": args.flops_tol, "seeds": args.seeds,
            "n_val": len(load_data(args.res, args.val_frac, args.split_seed)["y_val"])}
    meta["loadavg_1m_after"] = meta["machine"].get("loadavg_1m")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"config": cfg, "meta": meta, "runs": runs}, indent=1))
    rows = write_reports(cfg, runs, meta, args.out, stem, plot_png=not args.no_plot)
    log.info("wrote %s/%s.{json,csv,md%s} in %.1f min", args.out, stem, "" if args.no_plot else ",png", wall / 60)
    return {"summary": rows, "runs": runs, "meta": meta}


def write_reports(cfg: dict, runs: list[dict], meta: dict, out: Path, stem: str, plot_png: bool = True) -> list[dict]:
    """CSV summary, markdown tables and the PNG plot from a sweep's runs (also used by ``--from-json``)."""
    rows = summarise(runs)
    off = [r for r in runs if abs(r["macs_error"]) > meta["flops_tol"] and r["method"] != "dense"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = markdown(rows, cfg, meta)
    md += (f"\nMeasured on: {meta['machine']['cpu_count']}-core CPU, no GPU; {meta['jobs']} worker(s) × "
           f"{meta['threads_per_job']} thread(s); wall time {meta['wall_s'] / 60:.1f} min, CPU time of the runs "
           f"{meta['cpu_s_total'] / 60:.1f} min; 1-min load average {meta['loadavg_1m_before']} before / "
           f"{meta['loadavg_1m_after']} after. Runs outside ±{100 * meta['flops_tol']:.0f} % of their MACs budget: "
           f"{len(off)}.\n")
    (out / f"{stem}.md").write_text(md)
    if plot_png:
        plot(rows, out / f"{stem}.png", f"sklearn digits {cfg['res']}px, {cfg['epochs']} epochs, "
                                        f"{meta['seeds']} seeds (mean ± std)")
    print(md)
    return rows


def _progress(r: dict, i: int, n: int, tol: float) -> None:
    flag = "  <-- MACs off budget" if abs(r["macs_error"]) > tol and r["method"] != "dense" else ""
    log.info("[%d/%d] %-14s -%2.0f%% seed %d: top-1 %.2f%%  MACs %.3fM (%+.1f%%)  %.1fs%s", i, n, r["method"],
             100 * r["reduction"], r["seed"], r["val_top1"], r["macs"] / 1e6, 100 * r["macs_error"], r["train_s"],
             flag)


if __name__ == "__main__":
    main()
