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
import logging
import math
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (``python ./main.py`` from CLS/, as upstream, or via torchrun): make the repository root
    # importable so ``CLS`` and ``chex_core`` resolve without installing the package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from chex_core.cli import add_chex_args, validate_chex_args  # noqa: E402
from chex_core.engine import NonFiniteLossError  # noqa: E402
from chex_tasks.harness import (DataError, OneLineParser, Run, add_run_args, check_run_args,  # noqa: E402
                                make_amp, require_at_least, run_guarded, start_runtime)
from chex_tasks.harness.lr import DECAYS  # noqa: E402
from chex_tasks.progress import progress  # noqa: E402
from CLS import data as cls_data  # noqa: E402
from CLS import model as cls_model  # noqa: E402
from CLS.task import ClsTask, read_weights, run_evaluation  # noqa: E402

log = logging.getLogger("CLS")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="CLS/main.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="dataset root with train/<class>/* and val/<class>/* (pytorch and dali-* backends)")
    g = p.add_argument_group("data")
    g.add_argument("--data-backend", default="pytorch",
                   choices=sorted(set(cls_data.BACKENDS) | set(cls_data.BACKEND_ALIASES)),
                   help="pytorch = ImageFolder DIR/train, DIR/val (PIL, skips unreadable images); dali-cpu / "
                        "dali-gpu = the same folders through NVIDIA DALI (pip install -e '.[dali]'; dali-gpu decodes "
                        "on the GPU); synthetic = random tensors (speed runs); digits = scikit-learn's built-in 8x8 "
                        "digits upsampled (no download)")
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
    require_at_least(parser, ("--epochs", args.epochs, 1), ("-b/--batch-size", args.batch_size, 1),
                     ("-j/--workers", args.workers, 0), ("--max-bad-images", args.max_bad_images, 0),
                     ("--warmup", args.warmup, 0), ("--image-size", args.image_size, 8), ("--mixup", args.mixup, 0))
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
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
    return run_guarded(parser, lambda: run(args), user_errors=(DataError, cls_model.WeightsError),
                       run_errors=(NonFiniteLossError,))

if __name__ == "__main__":
    sys.exit(main())
