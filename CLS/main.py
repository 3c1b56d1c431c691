"""CHEX on ImageNet-style classification: train ResNet-18/34/50/101 with channel exploration, or evaluate weights.

Accepts the upstream commands verbatim (run from ``CLS/``)::

    python ./multiproc.py --nproc_per_node 8 ./main.py /data/imagenet --data-backend pytorch \
        --raport-file raport.json -j8 -p 100 --lr 1.024 --optimizer-batch-size 1024 --warmup 8 --arch resnet50 \
        -c fanin --label-smoothing 0.1 --lr-schedule cosine --mom 0.875 --wd 3.0517578125e-05 -b 128 --amp \
        --static-loss-scale 128 --epochs 250 --mixup 0.2 --grow_prune --delta_T 2 --T_max 180 \
        --init_channel_ratio 0.3 --channel_sparsity 0.7
    python ./main.py --data-backend pytorch --arch resnet50 --evaluate --epochs 1 -b 100 /data/imagenet \
        --pretrained-weights ckpt.pth.tar

``torchrun --nproc_per_node N CLS/main.py ...`` works the same. This file maps the upstream flags onto the run
harness (``chex_tasks.harness``, see docs/harness.md), which writes to ``--workspace``: ``checkpoint_NNNNNN.pth``
(N = optimizer steps; upstream keys ``epoch``/``arch``/``state_dict``/``best_prec1``/``optimizer`` plus the rest of
the training state), ``model_best.pth``, ``compact.pth``, the JSON raport, ``args.json`` and TensorBoard ``tb/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (``python ./main.py`` from CLS/, as upstream, or via torchrun): make the repository root
    # importable so ``CLS`` and ``chex_core`` resolve without installing the package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from chex_core import count_macs, count_params  # noqa: E402
from chex_core.checkpoint import CheckpointError, load_checkpoint, strip_prefix  # noqa: E402
from chex_core.cli import add_chex_args, validate_chex_args  # noqa: E402
from chex_core.engine import NonFiniteLossError  # noqa: E402
from chex_tasks.harness import (DataError, Layout, LRSchedule, OneLineParser, Run, Task, UserError,  # noqa: E402
                                add_run_args, check_run_args, make_amp, one_line, start_runtime)
from chex_tasks.harness.lr import DECAYS  # noqa: E402
from chex_tasks.progress import progress  # noqa: E402
from CLS import data as cls_data  # noqa: E402
from CLS import model as cls_model  # noqa: E402
from CLS import report, training  # noqa: E402

log = logging.getLogger("CLS")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="CLS/main.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="dataset root with train/<class>/* and val/<class>/* (pytorch backend only)")
    g = p.add_argument_group("data")
    g.add_argument("--data-backend", default="pytorch",
                   choices=sorted(set(cls_data.BACKENDS) | set(cls_data.BACKEND_ALIASES)),
                   help="pytorch = ImageFolder DIR/train, DIR/val; synthetic = random tensors (speed runs); "
                        "digits = scikit-learn's built-in 8x8 digits upsampled (no download); dali-gpu/dali-cpu "
                        "use the pytorch loader unless a DALI backend is installed")
    g.add_argument("--image-size", type=int, default=None,
                   help="training/validation crop size in pixels (default 224; 32 for digits)")
    g.add_argument("-j", "--workers", type=int, default=4, help="data loading worker processes per process")
    g.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: from the dataset; 1000 for synthetic)")
    g.add_argument("--synthetic-samples", type=int, default=1024,
                   help="training images of the synthetic backend (validation gets a quarter)")
    g.add_argument("--max-bad-images", type=int, default=100,
                   help="unreadable images skipped (and logged) per loader process before the run fails")
    g = p.add_argument_group("model")
    g.add_argument("-a", "--arch", default="resnet50", choices=cls_model.ARCHS, help="network")
    g.add_argument("-c", "--model-config", default="classic", choices=("classic", "fanin"),
                   help="dense-training conv init: classic = kaiming fan_out, fanin = kaiming fan_in. With "
                        "--grow_prune the CHEX init (fan_out, BN gamma 0.5) is used, as upstream")
    g.add_argument("--cifar-stem", action="store_true",
                   help="3x3 stride-1 stem conv without max-pool (same parameter names) for 32-px images")
    g.add_argument("--memory-format", default="nchw", choices=("nchw", "nhwc"),
                   help="tensor layout; nhwc = channels_last (faster on recent GPUs)")
    g.add_argument("--pretrained-weights", default=None, metavar="FILE",
                   help="weights to start from or evaluate: upstream released checkpoints (dense with zeroed "
                        "channels, 'module.' prefix or not), plain torchvision state dicts, or compact.pth")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, help="total training epochs")
    g.add_argument("--run-epochs", type=int, default=-1,
                   help="stop after this many epochs in this invocation (resume later with --resume auto); -1 = all")
    g.add_argument("-b", "--batch-size", type=int, default=256, help="mini-batch size per process")
    g.add_argument("--optimizer-batch-size", type=int, default=-1,
                   help="images per optimizer step over all processes; gradients are accumulated over "
                        "optimizer-batch-size / (batch-size x world size) mini-batches (-1 = no accumulation)")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    g.add_argument("--lr-schedule", default="step", choices=DECAYS, help="decay after warmup, every optimizer step")
    g.add_argument("--lr-steps", type=int, nargs="+", default=[30, 60, 80],
                   help="epochs at which the step schedule multiplies the LR by --lr-decay")
    g.add_argument("--lr-decay", type=float, default=0.1, help="factor of the step schedule")
    g.add_argument("--warmup", type=int, default=0, help="epochs of linear LR warmup")
    g.add_argument("--momentum", "--mom", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--weight-decay", "--wd", type=float, default=1e-4, help="weight decay")
    g.add_argument("--bn-weight-decay", action="store_true",
                   help="apply weight decay to BatchNorm gamma/beta too (off: they are never decayed)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: fp16 autocast + loss scaling on CUDA, bf16 autocast on CPU")
    g.add_argument("--fp16", dest="amp", action="store_true", help="old NVIDIA spelling of --amp")
    g.add_argument("--static-loss-scale", type=float, default=1.0,
                   help="fixed fp16 loss scale (upstream used 128); overflowing steps are skipped")
    g.add_argument("--dynamic-loss-scale", action="store_true",
                   help="dynamic fp16 loss scale (grows/backs off) instead of the static one")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed (data order and augmentation; rank r uses seed+r for augmentation)")
    g = p.add_argument_group("run")
    g.add_argument("--evaluate", action="store_true",
                   help="only evaluate --pretrained-weights (or --resume) on the validation set and report FLOPs")
    g.add_argument("--training-only", action="store_true", help="skip validation during training")
    g.add_argument("--workspace", default="./logs", help="output directory")
    g.add_argument("--raport-file", default="experiment_raport.json",
                   help="JSON file (relative to --workspace) with per-epoch metrics and the final summary")
    g.add_argument("-p", "--print-freq", type=int, default=10, help="log a line every N optimizer steps")
    g.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false",
                   help="do not write checkpoints (compact.pth is still written)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device")
    g = p.add_argument_group("accepted for compatibility with upstream, no effect")
    g.add_argument("--gather-checkpoints", action="store_true",
                   help="upstream kept one file per epoch; see --keep-checkpoints")
    g.add_argument("--checkpoint-filename", default=None, help="files are named checkpoint_NNNNNN.pth")
    g.add_argument("--prof", type=int, default=-1, help="upstream profiling mode; ignored")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by torch.distributed.launch; the LOCAL_RANK environment variable is used")
    add_run_args(p)
    add_chex_args(p, unit="epochs")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values with one line naming the flag (exit 2), before any process group or file is touched."""
    validate_chex_args(parser, args)
    check_run_args(parser, args)
    for flag, value, low in (("--epochs", args.epochs, 1), ("-b/--batch-size", args.batch_size, 1),
                             ("-j/--workers", args.workers, 0), ("--max-bad-images", args.max_bad_images, 0),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.image_size is not None and args.image_size < 8:
        parser.error(f"--image-size must be >= 8, got {args.image_size}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.mixup < 0:
        parser.error(f"--mixup must be >= 0, got {args.mixup}")
    if not args.evaluate and args.warmup >= args.epochs:
        warnings.warn(f"--warmup {args.warmup} >= --epochs {args.epochs}: the LR never leaves its warmup ramp",
                      stacklevel=2)
    if args.pretrained_weights is not None and not os.path.isfile(args.pretrained_weights):
        parser.error(f"--pretrained-weights: file not found: {args.pretrained_weights}")
    backend = args.data_backend if args.data_backend in cls_data.BACKENDS else \
        cls_data.BACKEND_ALIASES.get(args.data_backend, args.data_backend)
    if backend == "pytorch":
        try:
            cls_data.check_image_folder(args.data, need_train=not args.evaluate)
        except DataError as exc:
            parser.error(str(exc))
    if args.evaluate and not (args.pretrained_weights or args.resume):
        warnings.warn("--evaluate without --pretrained-weights or --resume evaluates a randomly initialised model",
                      stacklevel=2)


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
        masks = None if run.explorer is not None else cls_model.masks_from_zeros(net, run.groups)
        small, spec, path = run.export_compact(masks)
        small = small.to(run.rt.device)
        val = self.val if not a.training_only else \
            training.evaluate(net, self.loaders.val, run.rt.device, run.amp, progress=self.bar)
        cval = training.evaluate(small, self.loaders.val, run.rt.device, run.amp, progress=self.bar)
        rep = report.model_report(net, a.arch, self.loaders.num_classes, a.cifar_stem, self.loaders.image_size)
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
        rep = report.model_report(model, args.arch, loaders.num_classes, args.cifar_stem, loaders.image_size)
        report.log_model_report(rep, "evaluated model")
        print(json.dumps(report.finite({"top1": val["top1"], "top5": val["top5"], "loss": val["loss"], "n": val["n"],
                                        **rep})), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """The recipe: setup → weights → data → (evaluate | the run harness: train → compact export)."""
    rt = start_runtime(args, device=None if args.device == "auto" else args.device)
    weights, meta = read_weights(args)  # before the data: a bad file should fail before ImageNet is scanned
    if args.image_size is None and isinstance(meta.get("image_size"), int):
        args.image_size = meta["image_size"]  # evaluate at the size the weights were trained at
    loaders = cls_data.build_loaders(
        args.data_backend, args.data, batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
        need_train=not args.evaluate, rank=rt.rank, world_size=rt.world_size, num_classes=args.num_classes,
        synthetic_samples=args.synthetic_samples, max_bad_images=args.max_bad_images,
        pin_memory=rt.device.type == "cuda", seed=rt.seed)
    args.image_size, args.num_classes = loaders.image_size, loaders.num_classes
    static = None if args.dynamic_loss_scale or args.static_loss_scale <= 0 else float(args.static_loss_scale)
    amp = make_amp(args.amp, rt.device, static)
    task = ClsTask(args, loaders, weights, meta)
    task.bar = (lambda it, total=None, desc="": progress(it, total=total, desc=desc, is_main=rt.is_main,
                                                         enabled=args.progress if rt.is_main else False))
    if args.evaluate:
        return run_evaluation(args, task.build_model(None).to(rt.device), loaders, amp, rt, task.bar)
    harness = Run(task, args, rt, args.workspace, amp=amp, print_freq=args.print_freq)
    harness.setup()
    if args.run_epochs >= 0:
        harness.end_epoch = min(args.epochs, harness.epoch + args.run_epochs)
    harness.train()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        return run(args)
    except (UserError, DataError, cls_model.WeightsError) as exc:
        parser.error(one_line(exc))
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return 1
    finally:
        from chex_core import distributed

        distributed.cleanup()
    return 1


if __name__ == "__main__":
    sys.exit(main())
