"""The run harness: one training run of any task, from setup to the last checkpoint.

:class:`Run` owns what CLS, DET and SEG do the same way:

- the model on its device, the optimizer (the task's parameter groups), the per-step LR schedule, AMP and its
  GradScaler, the CHEX explorer on the task's prunable sub-module, ``chex_core.engine.TrainStep``, and compact
  training (``chex_core.physical.PhysicalTraining``) with DDP re-wrapped after every rebuild;
- resume (``--resume auto|PATH``, the same rules everywhere, see ``chex_tasks.harness.checkpoint``) or a fresh
  start with rank 0's weights broadcast before exploration starts;
- the step loop on the loss-dict contract (``task.forward`` returns ``{name: loss}``), progress bar, log lines,
  TensorBoard scalars, ``args.json``, checkpoints at epoch ends and every ``--checkpoint-every`` steps, with the
  data-loader position and every rank's RNG state, so a resumed run repeats the straight one bit for bit;
- compact export in one format (``chex_tasks.export``).

Rank agreement: ranks draw different augmentation, so after every exploration event and before every checkpoint or
evaluation the model's buffers (BatchNorm statistics) are broadcast from rank 0; DDP does the same at every forward,
so this changes nothing rank 0 computes, and every rank holds the state rank 0 saves.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from chex_core import compact_model
from chex_core import distributed as dist_utils
from chex_core.checkpoint import CheckpointManager
from chex_core.cli import explorer_from_args, groups_from_args
from chex_core.engine import AmpConfig, TrainStep, sync_context
from chex_core.physical import PhysicalTraining, ddp_wrapper
from chex_tasks import export as compact_export
from chex_tasks.progress import TensorBoardWriter, args_to_dict, progress, progress_enabled, save_args

from . import checkpoint as ck
from .runtime import Runtime, UserError, capture_rng, restore_rng
from .task import Task

__all__ = ["Run", "make_amp", "sync_buffers", "check_compact_training"]

log = logging.getLogger("chex_tasks.harness")


def make_amp(enabled: bool, device: torch.device, static_loss_scale: float | None = None) -> AmpConfig:
    """``--amp`` → fp16 + GradScaler on CUDA (pinned at ``static_loss_scale`` when given), bf16 without a scaler on
    CPU (with a warning: bf16 autocast is slower than fp32 on most CPUs)."""
    if enabled and device.type != "cuda":
        warnings.warn("--amp on CPU uses bfloat16 autocast without loss scaling; it is usually slower than fp32",
                      stacklevel=2)
    return AmpConfig(enabled=enabled, device_type=device.type, static_loss_scale=static_loss_scale)


def sync_buffers(model: nn.Module) -> None:
    """Every buffer (BatchNorm running statistics, counters) from rank 0 to the other ranks."""
    for buf in model.buffers():
        dist_utils.broadcast_tensor_(buf)


def check_compact_training(model: nn.Module, groups) -> None:
    """``--compact-training`` narrows the norm layers of the explored groups: refuse GroupNorm (its statistics span
    groups of channels, so removing channels changes what the others compute) with one line."""
    mods = dict(model.named_modules())
    if any(isinstance(mods[n], nn.GroupNorm) for g in groups if g.kind != "downsample" for n in g.norms):
        raise UserError("--compact-training needs BatchNorm in the explored layers; this model's are GroupNorm "
                        "(train it masked, or with a BatchNorm body, e.g. SEG --norm bn)")


class Run:
    """One training run. ``Run(task, args, rt, workspace).train()`` does setup, the loop and the end."""

    def __init__(self, task: Task, args, rt: Runtime, workspace: str | os.PathLike | None, *,
                 amp: AmpConfig | None = None, print_freq: int = 0):
        self.task, self.args, self.rt = task, args, rt
        self.workspace = Path(workspace) if workspace else None
        self.amp = amp or make_amp(bool(getattr(args, "amp", False)), rt.device)
        self.print_freq = print_freq
        self.epoch = 0                  # the next epoch to train
        self.micro = 0                  # micro-batches of self.epoch already consumed (mid-epoch resume)
        self.best = float("nan")
        self.pending_loader: list | None = None
        self.last_saved: str | None = None
        self.bar_enabled = bool(getattr(args, "progress", None)) if getattr(args, "progress", None) is not None \
            else progress_enabled(rt.is_main)
        self.manager = CheckpointManager(str(self.workspace), keep=getattr(args, "keep_checkpoints", 3),
                                         name_format=task.layout.name_format) if self.workspace else None
        self.tb = TensorBoardWriter(None, is_main=False)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Loader, model, optimizer, schedule, explorer, compact training; resume or start; wrap; outputs."""
        task, args = self.task, self.args
        self.loader = task.train_loader(self)
        self.epochs, self.steps_per_epoch, self.accum = task.steps(self, self.loader)
        self.end_epoch = self.epochs
        self.model = task.build_model(self).to(self.rt.device)
        self.optimizer = task.optimizer(self, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, task.lr_schedule(self))
        self.scaler = self.amp.make_scaler()
        self._build_explorer()
        self.trainer = TrainStep(self.optimizer, scaler=self.scaler, static_loss_scale=self.amp.static_loss_scale,
                                 explorer=self.phys or self.explorer, accum_steps=self.accum,
                                 lr_scheduler=self.scheduler)
        if self.phys is not None:
            self.phys.trainer = self.trainer
        resume = getattr(args, "resume", None)
        path = None if resume == "auto" and self.manager is None else ck.find_resume(resume, self.manager)
        ckpt = self._read_resume(path) if path else None
        if ckpt is not None:
            self._restore(ckpt, path)
        else:
            self._start()
        self._wrap()
        if self.workspace is not None and self.rt.is_main:
            save_args(args, self.workspace)
            if getattr(args, "tensorboard", True):
                self.tb = TensorBoardWriter(self.workspace / "tb", is_main=True)
        log.info("%s: training epochs %d..%d (step %d of %d), world %d x batch %s, %d micro-batch(es) per step, "
                 "%d steps/epoch, device %s", task.name, self.epoch, self.end_epoch - 1, self.trainer.step_count,
                 self.epochs * self.steps_per_epoch, self.rt.world_size, getattr(self.loader, "batch_size", None)
                 or getattr(self.loader.batch_sampler, "batch_size", "?"), self.accum, self.steps_per_epoch,
                 self.rt.device)
        task.prepare(self)
        if ckpt is not None:       # last: building the model and the loader drew from the global generators
            self._restore_rng(ckpt.get("rng"))

    def _build_explorer(self) -> None:
        """The explorer sees the whole model, with the channel groups found within the task's prunable sub-module
        (module names relative to the model, group names to the sub-module): a residual group (``--chex-residual``)
        can then reach the layers outside that read its stream (``task.stage_consumers``), and masks, MRU store,
        compact export and compact training all resolve names in one namespace (docs/algorithm.md §2.1)."""
        args, task = self.args, self.task
        self.prunable = self.model.get_submodule(task.prunable_path) if task.prunable_path else self.model
        try:
            self.groups = groups_from_args(args, self.model, within=task.prunable_path,
                                           stage_consumers=task.stage_consumers) if args.grow_prune else None
            self.explorer = explorer_from_args(args, self.model, self.groups,
                                               steps_per_unit=task.units_per_step(self, self.steps_per_epoch),
                                               input_size=task.flops_input_size(self), flops_within=task.prunable_path)
        except ValueError as exc:          # e.g. an unreachable --target-flops
            raise UserError(str(exc)) from None
        if self.explorer is not None and args.T_max * task.units_per_step(self, self.steps_per_epoch) > \
                self.epochs * self.steps_per_epoch:
            log.warning("--T_max %d is beyond the end of training: the final sparsity %.2f is never reached",
                        args.T_max, args.channel_sparsity)
        self.phys = None
        if getattr(args, "compact_training", False):
            check_compact_training(self.model, self.groups)
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.phys = PhysicalTraining(
                self.model, self.explorer, self.optimizer, mode=args.compact_training_mode,
                lr_scheduler=self.scheduler, on_rebuild=self._follow_rebuild,
                wrap=ddp_wrapper(device_ids=ids) if self.rt.distributed else None,
                param_groups=lambda m: [g["params"] for g in task.param_groups(m)])

    def _follow_rebuild(self, phys: PhysicalTraining) -> None:
        """Compact training replaced layers, optimizer and wrapper: point the run (and so the loop) at the new ones."""
        self.optimizer, self.train_model = phys.optimizer, phys.train_model

    def _start(self) -> None:
        """Fresh run: rank 0's initial weights everywhere (ranks were seeded differently), then exploration starts.
        The broadcast must precede ``explorer.start``, which stores this rank's pruned filters as MRU values."""
        for tensor in self.model.state_dict().values():
            dist_utils.broadcast_tensor_(tensor)
        if self.explorer is not None:
            self.explorer.start(self.optimizer)
            if self.phys is not None:
                self.phys.start()

    def _wrap(self) -> None:
        if self.phys is not None:
            self.train_model = self.phys.train_model           # DDP-wrapped by PhysicalTraining when distributed
        elif self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.train_model = self.model

    # ------------------------------------------------------------------ checkpoints
    def _read_resume(self, path: str) -> dict:
        ckpt = ck.read_resume(path)
        ck.check_complete(ckpt, path, task=self.task.name, layout=self.task.layout,
                          explorer=self.explorer is not None, physical=self.phys is not None)
        self.task.resume_checks(self, ckpt, path)
        return ckpt

    def _restore(self, ckpt: dict, path: str) -> None:
        """Model, optimizer, explorer (or compact training), scheduler, scaler, counters, position, task extras."""
        state = ck.model_state(ckpt)
        try:
            if self.phys is not None:   # narrow the dense model to the checkpoint's widths, then load
                self.phys.load_state_dict(ckpt["physical"], explorer_state=ckpt["explorer"], model_state=state,
                                          optimizer_state=ckpt["optimizer"])
                self.optimizer = self.phys.optimizer
            else:
                problems = _load_model(self.model, state)
                if problems:
                    raise UserError(f"--resume {path} does not fit this model: {problems}")
                self.optimizer.load_state_dict(ckpt["optimizer"])
                if self.explorer is not None:
                    self.explorer.load_state_dict(ckpt["explorer"], self.optimizer)
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt["scaler"]:                       # a disabled GradScaler saves {} and refuses to load it
                self.scaler.load_state_dict(ckpt["scaler"])
            self.trainer.load_state_dict(ckpt["trainer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"--resume {path}: {str(exc).splitlines()[0]}") from None
        self._restore_position(ckpt)
        self.task.load_extra_state(self, ckpt)
        log.info("resuming from %s (epoch %d done, iteration %d%s)", path, int(ckpt.get("epoch", 0)),
                 self.trainer.step_count, f", batch {self.micro} of epoch {self.epoch}" if self.micro else "")

    def _restore_position(self, ckpt: dict) -> None:
        pos = ckpt.get("position") or {"epoch": int(ckpt.get("epoch", 0)), "micro": 0}
        self.epoch, self.micro = int(pos["epoch"]), int(pos.get("micro", 0))
        per_epoch = self.steps_per_epoch * self.accum
        loaders = ckpt.get("loader")
        if self.micro and (pos.get("micro_per_epoch") != per_epoch or not isinstance(loaders, list)
                           or len(loaders) != self.rt.world_size):
            warnings.warn(f"--resume: the checkpoint is {self.micro} micro-batches into epoch {self.epoch}, but its "
                          "data position does not map onto this run (other world size, batch size or "
                          f"accumulation): restarting epoch {self.epoch} from its first batch", stacklevel=2)
            self.micro = 0
        elif self.micro:
            self.pending_loader = loaders
        expected = self.epoch * self.steps_per_epoch + self.micro // self.accum
        if self.trainer.step_count != expected:
            warnings.warn(f"--resume: the checkpoint is at optimizer step {self.trainer.step_count}, this run's "
                          f"schedule puts epoch {self.epoch} (+{self.micro} micro-batches) at step {expected}; the "
                          "step counter, and with it the LR and exploration schedules, carries on", stacklevel=2)
        self.trainer.micro = 0

    def _restore_rng(self, rng) -> None:
        if isinstance(rng, list) and len(rng) == self.rt.world_size:
            restore_rng(rng[self.rt.rank])
            return
        log.warning("--resume: the checkpoint holds RNG states for %d process(es), this run has %d; augmentation "
                    "draws restart from --seed, so the run will not repeat an uninterrupted one bit for bit",
                    len(rng) if isinstance(rng, list) else 0, self.rt.world_size)

    def state_dict(self, at_epoch_end: bool) -> dict:
        """The checkpoint (collective: gathers every rank's RNG and loader state; call on all ranks)."""
        layout = self.task.layout
        sd = self.train_model.state_dict() if layout.ddp_prefix else self.model.state_dict()
        loader = None if at_epoch_end else dist_utils.all_gather_object(self.loader.state_dict())
        return {layout.model_key: sd, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "trainer": self.trainer.state_dict(),
                "explorer": self.explorer.state_dict() if self.explorer is not None else None,
                "physical": self.phys.state_dict() if self.phys is not None else None,
                "epoch": self.epoch, "iteration": self.trainer.step_count,
                "position": {"epoch": self.epoch, "micro": self.micro,
                             "micro_per_epoch": self.steps_per_epoch * self.accum},
                "loader": loader, "rng": dist_utils.all_gather_object(capture_rng()),
                "args": args_to_dict(self.args), "harness": ck.LAYOUT_VERSION, **self.task.extra_state(self)}

    def save(self, at_epoch_end: bool, metric: float | None = None) -> str | None:
        """Write a checkpoint (all ranks call; rank 0 writes) and the task's upstream aliases."""
        if self.manager is None or not getattr(self.args, "save_checkpoints", True):
            return None
        sync_buffers(self.model)
        path = self.manager.save(self.state_dict(at_epoch_end), self.trainer.step_count, metric=metric)
        layout = self.task.layout
        if path is not None:
            if at_epoch_end and layout.epoch_alias:
                ck.publish_alias(path, str(self.workspace / layout.epoch_alias.format(n=self.epoch - 1)))
                ck.prune_aliases(str(self.workspace), layout.epoch_alias, self.manager.keep)
            if layout.pointer_name:
                ck.write_pointer(str(self.workspace), layout.pointer_name, path)
        self.last_saved = path
        return path

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """Epochs ``self.epoch .. self.end_epoch - 1``, then the task's end (when the schedule is complete)."""
        with _log_through_bar(self.bar_enabled):
            for epoch in range(self.epoch, self.end_epoch):
                stats = self.train_epoch(epoch)
                self.epoch, self.micro = epoch + 1, 0
                sync_buffers(self.model)
                metric = self.task.end_epoch(self, epoch, stats)
                if metric is not None and math.isfinite(metric) and not metric <= self.best:
                    self.best = metric
                self.save(at_epoch_end=True, metric=metric)
        self.tb.flush()
        if self.end_epoch >= self.epochs:
            self.task.finish(self)
            if self.task.layout.final_name and self.last_saved is not None:
                ck.publish_alias(self.last_saved, str(self.workspace / self.task.layout.final_name))
        else:
            log.info("stopped after epoch %d of %d; continue with --resume auto", self.end_epoch, self.epochs)
        self.tb.close()
        dist_utils.barrier()

    def _epoch_batches(self, epoch: int):
        self.loader.set_epoch(epoch)
        if self.pending_loader is not None:
            self.loader.load_state_dict(self.pending_loader[self.rt.rank])
            self.pending_loader = None
        total = self.steps_per_epoch * self.accum
        batches = itertools.islice(self.loader, total - self.micro)
        return progress(batches, total=total - self.micro, desc=f"epoch {epoch}", is_main=self.rt.is_main,
                        enabled=self.bar_enabled)

    def train_epoch(self, epoch: int) -> dict:
        """Train the rest of ``epoch``: exactly ``steps_per_epoch`` optimizer steps of ``accum`` micro-batches (a
        trailing partial window is dropped, so epoch ends and exploration events align on every rank). Returns the
        mean of each loss over the micro-batches, images/s over all ranks, the LR and the time."""
        self.train_model.train()
        sums: dict[str, float] = {}
        n, seen, t0 = 0, 0, time.perf_counter()
        for batch in self._epoch_batches(epoch):
            # self.train_model, not a local: compact training swaps in a rebuilt (re-wrapped) model at events
            with sync_context(self.train_model, self.trainer.is_last_micro()):
                losses, images = self.task.forward(self, self.train_model, batch)
                result = self.trainer(losses)
            self.micro += 1
            n, seen = n + 1, seen + images
            for k, v in result.losses.items():
                sums[k] = sums.get(k, 0.0) + v
            self.after_step(result, epoch, seen / max(time.perf_counter() - t0, 1e-9))
        elapsed = time.perf_counter() - t0
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["loss"] = out.get("loss", sum(out.values()))
        return {**out, "images_per_s": seen * self.rt.world_size / max(elapsed, 1e-9),
                "lr": self.optimizer.param_groups[0]["lr"], "time_s": elapsed}

    def after_step(self, result, epoch: int, rate: float) -> None:
        """After every micro-batch: event bookkeeping, log line, TensorBoard, periodic checkpoint."""
        if not result.stepped:
            return
        step = self.trainer.step_count
        if result.event is not None:
            sync_buffers(self.model)
            self.tb.scalars("chex", {"density": result.event.density, "delta": result.event.delta,
                                     "regrown": result.event.n_regrown}, step)
            self.tb.scalars("widths", result.event.widths, step)
            self.task.on_event(self, result.event)
        if self.print_freq > 0 and step % self.print_freq == 0:
            lr = self.optimizer.param_groups[0]["lr"]
            total = sum(result.losses.values())
            parts = " ".join(f"{k} {v:.4f}" for k, v in result.losses.items()) if len(result.losses) > 1 else ""
            log.info("epoch %d step %d loss %.4f%s lr %.5f %.1f img/s/process", epoch, step, total,
                     f" ({parts})" if parts else "", lr, rate)
            self.tb.scalars("train", {**result.losses, "loss": total, "lr": lr}, step)
        every = getattr(self.args, "checkpoint_every", 0) or 0
        if every and step % every == 0 and self.micro < self.steps_per_epoch * self.accum:
            self.save(at_epoch_end=False)

    # ------------------------------------------------------------------ compact export
    def compact(self, masks: dict | None = None) -> tuple[nn.Module, dict[str, int]]:
        """``(compact copy of the whole model, width spec of the prunable part)`` from the explorer's masks (or
        ``masks``); under compact training the model already is compact. The whole model is sliced, so the layers
        outside the prunable part that read a narrowed residual stream narrow too."""
        if self.phys is not None and self.phys.compact:
            return copy.deepcopy(self.model), self.phys.width_spec()
        masks = masks if masks is not None else self.explorer.masks
        groups = self.groups or groups_from_args(self.args, self.model, within=self.task.prunable_path,
                                                 stage_consumers=self.task.stage_consumers)
        return compact_model(self.model, groups, masks)

    def export_compact(self, masks: dict | None = None) -> tuple[nn.Module, dict, str | None]:
        """Write ``task.layout.compact_name`` in the one compact format (rank 0); returns (model, spec, path)."""
        small, spec = self.compact(masks)
        path = None
        if self.workspace is not None and self.rt.is_main:
            ckpt = compact_export.compact_checkpoint(small, spec, task=self.task.name,
                                                     module=self.task.prunable_path,
                                                     meta=self.task.export_metadata(self))
            path = compact_export.save_compact_checkpoint(ckpt, str(self.workspace / self.task.layout.compact_name))
        return small, spec, path


def _load_model(model: nn.Module, state: dict) -> str:
    from chex_core.checkpoint import state_dict_problems

    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        return "; ".join(problems)
    model.load_state_dict(state, strict=False)
    return ""


def _log_through_bar(active: bool):
    """Route log lines through tqdm while a bar is on screen, so they do not break it."""
    if not active:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
