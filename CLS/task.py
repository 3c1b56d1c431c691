"""CLS as a run-harness task: the NVIDIA ConvNets recipe with CHEX on the whole ResNet (see docs/harness.md), plus
the weight loading and the ``--evaluate`` path that CLS/main.py shares with it."""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from chex_core import count_macs, count_params, resnet_groups
from chex_core.checkpoint import CheckpointError
from chex_tasks.harness import Layout, LRSchedule, Run, Task, UserError

from . import data as cls_data
from . import model as cls_model
from . import report, training

log = logging.getLogger("CLS")


class ClsTask(Task):
    """The NVIDIA ConvNets recipe with CHEX on the whole ResNet, as a run-harness task."""

    name = "CLS"
    layout = Layout(model_key="state_dict", ddp_prefix=True, compact_name="compact.pth")

    def __init__(self, args, loaders: cls_data.Loaders, weights, meta: dict):
        self.args, self.loaders, self.weights, self.meta = args, loaders, weights, meta
        self.raport: report.Raport | None = None
        self.previous_raport: dict | None = None
        self.val = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}

    def build_model(self, run: Run) -> torch.nn.Module:
        model = build_network(self.args, self.loaders.num_classes, self.weights, self.meta)
        return model.to(memory_format=torch.channels_last if self.args.memory_format == "nhwc"
                        else torch.contiguous_format)

    def flops_input_size(self, run: Run) -> tuple[int, int, int]:
        return (3, self.loaders.image_size, self.loaders.image_size)

    def train_loader(self, run: Run):
        return self.loaders.train

    def steps(self, run: Run, loader) -> tuple[int, int, int]:
        args = self.args
        accum = 1
        if args.optimizer_batch_size > 0:
            per_step = args.batch_size * run.rt.world_size
            if args.optimizer_batch_size % per_step:
                raise UserError(f"--optimizer-batch-size ({args.optimizer_batch_size}) must be a multiple of -b x "
                                f"processes ({args.batch_size} x {run.rt.world_size} = {per_step})")
            accum = args.optimizer_batch_size // per_step
        if len(loader) < accum:
            raise UserError(f"one epoch has {len(loader)} mini-batches per process, fewer than the {accum} that "
                            "--optimizer-batch-size accumulates; lower --optimizer-batch-size or -b")
        return args.epochs, len(loader) // accum, accum

    def param_groups(self, model):
        return training.param_groups(model, self.args.weight_decay, self.args.bn_weight_decay)

    def optimizer(self, run: Run, model):
        return torch.optim.SGD(self.param_groups(model), lr=self.args.lr, momentum=self.args.momentum,
                               nesterov=self.args.nesterov)

    def lr_schedule(self, run: Run) -> LRSchedule:
        a, spe = self.args, run.steps_per_epoch
        return LRSchedule(a.lr_schedule, total_steps=spe * a.epochs, warmup_steps=spe * a.warmup,
                          milestones=[e * spe for e in a.lr_steps], gamma=a.lr_decay)

    def forward(self, run: Run, model, batch):
        images, labels = (t.to(run.rt.device, non_blocking=True) for t in batch)
        target = labels
        if self.args.mixup > 0:
            images, target = training.mixup_batch(images, labels, self.args.mixup, self.loaders.num_classes,
                                                  self.args.label_smoothing)
        with run.amp.autocast():
            logits = model(images)
        return {"loss": training.SmoothedMixupLoss(self.args.label_smoothing)(logits, target)}, images.size(0)

    def resume_checks(self, run: Run, ckpt: dict, path: str) -> None:
        arch = ckpt.get("arch")
        arch = arch[0] if isinstance(arch, (list, tuple)) else arch
        if arch and arch != self.args.arch:
            raise UserError(f"--resume {path} was saved for {arch}, not --arch {self.args.arch}")

    def extra_state(self, run: Run) -> dict:
        a = self.args
        return {"arch": a.arch, "best_prec1": run.best, "num_classes": a.num_classes, "cifar_stem": a.cifar_stem,
                "image_size": a.image_size, "raport": self.raport.data if self.raport else None}

    def load_extra_state(self, run: Run, ckpt: dict) -> None:
        best = ckpt.get("best_prec1")
        run.best = float(best) if best is not None else float("nan")
        run.manager.best = run.best if math.isfinite(run.best) else None
        self.previous_raport = ckpt.get("raport")

    def prepare(self, run: Run) -> None:
        # the dense reference model draws from the global generator: here, before a resume restores the RNG states
        a = self.args
        self.dense_macs = cls_model.dense_macs_of(a.arch, self.loaders.num_classes, a.cifar_stem,
                                                  self.loaders.image_size)
        self.raport = report.Raport(Path(a.workspace) / a.raport_file, a, run.rt.is_main, self.previous_raport)

    def on_event(self, run: Run, ev) -> None:
        if run.rt.is_main:
            macs = count_macs(run.model, self.flops_input_size(run))
            run.tb.scalar("chex/macs", macs, ev.step)
            log.info("CHEX event at step %d: FLOPs %s (%.1f%% of dense), density %.3f", ev.step, report.giga(macs),
                     100.0 * macs / self.dense_macs, ev.density)

    def end_epoch(self, run: Run, epoch: int, stats: dict) -> float:
        val = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
        if not self.args.training_only:
            val = training.evaluate(run.model, self.loaders.val, run.rt.device, run.amp, progress=self.bar)
        self.val = val
        macs = count_macs(run.model, self.flops_input_size(run)) if run.rt.is_main else 0
        self.raport.add_epoch({
            "epoch": epoch, "step": run.trainer.step_count, "train_loss": stats["loss"], "lr": stats["lr"],
            "images_per_s": stats["images_per_s"], "time_s": stats["time_s"], "val_top1": val["top1"],
            "val_top5": val["top5"], "val_loss": val["loss"], "macs": macs,
            "density": run.explorer.density() if run.explorer is not None else 1.0,
            "amp_skipped_steps": run.trainer.skipped_steps})
        run.tb.scalars("val", {"top1": val["top1"], "top5": val["top5"], "loss": val["loss"]}, epoch)
        run.tb.scalar("flops/macs", macs, epoch)
        log.info("epoch %d/%d: train loss %.4f, val top-1 %.2f%% top-5 %.2f%%, FLOPs %s (%.1f%% of dense), "
                 "%.0f img/s", epoch, self.args.epochs - 1, stats["loss"], val["top1"], val["top5"],
                 report.giga(macs), 100.0 * macs / self.dense_macs, stats["images_per_s"])
        return val["top1"]

    def export_metadata(self, run: Run) -> dict:
        a = self.args
        return {"arch": a.arch, "num_classes": self.loaders.num_classes, "cifar_stem": bool(a.cifar_stem),
                "image_size": self.loaders.image_size}

    def finish(self, run: Run) -> None:
        """Export ``compact.pth``, evaluate it, and print dense vs masked vs compact FLOPs, params and accuracy."""
        a, net = self.args, run.model
        masks = None if run.explorer is not None else \
            cls_model.masks_from_zeros(net, resnet_groups(net, residual=a.chex_residual))
        small, spec, path = run.export_compact(masks)
        small = small.to(run.rt.device)
        val = self.val if not a.training_only else \
            training.evaluate(net, self.loaders.val, run.rt.device, run.amp, progress=self.bar)
        cval = training.evaluate(small, self.loaders.val, run.rt.device, run.amp, progress=self.bar)
        rep = report.model_report(net, a.arch, self.loaders.num_classes, a.cifar_stem, self.loaders.image_size,
                                  residual=a.chex_residual)
        rep["compact_macs"] = count_macs(small, self.flops_input_size(run), zero_aware=False)
        rep["compact_params"] = count_params(small, zero_aware=False)
        rep["compact_macs_reduction_pct"] = cls_model.reduction(rep["compact_macs"], rep["dense_macs"])
        log.info("=" * 100)
        report.log_model_report(rep, "final masked model")
        log.info("%-16s %-12s %-10s %-8s %-8s", "model", "FLOPs(MACs)", "params", "top-1", "top-5")
        for name, macs, params, v in ((f"dense {a.arch}", rep["dense_macs"], rep["dense_params"], None),
                                      ("masked (zeros)", rep["macs"], rep["params_nonzero"], val),
                                      ("compact", rep["compact_macs"], rep["compact_params"], cval)):
            acc = ("-", "-") if v is None else (f"{v['top1']:.2f}", f"{v['top5']:.2f}")
            log.info("%-16s %-12s %-10s %-8s %-8s", name, report.giga(macs), report.mega(params), *acc)
        log.info("compact model saved to %s (FLOPs reduction %.1f%%)", path, rep["compact_macs_reduction_pct"])
        self.raport.set("final", {**rep, "masked_top1": val["top1"], "masked_top5": val["top5"],
                                  "compact_top1": cval["top1"], "compact_top5": cval["top5"],
                                  "compact_path": str(path), "cfg": spec})


def read_weights(args: argparse.Namespace):
    """``(state_dict, meta)`` of ``--pretrained-weights`` or ``(None, {})``; checks the recorded arch."""
    if not args.pretrained_weights:
        return None, {}
    try:
        sd, meta = cls_model.read_weight_file(args.pretrained_weights)
    except cls_model.WeightsError as exc:
        raise UserError(f"--pretrained-weights: {exc}") from None
    if meta.get("arch") and meta["arch"] != args.arch:
        raise UserError(f"--pretrained-weights {args.pretrained_weights} was saved for {meta['arch']}, "
                        f"not --arch {args.arch}")
    return sd, meta


def build_network(args: argparse.Namespace, num_classes: int, weights, meta: dict) -> torch.nn.Module:
    """The ResNet for this run: CHEX init when exploring (fan_out, γ=0.5), then the given weights if any."""
    if args.grow_prune:
        conv_init, gamma = "fan_out", 0.5
        if args.model_config != "classic":
            log.info("-c %s: CHEX uses its own init (kaiming fan_out, BN gamma 0.5), as upstream", args.model_config)
    else:
        conv_init, gamma = ("fan_in" if args.model_config == "fanin" else "fan_out"), 1.0
    args.cifar_stem = bool(args.cifar_stem or meta.get("cifar_stem"))
    model = cls_model.build_model(args.arch, num_classes, cifar_stem=args.cifar_stem, conv_init=conv_init,
                                  bn_gamma=gamma)
    if weights is not None:
        try:
            cls_model.load_weights(model, weights, source=args.pretrained_weights, arch=args.arch, cfg=meta.get("cfg"))
        except (cls_model.WeightsError, ValueError) as exc:
            raise UserError(f"--pretrained-weights: {str(exc).splitlines()[0]}") from None
        log.info("loaded weights from %s", args.pretrained_weights)
    return model


def run_evaluation(args, model, loaders, amp, rt, bar) -> int:
    """Upstream's ``--evaluate``: top-1/top-5 of the given weights, then FLOPs/params. Nothing is written."""
    if args.resume and not args.pretrained_weights:
        try:
            sd, meta = cls_model.read_weight_file(args.resume)
            cls_model.load_weights(model, sd, source=args.resume, arch=args.arch, cfg=meta.get("cfg"))
        except (CheckpointError, cls_model.WeightsError, ValueError) as exc:
            raise UserError(f"--resume: {str(exc).splitlines()[0]}") from None
    t0 = time.perf_counter()
    val = training.evaluate(model, loaders.val, rt.device, amp, progress=bar)
    log.info("evaluation of %s (%s) on %d images: top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%.1f s)",
             args.pretrained_weights or args.resume or "random init", args.arch, val["n"], val["top1"], val["top5"],
             val["loss"], time.perf_counter() - t0)
    if rt.is_main:
        rep = report.model_report(model, args.arch, loaders.num_classes, args.cifar_stem, loaders.image_size,
                                  residual=args.chex_residual)
        report.log_model_report(rep, "evaluated model")
        print(json.dumps(report.finite({"top1": val["top1"], "top5": val["top5"], "loss": val["loss"], "n": val["n"],
                                        **rep})), flush=True)
    return 0
