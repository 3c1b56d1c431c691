"""CHEX on ImageNet-style classification: train ResNet-18/34/50/101 with channel exploration, or evaluate weights.

Accepts the upstream commands verbatim (run from ``CLS/``)::

    python ./multiproc.py --nproc_per_node 8 ./main.py /data/imagenet --data-backend pytorch \
        --raport-file raport.json -j8 -p 100 --lr 1.024 --optimizer-batch-size 1024 --warmup 8 --arch resnet50 \
        -c fanin --label-smoothing 0.1 --lr-schedule cosine --mom 0.875 --wd 3.0517578125e-05 -b 128 --amp \
        --static-loss-scale 128 --epochs 250 --mixup 0.2 --grow_prune --delta_T 2 --T_max 180 \
        --init_channel_ratio 0.3 --channel_sparsity 0.7
    python ./main.py --data-backend pytorch --arch resnet50 --evaluate --epochs 1 -b 100 /data/imagenet \
        --pretrained-weights ckpt.pth.tar

``torchrun --nproc_per_node N CLS/main.py ...`` works the same (multi-node: add ``--nnodes``, ``--node_rank`` and
``--rdzv_endpoint HOST:PORT``/``--master_addr``/``--master_port``). Built-in demo on 2 CPU cores, no download::

    python CLS/main.py --data-backend digits --arch resnet18 --cifar-stem ... --grow_prune ...

Outputs go to ``--workspace``: ``checkpoint_NNNNNN.pth`` (upstream keys + explorer/scheduler/scaler/args/rng),
``model_best.pth``, ``compact.pth`` (physically smaller model + width spec), the JSON raport, ``args.json`` and
TensorBoard events under ``tb/``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    # Run as a script (``python ./main.py`` from CLS/, as upstream, or via torchrun): make the repository root
    # importable so ``CLS`` and ``chex_core`` resolve without installing the package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from chex_core import ChannelExplorer, compact_model, count_macs, count_params, resnet_groups  # noqa: E402
from chex_core import distributed as dist_utils  # noqa: E402
from chex_core.checkpoint import (CheckpointError, CheckpointManager, capture_rng_state, load_checkpoint,  # noqa: E402
                                  restore_rng_state, save_checkpoint, strip_prefix)
from chex_core.cli import add_chex_args, explorer_from_args, groups_from_args, validate_chex_args  # noqa: E402
from chex_core.engine import AmpConfig, NonFiniteLossError, TrainStep  # noqa: E402
from chex_core.physical import PhysicalTraining, ddp_wrapper  # noqa: E402
from chex_tasks.progress import TensorBoardWriter, args_to_dict, progress, progress_enabled, save_args  # noqa: E402
from CLS import data as cls_data  # noqa: E402
from CLS import model as cls_model  # noqa: E402
from CLS import training  # noqa: E402

log = logging.getLogger("CLS")


class UserError(Exception):
    """A mistake in the command line or its inputs; reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as a single ``prog: error: ...`` line (the usage of ~70 flags would bury it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="CLS/main.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="dataset root with train/<class>/* and val/<class>/* (pytorch backend only)")
    g = p.add_argument_group("data")
    g.add_argument("--data-backend", default="pytorch",
                   choices=list(cls_data.BACKENDS) + sorted(cls_data.BACKEND_ALIASES),
                   help="pytorch = ImageFolder DIR/train, DIR/val; synthetic = random tensors (speed runs); "
                        "digits = scikit-learn's built-in 8x8 digits upsampled (no download); dali-gpu/dali-cpu "
                        "are accepted and use the pytorch loader")
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
    g.add_argument("--lr-schedule", default="step", choices=training.LR_SCHEDULES,
                   help="decay after warmup, updated every optimizer step")
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
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="checkpoint to resume from; 'auto' = newest loadable one in --workspace (or start fresh)")
    g.add_argument("--workspace", default="./logs", help="output directory")
    g.add_argument("--raport-file", default="experiment_raport.json",
                   help="JSON file (relative to --workspace) with per-epoch metrics and the final summary")
    g.add_argument("-p", "--print-freq", type=int, default=10, help="log a line every N optimizer steps")
    g.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false",
                   help="do not write checkpoints (compact.pth is still written)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="rolling checkpoints kept besides model_best")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="write TensorBoard scalars to WORKSPACE/tb")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with ETA (default: only when stdout is a terminal and CI is unset)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="compute device")
    g = p.add_argument_group("accepted for compatibility with upstream, no effect")
    g.add_argument("--gather-checkpoints", action="store_true",
                   help="upstream kept one file per epoch; see --keep-checkpoints")
    g.add_argument("--checkpoint-filename", default=None, help="files are named checkpoint_NNNNNN.pth")
    g.add_argument("--prof", type=int, default=-1, help="upstream profiling mode; ignored")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by torch.distributed.launch; the LOCAL_RANK environment variable is used")
    add_chex_args(p, unit="epochs")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values with one line naming the flag (exit 2), before any process group or file is touched."""
    validate_chex_args(parser, args)
    args.data_backend = cls_data.BACKEND_ALIASES.get(args.data_backend, args.data_backend)
    for flag, value, low in (("--epochs", args.epochs, 1), ("-b/--batch-size", args.batch_size, 1),
                             ("-j/--workers", args.workers, 0), ("--max-bad-images", args.max_bad_images, 0),
                             ("--keep-checkpoints", args.keep_checkpoints, 1), ("--warmup", args.warmup, 0)):
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
    for flag, path in (("--pretrained-weights", args.pretrained_weights),
                       ("--resume", None if args.resume == "auto" else args.resume)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag}: file not found: {path}")
    if args.data_backend == "pytorch":
        try:
            cls_data.check_image_folder(args.data, need_train=not args.evaluate)
        except cls_data.DataError as exc:
            parser.error(str(exc))
    if args.evaluate and not (args.pretrained_weights or args.resume):
        warnings.warn("--evaluate without --pretrained-weights or --resume evaluates a randomly initialised model",
                      stacklevel=2)


def world_accumulation(args: argparse.Namespace, world_size: int) -> int:
    """Micro-batches per optimizer step (NVIDIA's ``batch_size_multiplier``)."""
    if args.optimizer_batch_size < 0:
        return 1
    per_step = args.batch_size * world_size
    if args.optimizer_batch_size % per_step:
        raise UserError(f"--optimizer-batch-size ({args.optimizer_batch_size}) must be a multiple of "
                        f"-b x processes ({args.batch_size} x {world_size} = {per_step})")
    return args.optimizer_batch_size // per_step


# --------------------------------------------------------------------------------------------------- reporting
def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    if not is_main:
        warnings.filterwarnings("ignore")  # one copy of each warning (rank 0's) is enough


def _g(macs: float) -> str:
    return f"{macs / 1e9:.3f}G" if macs >= 1e8 else f"{macs / 1e6:.2f}M"


def _m(params: float) -> str:
    return f"{params / 1e6:.3f}M"


def model_report(model: nn.Module, arch: str, num_classes: int, cifar_stem: bool, image_size: int,
                 residual: bool = False) -> dict:
    """FLOPs (MACs, the paper's convention: conv + fc, batch 1, zero-aware) and params of ``model`` next to the
    dense architecture's, and of its compact version (channels whose γ and β are zero removed; with ``residual``
    also residual-stream channels whose γ and β are zero in every norm of the stream)."""
    size = (3, image_size, image_size)
    dense_macs = cls_model.dense_macs_of(arch, num_classes, cifar_stem, image_size)
    dense_params = count_params(cls_model.build_model(arch, num_classes, cifar_stem=cifar_stem), zero_aware=False)
    groups = resnet_groups(model, residual=residual)
    small, spec = compact_model(model, groups, cls_model.masks_from_zeros(model, groups))
    rep = {"image_size": image_size, "macs": count_macs(model, size), "dense_macs": dense_macs,
           "params_nonzero": count_params(model), "dense_params": dense_params,
           "compact_macs": count_macs(small, size, zero_aware=False),
           "compact_params": count_params(small, zero_aware=False),
           "kept_channels": sum(spec.values()), "prunable_channels": sum(g.size for g in groups)}
    rep["macs_reduction_pct"] = cls_model.reduction(rep["macs"], dense_macs)
    rep["compact_macs_reduction_pct"] = cls_model.reduction(rep["compact_macs"], dense_macs)
    return rep


def log_model_report(rep: dict, title: str) -> None:
    log.info("%s @ %dx%d: FLOPs (MACs, zero-aware) %s vs dense %s (-%.1f%%); non-zero params %s vs dense %s",
             title, rep["image_size"], rep["image_size"], _g(rep["macs"]), _g(rep["dense_macs"]),
             rep["macs_reduction_pct"], _m(rep["params_nonzero"]), _m(rep["dense_params"]))
    log.info("%s, compacted: FLOPs %s (-%.1f%%), params %s, %d/%d prunable channels kept", title,
             _g(rep["compact_macs"]), rep["compact_macs_reduction_pct"], _m(rep["compact_params"]),
             rep["kept_channels"], rep["prunable_channels"])


def _finite(obj):
    """``obj`` with NaN/inf floats replaced by None, so the JSON is standard (``json.dumps`` would write NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class Raport:
    """The ``--raport-file`` JSON: args, one record per epoch, and the final summary (rewritten atomically)."""

    def __init__(self, path: Path, args: argparse.Namespace, is_main: bool, previous: dict | None = None):
        self.path, self.is_main = path, is_main
        self.data = {"args": args_to_dict(args), "epochs": [], "final": None}
        if previous:
            self.data["epochs"] = list(previous.get("epochs", []))

    def add_epoch(self, record: dict) -> None:
        self.data["epochs"] = [e for e in self.data["epochs"] if e.get("epoch") != record["epoch"]] + [record]
        self._write()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self._write()

    def _write(self) -> None:
        if not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(_finite(self.data), indent=2) + "\n")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------------- setup
def shared_seed(args: argparse.Namespace) -> int:
    """``--seed``, or one random seed drawn on rank 0 and broadcast, so samplers shuffle identically."""
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
    return int(dist_utils.broadcast_object(seed))


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


def build_network(args: argparse.Namespace, num_classes: int, weights, meta: dict) -> nn.Module:
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


def load_resume(args: argparse.Namespace, manager: CheckpointManager) -> dict | None:
    if not args.resume:
        return None
    path = manager.latest() if args.resume == "auto" else args.resume
    if path is None:
        log.info("--resume auto: no checkpoint in %s, starting from scratch", args.workspace)
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise UserError(f"--resume: {str(exc).splitlines()[0]}") from None
    missing = [k for k in ("epoch", "state_dict", "optimizer") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path} is not a CLS training checkpoint (missing {', '.join(missing)})")
    arch = ckpt.get("arch")
    arch = arch[0] if isinstance(arch, (list, tuple)) else arch
    if arch and arch != args.arch:
        raise UserError(f"--resume {path} was saved for {arch}, not --arch {args.arch}")
    if args.grow_prune and ckpt.get("explorer") is None:
        raise UserError(f"--resume {path} has no explorer state but --grow_prune is on")
    if args.compact_training != bool(ckpt.get("physical")):
        raise UserError(f"--resume {path} was written {'with' if ckpt.get('physical') else 'without'} "
                        "--compact-training; resume it the same way")
    log.info("resuming from %s (epoch %d done)", path, ckpt["epoch"])
    ckpt["_path"] = path
    return ckpt


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        return run(args)
    except (UserError, cls_data.DataError) as exc:
        parser.error(_one_line(exc))
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return 1
    finally:
        dist_utils.cleanup()
    return 1


def _one_line(exc: Exception) -> str:
    """The message of ``exc`` as one line; an error re-raised from a DataLoader worker carries the worker's whole
    traceback, whose last line is the original ``Type: message``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1] if len(lines) > 1 else lines[0]
    return last.split(": ", 1)[1] if last.startswith(("CLS.data.DataError: ", "DataError: ")) else last


def run(args: argparse.Namespace) -> int:
    """The recipe: setup → weights → data → model → (evaluate | optimizer/explorer → epochs → compact export)."""
    info = dist_utils.init_distributed(device=None if args.device == "auto" else args.device)
    setup_logging(info.is_main)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest conv algorithms
    seed = shared_seed(args)
    torch.manual_seed(seed + info.rank)  # per-rank augmentation/mixup draws, as upstream's seed + local_rank
    if args.chex_seed is None:
        args.chex_seed = seed  # the exploration RNG must agree across ranks: the broadcast seed, not seed + rank
    accumulation = world_accumulation(args, info.world_size)
    bar = (lambda it, total=None, desc="": progress(it, total=total, desc=desc, is_main=info.is_main,
                                                       enabled=args.progress if info.is_main else False))

    weights, meta = read_weights(args)  # before the data: a bad file should fail before ImageNet is scanned
    if args.image_size is None and isinstance(meta.get("image_size"), int):
        args.image_size = meta["image_size"]  # evaluate at the size the weights were trained at
    loaders = cls_data.build_loaders(
        args.data_backend, args.data, batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
        need_train=not args.evaluate, rank=info.rank, world_size=info.world_size, num_classes=args.num_classes,
        synthetic_samples=args.synthetic_samples, max_bad_images=args.max_bad_images,
        pin_memory=info.device.type == "cuda", seed=seed)
    args.image_size, args.num_classes = loaders.image_size, loaders.num_classes
    model = build_network(args, loaders.num_classes, weights, meta)
    memory_format = torch.channels_last if args.memory_format == "nhwc" else torch.contiguous_format
    model = model.to(info.device, memory_format=memory_format)
    amp = training.make_amp(args.amp, info.device, args.static_loss_scale, args.dynamic_loss_scale)
    if args.evaluate:
        return run_evaluation(args, model, loaders, amp, info.device, bar, info)

    job = prepare_training(args, model, loaders, amp, info, accumulation, bar)
    val = train_epochs(job)
    if job.end_epoch < args.epochs:
        log.info("stopped after --run-epochs %d at epoch %d of %d; continue with --resume auto", args.run_epochs,
                 job.end_epoch, args.epochs)
    else:
        job.raport.set("final", finish(job, val))
    job.tb.close()
    return 0


@dataclass
class Job:
    """Everything a training run holds between setup and the end (``model`` may be DDP-wrapped, ``net`` never)."""

    args: argparse.Namespace
    info: dist_utils.DistInfo
    loaders: cls_data.Loaders
    amp: AmpConfig
    bar: Callable
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    groups: list
    explorer: ChannelExplorer | None
    trainer: TrainStep
    manager: CheckpointManager
    steps_per_epoch: int
    start_epoch: int = 0
    end_epoch: int = 0
    best_prec1: float = float("nan")
    dense_macs: int = 0
    tb: TensorBoardWriter | None = None
    raport: Raport | None = None
    phys: PhysicalTraining | None = None      # --compact-training
    ctx: training.TrainContext | None = None  # the running loop's context (its model is swapped on rebuilds)

    @property
    def workspace(self) -> Path:
        return Path(self.args.workspace)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.loaders.image_size, self.loaders.image_size)


def prepare_training(args, model, loaders, amp, info, accumulation, bar) -> Job:
    """Optimizer, per-iteration LR schedule, AMP scaler, explorer and step helper; resume or ``explorer.start()``;
    DDP wrap; TensorBoard, raport and ``args.json``."""
    n_batches = len(loaders.train)
    if n_batches < accumulation:
        raise UserError(f"one epoch has {n_batches} mini-batches per process, fewer than the {accumulation} that "
                        "--optimizer-batch-size accumulates; lower --optimizer-batch-size or -b")
    steps_per_epoch = n_batches // accumulation
    optimizer = training.build_optimizer(model, args.lr, args.momentum, args.weight_decay, args.bn_weight_decay,
                                         args.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_factor(
        args.lr_schedule, warmup_steps=steps_per_epoch * args.warmup, total_steps=steps_per_epoch * args.epochs,
        steps_per_epoch=steps_per_epoch, step_epochs=tuple(args.lr_steps), step_gamma=args.lr_decay))
    scaler = amp.make_scaler()
    groups = groups_from_args(args, model)
    explorer = explorer_from_args(args, model, groups, steps_per_unit=steps_per_epoch)
    if args.grow_prune and args.T_max > args.epochs:
        log.warning("--T_max %d > --epochs %d: the final sparsity %.2f is reached only at epoch %d, after training "
                    "ends", args.T_max, args.epochs, args.channel_sparsity, args.T_max)
    trainer = TrainStep(optimizer, scaler=scaler, static_loss_scale=amp.static_loss_scale, explorer=explorer,
                        accum_steps=accumulation, lr_scheduler=scheduler)
    job = Job(args, info, loaders, amp, bar, model, model, optimizer, scheduler, scaler, groups, explorer, trainer,
              CheckpointManager(str(args.workspace), keep=args.keep_checkpoints), steps_per_epoch)
    if args.compact_training:
        ddp_ids = [info.device.index] if info.device.type == "cuda" else None
        job.phys = PhysicalTraining(model, explorer, optimizer, mode=args.compact_training_mode,
                                    lr_scheduler=scheduler, trainer=trainer,
                                    wrap=ddp_wrapper(device_ids=ddp_ids) if info.distributed else None,
                                    on_rebuild=lambda phys: _follow_rebuild(job, phys))
        trainer.explorer = job.phys      # TrainStep calls phys.after_step(step, optimizer) after every step
    ckpt = load_resume(args, job.manager)
    if ckpt is not None:
        restore(job, ckpt)
    else:
        # Ranks were initialised with seed + rank. DDP copies rank 0's weights only when it wraps the model, after
        # explorer.start() has put this rank's own pruned filters into its MRU store; a later regrow would bring
        # those back and the ranks would train different models (T9).
        for tensor in model.state_dict().values():
            dist_utils.broadcast_tensor_(tensor)
        if explorer is not None:
            explorer.start(optimizer)
            if job.phys is not None:
                job.phys.start()
    if job.phys is not None:
        _follow_rebuild(job, job.phys)   # DDP-wrapped by PhysicalTraining when distributed
    elif info.distributed:
        job.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    job.end_epoch = args.epochs if args.run_epochs < 0 else min(args.epochs, job.start_epoch + args.run_epochs)
    job.dense_macs = cls_model.dense_macs_of(args.arch, loaders.num_classes, args.cifar_stem, loaders.image_size)
    if info.is_main:
        save_args(args, job.workspace)
    job.tb = TensorBoardWriter(job.workspace / "tb" if args.tensorboard else None, is_main=info.is_main)
    job.raport = Raport(job.workspace / args.raport_file, args, info.is_main,
                        ckpt.get("raport") if ckpt is not None else None)
    log.info("training %s on %s: %d process(es) x %d images, %d micro-batches per step, %d steps/epoch, "
             "epochs %d..%d, device %s", args.arch, args.data_backend, info.world_size, args.batch_size,
             accumulation, steps_per_epoch, job.start_epoch, args.epochs - 1, info.device)
    if ckpt is not None:
        check_epoch_boundary(job)
        # last: building the model and the FLOPs reference model above draw from the global generator
        restore_rng(ckpt.get("rng"), info)
    return job


def _follow_rebuild(job: Job, phys: PhysicalTraining) -> None:
    """Compact training replaced the model's layers, the optimizer and (under DDP) the wrapper: point the job and
    the running loop at the new ones (the scheduler and TrainStep were re-pointed by PhysicalTraining)."""
    job.model, job.optimizer = phys.train_model, phys.optimizer
    if job.ctx is not None:
        job.ctx.model = phys.train_model


def log_event(job: Job, report) -> None:
    """Rank 0: FLOPs, density, δ and per-layer widths of an exploration event, to the log and TensorBoard."""
    if not job.info.is_main:
        return
    macs = count_macs(job.net, job.input_size)
    job.tb.scalars("chex", {"density": report.density, "delta": report.delta, "regrown": report.n_regrown,
                            "macs": macs}, report.step)
    job.tb.scalars("widths", report.widths, report.step)
    log.info("CHEX event at step %d: FLOPs %s (%.1f%% of dense), density %.3f", report.step, _g(macs),
             100.0 * macs / job.dense_macs, report.density)


def train_epochs(job: Job) -> dict:
    """Epochs ``start_epoch..end_epoch-1``: train, validate, record, checkpoint. Returns the last validation."""
    args = job.args
    ctx = training.TrainContext(
        model=job.model, criterion=training.SmoothedMixupLoss(args.label_smoothing), trainer=job.trainer,
        amp=job.amp, device=job.info.device, steps_per_epoch=job.steps_per_epoch,
        num_classes=job.loaders.num_classes, mixup=args.mixup, label_smoothing=args.label_smoothing,
        print_freq=args.print_freq, on_event=lambda report: log_event(job, report))
    job.ctx = ctx
    val = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    with _redirect_logging_for_bar(args.progress if args.progress is not None else progress_enabled(job.info.is_main)):
        for epoch in range(job.start_epoch, job.end_epoch):
            job.loaders.set_epoch(epoch)
            stats = training.train_one_epoch(ctx, job.loaders.train, epoch, progress=job.bar)
            if not args.training_only:
                val = evaluate_synced(job.net, job.loaders.val, job.info.device, job.amp, job.bar)
            if math.isfinite(val["top1"]) and not (val["top1"] <= job.best_prec1):
                job.best_prec1 = val["top1"]
            record_epoch(job, epoch, stats, val)
            if args.save_checkpoints:
                job.manager.save(checkpoint_state(job, epoch + 1), epoch + 1, metric=val["top1"])
    job.tb.flush()
    return val


def record_epoch(job: Job, epoch: int, stats: dict, val: dict) -> None:
    """One epoch's metrics to the raport JSON, TensorBoard and the log."""
    macs = count_macs(job.net, job.input_size) if job.info.is_main else 0
    job.raport.add_epoch({
        "epoch": epoch, "step": job.trainer.step_count, "train_loss": stats["loss"], "lr": stats["lr"],
        "images_per_s": stats["images_per_s"], "time_s": stats["time_s"], "val_top1": val["top1"],
        "val_top5": val["top5"], "val_loss": val["loss"], "macs": macs,
        "density": job.explorer.density() if job.explorer is not None else 1.0,
        "amp_skipped_steps": job.trainer.skipped_steps})
    job.tb.scalars("train", {"loss": stats["loss"], "lr": stats["lr"], "images_per_s": stats["images_per_s"]}, epoch)
    job.tb.scalars("val", {"top1": val["top1"], "top5": val["top5"], "loss": val["loss"]}, epoch)
    job.tb.scalar("flops/macs", macs, epoch)
    log.info("epoch %d/%d: train loss %.4f, val top-1 %.2f%% top-5 %.2f%%, FLOPs %s (%.1f%% of dense), %.0f img/s",
             epoch, job.args.epochs - 1, stats["loss"], val["top1"], val["top5"], _g(macs),
             100.0 * macs / job.dense_macs, stats["images_per_s"])


def evaluate_synced(net: nn.Module, loader, device, amp, bar) -> dict:
    """Validate the *unwrapped* model after copying rank 0's BN statistics to every rank.

    Evaluating through DDP would run a buffer broadcast per forward, which hangs when the unpadded validation shards
    give the ranks different batch counts; and each rank's running statistics drift slightly from rank 0's (the
    ones saved in the checkpoint) after the last training forward.
    """
    for buf in net.buffers():
        dist_utils.broadcast_tensor_(buf)
    return training.evaluate(net, loader, device, amp, progress=bar)


def _redirect_logging_for_bar(active: bool):
    """Route log lines through tqdm while a bar is on screen, so they do not break it."""
    import contextlib

    if not active:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def checkpoint_state(job: Job, epoch: int) -> dict:
    """Upstream keys (``epoch`` = epochs completed, ``arch``, ``state_dict`` with ``module.`` under DDP,
    ``best_prec1``, ``optimizer``) plus everything else that changes during training. Plain containers only.
    RNG states are gathered from every rank so a resume with the same world size continues each rank's stream."""
    args = job.args
    rng = dist_utils.all_gather_object(capture_rng_state())
    return {"epoch": epoch, "arch": args.arch, "state_dict": job.model.state_dict(), "best_prec1": job.best_prec1,
            "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict(),
            "scaler": job.scaler.state_dict(), "trainer": job.trainer.state_dict(),
            "explorer": job.explorer.state_dict() if job.explorer is not None else None,
            "num_classes": args.num_classes, "cifar_stem": args.cifar_stem, "image_size": args.image_size,
            "args": args_to_dict(args), "rng": rng, "raport": job.raport.data if job.raport else None,
            "physical": job.phys.state_dict() if job.phys is not None else None}


def restore(job: Job, ckpt: dict) -> None:
    """Load a training checkpoint into the (unwrapped) model and the training state; sets ``job.start_epoch``
    and ``job.best_prec1``."""
    try:
        if job.phys is not None:   # narrow the dense model to the checkpoint's widths, then load
            job.phys.load_state_dict(ckpt["physical"], explorer_state=ckpt["explorer"],
                                     model_state=strip_prefix(ckpt["state_dict"]), optimizer_state=ckpt["optimizer"])
            job.optimizer = job.phys.optimizer
        else:
            cls_model.load_weights(job.net, strip_prefix(ckpt["state_dict"]), source=ckpt["_path"],
                                   arch=str(ckpt.get("arch")))
            job.optimizer.load_state_dict(ckpt["optimizer"])
            if job.explorer is not None:
                job.explorer.load_state_dict(ckpt["explorer"], job.optimizer)
    except (cls_model.WeightsError, ValueError, KeyError) as exc:
        raise UserError(f"--resume {ckpt['_path']}: {str(exc).splitlines()[0]}") from None
    # a training checkpoint without its schedule state would silently restart the LR schedule / step clock (T7)
    missing = [k for k in ("scheduler", "scaler", "trainer") if ckpt.get(k) is None]
    if missing:
        raise UserError(f"--resume {ckpt['_path']} lacks {', '.join(missing)} state: not a complete CLS training "
                        "checkpoint (use --pretrained-weights to start a new run from its weights)")
    for key, obj in (("scheduler", job.scheduler), ("scaler", job.scaler), ("trainer", job.trainer)):
        if ckpt[key]:          # a disabled GradScaler saves {}, and refuses to load it
            obj.load_state_dict(ckpt[key])
    best = ckpt.get("best_prec1")
    job.start_epoch = int(ckpt["epoch"])
    job.best_prec1 = float(best) if best is not None else float("nan")
    job.manager.best = job.best_prec1 if math.isfinite(job.best_prec1) else None


def check_epoch_boundary(job: Job) -> None:
    """Mid-epoch resume is not supported (checkpoints are written at epoch ends). A checkpoint whose step counter is
    not ``start_epoch x steps_per_epoch`` (saved inside an epoch, or with another -b / --optimizer-batch-size / world
    size) or that sits inside an accumulation window restarts ``start_epoch`` from its first batch, with a warning
    (the Lightning semantics, T3); the step counter, and with it the LR and exploration schedules, carries on."""
    trainer, expected = job.trainer, job.start_epoch * job.steps_per_epoch
    if trainer.step_count != expected or trainer.micro:
        warnings.warn(f"--resume: the checkpoint is at optimizer step {trainer.step_count} (+{trainer.micro} "
                      f"micro-batches), not at the end of epoch {job.start_epoch} ({expected} steps of "
                      f"{job.steps_per_epoch}); mid-epoch resume is not supported: restarting epoch "
                      f"{job.start_epoch} from its first batch", stacklevel=2)
        trainer.micro = 0  # the partial window's gradients are not in the checkpoint


def restore_rng(rng, info: dist_utils.DistInfo) -> None:
    """Continue each rank's torch generator (augmentation, mixup) from the checkpoint. States saved by another
    number of processes cannot be mapped onto these ranks: keep the ``--seed`` streams and say so (T11)."""
    if isinstance(rng, list) and len(rng) == info.world_size:
        restore_rng_state(rng[info.rank])
        return
    n = len(rng) if isinstance(rng, list) else 0
    log.warning("--resume: the checkpoint holds RNG states for %d process(es), this run has %d; augmentation and "
                "mixup draws restart from --seed, so the run will not repeat an uninterrupted one bit for bit",
                n, info.world_size)


def finish(job: Job, val: dict) -> dict:
    """Export the compact model (``compact.pth``: ``state_dict``, ``cfg`` width spec, ``arch``, ``num_classes``,
    ``cifar_stem``, ``image_size``), evaluate it, and print dense vs compact FLOPs, params and accuracy."""
    args, net, loaders, device = job.args, job.net, job.loaders, job.info.device
    if job.phys is not None and job.phys.compact:
        small, spec = copy.deepcopy(net), job.phys.width_spec()     # trained compact already
    else:
        masks = job.explorer.masks if job.explorer is not None else cls_model.masks_from_zeros(net, job.groups)
        small, spec = compact_model(net, job.groups, masks)
    small = small.to(device)
    if args.training_only:
        val = evaluate_synced(net, loaders.val, device, job.amp, job.bar)
    cval = training.evaluate(small, loaders.val, device, job.amp, progress=job.bar)
    rep = model_report(net, args.arch, loaders.num_classes, args.cifar_stem, loaders.image_size,
                       residual=args.chex_residual)
    rep["compact_macs"] = count_macs(small, job.input_size, zero_aware=False)
    rep["compact_params"] = count_params(small, zero_aware=False)
    rep["compact_macs_reduction_pct"] = cls_model.reduction(rep["compact_macs"], rep["dense_macs"])
    path = job.workspace / "compact.pth"
    save_checkpoint({"state_dict": {k: v.cpu() for k, v in small.state_dict().items()}, "cfg": spec,
                     "arch": args.arch, "num_classes": loaders.num_classes, "cifar_stem": args.cifar_stem,
                     "image_size": loaders.image_size, "top1": cval["top1"]}, str(path))
    log.info("=" * 100)
    log_model_report(rep, "final masked model")
    log.info("%-16s %-12s %-10s %-8s %-8s", "model", "FLOPs(MACs)", "params", "top-1", "top-5")
    log.info("%-16s %-12s %-10s %-8s %-8s", f"dense {args.arch}", _g(rep["dense_macs"]), _m(rep["dense_params"]),
             "-", "-")
    log.info("%-16s %-12s %-10s %-8.2f %-8.2f", "masked (zeros)", _g(rep["macs"]), _m(rep["params_nonzero"]),
             val["top1"], val["top5"])
    log.info("%-16s %-12s %-10s %-8.2f %-8.2f", "compact", _g(rep["compact_macs"]), _m(rep["compact_params"]),
             cval["top1"], cval["top5"])
    log.info("compact model saved to %s (FLOPs reduction %.1f%%)", path, rep["compact_macs_reduction_pct"])
    return {**rep, "masked_top1": val["top1"], "masked_top5": val["top5"], "compact_top1": cval["top1"],
            "compact_top5": cval["top5"], "compact_path": str(path), "cfg": spec}


def run_evaluation(args, model, loaders, amp, device, bar, info) -> int:
    """Upstream's ``--evaluate``: top-1/top-5 of the given weights, then FLOPs/params (dense, zero-aware, compact).
    Nothing is written."""
    if args.resume and not args.pretrained_weights:
        try:
            ckpt = load_checkpoint(args.resume)
            cls_model.load_weights(model, strip_prefix(ckpt.get("state_dict", {})), source=args.resume,
                                   arch=args.arch, cfg=ckpt.get("cfg"))
        except (CheckpointError, cls_model.WeightsError, ValueError) as exc:
            raise UserError(f"--resume: {str(exc).splitlines()[0]}") from None
    t0 = time.perf_counter()
    val = training.evaluate(model, loaders.val, device, amp, progress=bar)
    log.info("evaluation of %s (%s) on %d images: top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%.1f s)",
             args.pretrained_weights or args.resume or "random init", args.arch, val["n"], val["top1"], val["top5"],
             val["loss"], time.perf_counter() - t0)
    if info.is_main:
        rep = model_report(dist_utils.unwrap_model(model), args.arch, loaders.num_classes, args.cifar_stem,
                           loaders.image_size, residual=args.chex_residual)
        log_model_report(rep, "evaluated model")
        print(json.dumps(_finite({"top1": val["top1"], "top5": val["top5"], "loss": val["loss"], "n": val["n"],
                                  **rep})), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
