"""The methods the accuracy study compares, each trained for the same epochs with the same optimiser at one MACs budget.

Every method gets the same dense network (same initialisation for a given seed), the same data stream, SGD (momentum
0.9, weight decay ``wd``, batch ``batch``) with a cosine learning rate from ``lr`` to 0, and a budget in MACs
(``chex_core.count_macs`` at the task's input size, the paper's convention). What each method does:

dense          the unpruned network (the reference).
chex           CHEX with ``chex_core``'s defaults (QR column subset selection, importance-sampling regrowth with MRU
               values, global |γ| re-allocation) on the block-internal channels, budgeted the way ``--target-flops``
               budgets CLS/DET/SEG: ``sparsity_for_macs`` sets S before training, and every event cuts the global γ
               ranking where the final model meets the target (``ChannelExplorer(target_macs=...)``). Events every
               ``delta_t`` epochs up to ``t_max_frac``·epochs; δ0 = min(``delta0``, S/2).
chex-residual  the same, with the residual stream explored too (``resnet_groups(model, residual=True)``: one coupled
               group per stage — stem/downsample and every block's last conv — consumed by the next blocks and the
               classifier). Listed only when the installed ``chex_core`` has coupled groups.
tp-l1-init     Torch-Pruning (``torch_pruning``, an independent implementation): its ``DependencyGraph`` groups coupled
               channels (residual channels are pruned together across the stage), ``GroupMagnitudeImportance(p=1)``
               ranks them by group L1 norm, ``BasePruner`` prunes every group by the same ratio (its default, local
               pruning; the classifier's outputs are kept) at initialisation; the ratio is bisected so the pruned
               network's MACs are as close to the budget as the ratio's steps allow. The smaller net is then trained.
tp-l1-half     prune after training: the dense net trains for half the epochs (its own cosine), Torch-Pruning prunes it
               as above, and the smaller net is fine-tuned for the other half (a fresh cosine from ``lr``, i.e.
               learning-rate rewinding; the optimiser state is new because the shapes changed).

Legacy baselines of the first (digits) study, still available with ``--methods``: ``l1-init`` (uniform widths of the
inner groups, top-L1 filters of the init), ``random-init`` (random scores, one global ranking), ``slimming`` (network
slimming: L1 on γ for ``slim_frac`` of the epochs, global |γ| prune, fine-tune), and the CHEX ablations
``chex-noregrow`` (δ0 = 0), ``chex-uniform`` (no re-allocation), ``chex-leverage`` / ``chex-l1`` (CSS criterion).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from chex_core import ChannelExplorer, ExplorationSchedule, compact_model, count_macs, resnet_groups
from chex_core.budget import MacsModel, keep_counts_for_macs, sparsity_for_macs
from chex_core.css import select_channels

from .model import build_model
from .tasks import Task, load_task

# method → (CSS criterion, allocation, regrowth on, residual groups)
CHEX_VARIANTS = {
    "chex": ("qr", "global", True, False),
    "chex-noregrow": ("qr", "global", False, False),
    "chex-uniform": ("qr", "uniform", True, False),
    "chex-leverage": ("leverage", "global", True, False),
    "chex-l1": ("l1", "global", True, False),
    "chex-residual": ("qr", "global", True, True),
}
STUDY = ("dense", "chex", "tp-l1-init", "tp-l1-half")
LEGACY = ("l1-init", "random-init", "slimming")
ABLATIONS = ("chex-noregrow", "chex-uniform", "chex-leverage", "chex-l1")


# -------------------------------------------------------------------------------------------------------- training
def train(model: nn.Module, task: Task, cfg: dict, epochs: int, next_epoch: Callable, explorer_hook=None,
          gamma_l1: tuple[list[nn.Parameter], float] | None = None) -> None:
    """SGD + cosine LR (from ``cfg['lr']`` to 0) over ``epochs`` epochs drawn from ``next_epoch``.

    Args:
        next_epoch: the run's data stream (``task.train_stream(seed, batch)``); a later phase of the same run keeps
            drawing from it, so no phase replays another's data.
        explorer_hook: ``f(step, optimizer)`` called before the first step (step 0) and after every step.
        gamma_l1: ``(γ parameters, λ)`` — adds the sub-gradient of ``λ·Σ|γ|`` (network slimming's sparsity term).
    """
    total = epochs * task.steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["wd"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    step = 0
    if explorer_hook is not None:
        explorer_hook(0, opt)
    for _ in range(epochs):
        for x, y in next_epoch():
            loss = nn.functional.cross_entropy(model(x), y)
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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return 100.0 * correct / len(y)


# ------------------------------------------------------------------------------------------------------------ CHEX
def residual_available() -> bool:
    """Whether the installed ``chex_core`` derives coupled residual groups (``resnet_groups(..., residual=True)``)."""
    import inspect
    return "residual" in inspect.signature(resnet_groups).parameters


def chex_groups(model: nn.Module, residual: bool):
    return resnet_groups(model, residual=True) if residual else resnet_groups(model)


def run_chex(model: nn.Module, task: Task, cfg: dict, epochs: int, seed: int, target: float, method: str,
             next_epoch: Callable) -> tuple[nn.Module, dict]:
    criterion, allocation, regrow_on, residual = CHEX_VARIANTS[method]
    groups = chex_groups(model, residual)
    mm = MacsModel(model, groups, task.in_size)
    report = sparsity_for_macs(mm, int(target))
    s0 = report.sparsity
    delta0 = min(cfg["delta0"], s0 / 2) if regrow_on else 0.0
    t_max = max(cfg["delta_t"], round(cfg["t_max_frac"] * epochs))
    schedule = ExplorationSchedule(cfg["delta_t"], t_max, s0, delta0, steps_per_unit=task.steps_per_epoch)
    ex = ChannelExplorer(model, groups, schedule, criterion=criterion, allocation=allocation, seed=seed,
                         target_macs=int(target), macs_model=mm)

    def hook(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 0:
            ex.start(opt)
        else:
            ex.after_step(step, opt)

    train(model, task, cfg, epochs, next_epoch, explorer_hook=hook)
    final, spec = compact_model(model, groups, ex.masks)
    return final, {"events": ex.event_count, "delta0": delta0, "sparsity_first": s0, "widths": spec,
                   "groups": len(groups), "masked_macs": count_macs(model, task.in_size)}


# --------------------------------------------------------------------------------------------------- Torch-Pruning
def tp_prune(model: nn.Module, in_size: tuple[int, ...], ratio: float, last_ratio: float | None = None) -> nn.Module:
    """Torch-Pruning group-L1 local pruning (in place): every group loses ``ratio`` of its channels, those of the
    last stage ``last_ratio`` (default ``ratio``); the classifier's outputs are kept."""
    import torch_pruning as tp

    imp = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
    per_layer = None if last_ratio is None else {model.layer3: last_ratio}
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, *in_size), importance=imp, pruning_ratio=ratio,
                                  pruning_ratio_dict=per_layer, global_pruning=False, ignored_layers=[model.fc])
    was_training = model.training
    model.eval()                               # tracing must not update BN running statistics
    pruner.step()
    model.train(was_training)
    return model


def _bisect(macs_of: Callable[[float], tuple[int, nn.Module]], target: float, lo: float, hi: float, iters: int):
    """Bisection on a pruning ratio (MACs fall as it grows); returns ``((|error|, macs), ratio, model)`` of the
    closest point seen, the cheaper one on ties."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        m, small = macs_of(mid)
        if best is None or (abs(m - target), m) < best[0]:
            best = ((abs(m - target), m), mid, small)
        if m > target:
            lo = mid
        else:
            hi = mid
    return best


def tp_prune_to_macs(model: nn.Module, in_size: tuple[int, ...], target: float, iters: int = 12, tol: float = 0.01) \
        -> tuple[nn.Module, tuple[float, float]]:
    """A Torch-Pruning copy of ``model`` whose MACs land on ``target`` (within ``tol`` when one channel allows).

    Each group keeps ``int(C·(1 − ratio))`` channels, so the MACs of one uniform ratio are a coarse step function
    (±5 % at 12 % of dense with 16-channel layers). So: bisect the uniform ratio; if its closest point is more than
    ``tol`` off, take the closest uniform point at or below the budget and bisect the last stage's ratio (its layers
    are the widest, so one step is the finest) between 0 and that ratio. The widths depend on the architecture only
    (local pruning keeps a fixed count per group whatever the weights), so the search runs once per architecture
    and budget. Returns the pruned copy and ``(ratio, last-stage ratio)``; ``model`` is left untouched."""
    key = (tuple((n, tuple(p.shape)) for n, p in model.named_parameters()), tuple(in_size), float(target), iters, tol)
    if key not in _TP_RATIOS:
        _TP_RATIOS[key] = _tp_ratios(copy.deepcopy(model), tuple(in_size), float(target), iters, tol)
    r, r3 = _TP_RATIOS[key]
    return tp_prune(copy.deepcopy(model), in_size, r, None if r3 == r else r3), (r, r3)


_TP_RATIOS: dict[tuple, tuple[float, float]] = {}      # (parameter shapes, input, target, ...) → ratios


def _tp_ratios(model: nn.Module, in_size: tuple[int, ...], target: float, iters: int,
               tol: float) -> tuple[float, float]:
    """The search of :func:`tp_prune_to_macs` (``model`` is a private copy)."""
    def uniform(r: float):
        small = tp_prune(copy.deepcopy(model), in_size, r)
        return count_macs(small, in_size, zero_aware=False), small

    (err, _), r, _ = _bisect(uniform, target, 0.0, 0.99, iters)
    if err <= tol * target:
        return r, r

    def under(r: float):                  # above the budget counts as far away: the closest point from below
        m, s = uniform(r)
        return (m if m <= target else 10 * target), s

    (err_u, m0), r, _ = _bisect(under, target, 0.0, 0.99, iters)
    if m0 > target:                       # even 0.99 stays above the budget: nothing finer to do
        return r, r

    def last(r3: float):
        s = tp_prune(copy.deepcopy(model), in_size, r, r3)
        return count_macs(s, in_size, zero_aware=False), s

    (err3, _), r3, _ = _bisect(last, target, 0.0, r, iters)
    return (r, r3) if err3 < err_u else (r, r)


def run_tp(model: nn.Module, task: Task, cfg: dict, epochs: int, target: float, method: str,
           next_epoch: Callable) -> tuple[nn.Module, dict]:
    e1 = 0
    if method == "tp-l1-half":
        e1 = epochs // 2
        train(model, task, cfg, e1, next_epoch)
        info = {"dense_phase_top1": evaluate(model, task.x_val, task.y_val)}
    else:
        info = {}
    small, ratios = tp_prune_to_macs(model, task.in_size, target)
    train(small, task, cfg, epochs - e1, next_epoch)
    widths = {n: m.out_channels for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    return small, {**info, "tp_ratio": ratios[0], "tp_last_stage_ratio": ratios[1], "widths": widths,
                   "pruned_at_epoch": e1}


# ------------------------------------------------------------------------------------------------ legacy baselines
def _masks(groups, chosen: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = {}
    for g, idx in zip(groups, chosen):
        m = torch.zeros(g.size, dtype=torch.bool)
        m[idx] = True
        masks[g.name] = m
    return masks


def run_legacy(model: nn.Module, task: Task, cfg: dict, epochs: int, seed: int, target: float, method: str,
               next_epoch: Callable) -> tuple[nn.Module, dict]:
    groups = resnet_groups(model)
    names = [g.name for g in groups]
    mm = MacsModel(model, groups, task.in_size)
    if method == "l1-init":
        counts, s = keep_counts_for_macs("uniform", [torch.ones(g.size) for g in groups], names, mm, int(target))
        chosen = [select_channels(model.get_submodule(g.producer).weight, w, "l1") for g, w in zip(groups, counts)]
    elif method == "random-init":
        gen = torch.Generator().manual_seed(10_000 + seed)
        scores = [torch.rand(g.size, generator=gen) for g in groups]
        counts, s = keep_counts_for_macs("global", scores, names, mm, int(target))
        chosen = [torch.sort(torch.sort(sc, descending=True, stable=True).indices[:w]).values
                  for sc, w in zip(scores, counts)]
    else:                                                              # slimming
        e1 = max(1, round(cfg["slim_frac"] * epochs))
        gammas = [model.get_submodule(g.norm).weight for g in groups]
        train(model, task, cfg, e1, next_epoch, gamma_l1=(gammas, cfg["slim_lambda"]))
        g_abs = [g.detach().abs() for g in gammas]
        counts, s = keep_counts_for_macs("global", g_abs, names, mm, int(target))
        chosen = [torch.sort(torch.sort(g, descending=True, stable=True).indices[:w]).values
                  for g, w in zip(g_abs, counts)]
        epochs -= e1
    final, spec = compact_model(model, groups, _masks(groups, chosen))
    train(final, task, cfg, epochs, next_epoch)
    return final, {"sparsity_final": s, "widths": spec}


# -------------------------------------------------------------------------------------------------------- one run
def methods_available() -> tuple[str, ...]:
    return STUDY[:2] + (("chex-residual",) if residual_available() else ()) + STUDY[2:] + LEGACY + ABLATIONS


def run_one(job: dict) -> dict:
    """Train and score one (method, budget, epochs, seed). Returns a plain JSON-serialisable dict."""
    torch.set_num_threads(job["threads"])
    cfg, method, seed, epochs = job["cfg"], job["method"], job["seed"], job["epochs"]
    task = load_task(cfg)
    model = build_model(cfg, seed, task.num_classes, task.in_size[0])
    dense_macs = count_macs(model, task.in_size, zero_aware=False)
    target = dense_macs * job["budget"]
    next_epoch = task.train_stream(seed, cfg["batch"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    if method == "dense":
        train(model, task, cfg, epochs, next_epoch)
        final, info = model, {}
    elif method in CHEX_VARIANTS:
        final, info = run_chex(model, task, cfg, epochs, seed, target, method, next_epoch)
    elif method.startswith("tp-"):
        final, info = run_tp(model, task, cfg, epochs, target, method, next_epoch)
    else:
        final, info = run_legacy(model, task, cfg, epochs, seed, target, method, next_epoch)
    macs = count_macs(final, task.in_size, zero_aware=False)
    return {"method": method, "budget": job["budget"], "epochs": epochs, "seed": seed, "target_macs": target,
            "macs": macs, "dense_macs": dense_macs, "macs_error": macs / target - 1,
            "val_top1": evaluate(final, task.x_val, task.y_val), "params": sum(p.numel() for p in final.parameters()),
            "train_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, **info}
