"""CLS ResNet-50 training steps with AMP + channels_last: dense vs masked CHEX vs compact CHEX, side by side.

Every configuration trains through the recipe's objects: SGD (momentum 0.875, BN without weight decay), fp16
autocast with a ``GradScaler`` pinned to the static loss scale 128 (``--amp --static-loss-scale 128``), one
``chex_core.engine.TrainStep`` per configuration (loss all-reduce/finite check, scaler, optimizer, explorer hook):

  - dense;
  - masked CHEX at S (upstream: dense compute plus ``explorer.apply_masks`` after every step). The mask
    re-application is also timed on its own, as a share of the dense step;
  - compact CHEX (``chex_core.physical.PhysicalTraining``: the model holds only the active channels) at the densities
    the S schedule passes through (1 − S + δ0 down to 1 − S); widths uniform per group at density k;
  - one exploration event, masked (``ChannelExplorer.explore``) and compact (widen → explore → narrow → optimizer
    rebuild), medians of ``events`` events.

The batch is the largest of 256, 224, …, 32 (≤ ``max_batch``) at which a dense step fits in memory. The whole upstream
recipe (250 epochs of ImageNet, ΔT = 2, T_max = 180, δ0 = 0.3) is then projected from the measured step times as
``benchmarks/training_cost.py`` does on CPU: compact training runs epoch e at density k_e (linear interpolation
between the measured densities), every event adds its measured time.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from benchmarks.training_cost import IMAGENET_TRAIN, density_curve, interpolate, upstream_sgd
from chex_core import ChannelExplorer, ExplorationSchedule, count_macs, resnet_groups
from chex_core.engine import AmpConfig, TrainStep
from chex_core.physical import PhysicalTraining

from .common import Config, free_memory, is_oom, median, time_once

RECIPE = {"epochs": 250, "delta_t": 2, "t_max": 180}
CANDIDATE_BATCHES = (256, 224, 192, 160, 128, 96, 64, 32, 16, 8, 4, 2, 1)
CL = torch.channels_last


class Runner:
    """One training configuration (dense, masked or compact at density k) and its ``TrainStep``."""

    def __init__(self, name: str, kind: str, density: float, cfg: Config, schedule: ExplorationSchedule | None = None):
        self.name, self.kind, self.density, self.device = name, kind, density, cfg.device
        torch.manual_seed(cfg.seed)
        model = torchvision.models.resnet50(weights=None).to(cfg.device, memory_format=CL)
        opt = upstream_sgd(model)
        self.amp = AmpConfig(enabled=True, device_type=cfg.device.type, static_loss_scale=cfg.static_loss_scale,
                             dtype=cfg.amp_dtype)
        self.explorer = self.phys = None
        hook = None
        if kind != "dense":
            # δ0 = 0 and a far event keep the sub-model at density k while timing (unless a schedule is given)
            sched = schedule or ExplorationSchedule(10**6, 10**6, 1.0 - density, 0.0, steps_per_unit=1)
            self.explorer = ChannelExplorer(model, resnet_groups(model), sched, seed=cfg.seed)
            self.explorer.start(opt)
            hook = self.explorer
            if kind == "compact":
                # wrap keeps channels_last across rebuilds (resized tensors are created contiguous)
                self.phys = PhysicalTraining(model, self.explorer, opt, wrap=lambda m: m.to(memory_format=CL))
                self.phys.start()
                hook = self.phys
        self.model = model
        self.trainer = TrainStep(self.phys.optimizer if self.phys else opt, scaler=self.amp.make_scaler(),
                                 static_loss_scale=cfg.static_loss_scale, explorer=hook)
        if self.phys is not None:
            self.phys.trainer = self.trainer
        self.macs = count_macs(self.train_model, (3, 224, 224), zero_aware=self.kind == "masked")
        self.times: list[float] = []

    @property
    def train_model(self) -> nn.Module:
        return self.phys.train_model if self.phys is not None else self.model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.amp.autocast():
            loss = nn.functional.cross_entropy(self.train_model(x), y)
        self.trainer({"loss": loss})


def _fits(cfg: Config, batch: int) -> bool:
    """Two dense AMP steps at ``batch`` run without running out of memory (everything is freed on return)."""
    try:
        r = Runner("probe", "dense", 1.0, cfg)
        x, y = _inputs(cfg, batch)
        for _ in range(2):
            r.step(x, y)
        return True
    except RuntimeError as exc:                   # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_oom(exc):
            raise
        return False


def largest_batch(cfg: Config) -> tuple[int, list[str]]:
    """The largest candidate batch ≤ ``max_batch`` at which two dense AMP steps fit in memory."""
    tried = []
    for b in (c for c in CANDIDATE_BATCHES if c <= cfg.max_batch):
        fits = _fits(cfg, b)
        free_memory(cfg.device)                   # after _fits returned: its frames (and an OOM's) are gone
        if fits:
            return b, tried
        tried.append(f"batch {b}: out of memory")
    raise RuntimeError("no batch size fits in memory")


def _inputs(cfg: Config, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(cfg.device).contiguous(memory_format=CL)
    return x, torch.randint(0, 1000, (batch,), generator=g).to(cfg.device)


def event_seconds(cfg: Config) -> dict[str, float]:
    """Median seconds of one exploration event, masked and compact; events every step, T_max far so δ ≈ δ0."""
    out = {}
    for kind in ("masked", "compact"):
        sched = ExplorationSchedule(1, 10**6, cfg.sparsity, cfg.delta0, steps_per_unit=1)
        r = Runner(f"event-{kind}", kind, 1.0 - cfg.sparsity + cfg.delta0, cfg, schedule=sched)
        hook = r.phys if r.phys is not None else r.explorer
        times = [time_once(lambda s=s: hook.after_step(s, r.trainer.optimizer), cfg.device)
                 for s in range(1, cfg.events + 1)]
        out[kind] = median(times)
        del r
        free_memory(cfg.device)
    return out


def projection(cfg: Config, batch: int, t: dict[str, float], per_k: dict[float, float], events: dict) -> dict:
    """Whole-recipe cost of masked and compact CHEX relative to dense training, from the measured step times."""
    steps_per_epoch = IMAGENET_TRAIN / batch
    curve = density_curve(cfg.sparsity, cfg.delta0, RECIPE["epochs"], RECIPE["delta_t"], RECIPE["t_max"])
    n_events = len(range(RECIPE["delta_t"], RECIPE["t_max"] + 1, RECIPE["delta_t"]))
    dense_run = RECIPE["epochs"] * steps_per_epoch * t["dense"]
    masked_run = RECIPE["epochs"] * steps_per_epoch * t["masked"] + n_events * events["masked"]
    compact_run = sum(interpolate(per_k, k) for k in curve) * steps_per_epoch + n_events * events["compact"]
    return {"recipe": {**RECIPE, "delta0": cfg.delta0, "sparsity": cfg.sparsity, "events": n_events},
            "mean_density": sum(curve) / len(curve), "masked_vs_dense": masked_run / dense_run,
            "compact_vs_dense": compact_run / dense_run, "compact_vs_masked": compact_run / masked_run,
            "dense_run_gpu_hours": dense_run / 3600}


def run(cfg: Config, deadline=None) -> dict:
    batch, oom = largest_batch(cfg) if cfg.device.type == "cuda" else (cfg.max_batch, [])
    runners = [Runner("dense", "dense", 1.0, cfg), Runner(f"masked S={cfg.sparsity:g}", "masked",
                                                          1.0 - cfg.sparsity, cfg)]
    runners += [Runner(f"compact k={k:g}", "compact", k, cfg) for k in cfg.densities]
    x, y = _inputs(cfg, batch)
    for r in runners:
        for _ in range(cfg.train_warmup):
            r.step(x, y)
    for _ in range(cfg.train_rounds):
        for r in runners:
            r.times += [time_once(lambda r=r: r.step(x, y), cfg.device) for _ in range(cfg.train_steps)]
    masked = runners[1]
    mask_s = median([time_once(lambda: masked.explorer.apply_masks(masked.trainer.optimizer), cfg.device)
                     for _ in range(max(10, cfg.train_steps * 4))])
    t = {r.kind if r.kind != "compact" else r.name: median(r.times) for r in runners}
    dense_macs = runners[0].macs
    rows = [{"config": r.name, "density": r.density, "step_s": median(r.times), "vs_dense": median(r.times) / t["dense"],
             "images_per_s": batch / median(r.times), "macs_vs_dense": r.macs / dense_macs} for r in runners]
    del runners, masked
    free_memory(cfg.device)
    events = event_seconds(cfg)
    per_k = {1.0: t["dense"], **{round(k, 6): t[f"compact k={k:g}"] for k in cfg.densities}}
    proj = projection(cfg, batch, t, per_k, events)
    problems = [f"{r['config']}: step time {r['step_s']}" for r in rows if not r["step_s"] > 0]
    return {"ok": not problems, "problems": problems, "batch": batch, "batch_search": oom,
            "image_size": cfg.image_size, "dtype": str(cfg.amp_dtype), "rows": rows,
            "mask_reapply_s": mask_s, "mask_reapply_share_of_dense_step": mask_s / t["dense"],
            "event_s": events, "event_share_of_epoch": {k: v / (IMAGENET_TRAIN / batch * t["dense"])
                                                        for k, v in events.items()},
            "projection": proj}
