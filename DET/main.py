"""SSD300 (ResNet-50 backbone) on COCO2017, trained with CHEX channel exploration on the backbone.

Run from ``DET/``. The upstream commands work verbatim:

    python -m torch.distributed.launch --nproc_per_node=8 ./main.py --backbone resnet50 --warmup 300 --bs 64 \
        --amp --data /coco --epoch 650 --multistep 430 540 --grow_prune --channel_sparsity 0.5 \
        --init_channel_ratio 0.2 --delta_T 2 --T_max 470 --save ./logs
    python ./main.py --backbone resnet50 --mode evaluation --checkpoint ckpt.pth.tar --data /coco

``torchrun --nproc_per_node=N ./main.py ...`` works as well. Flags keep NVIDIA SSD's meaning: ``--warmup`` is
in iterations, ``--multistep`` in epochs (×0.1 each), ``--bs`` per process, lr = 2.6e-3 × world × bs / 32, and
``--checkpoint`` in training mode resumes (like ``--resume PATH``). As upstream, the backbone starts from
torchvision's ImageNet weights (``--backbone-path FILE`` for a local file, ``--random-backbone`` for random init; when
the weights cannot be had the run stops with one line), ``--no-cuda`` runs on the CPU and ``--json-summary FILE``
writes upstream's dllogger JSON lines. CHEX (``--grow_prune``; ``--delta_T``/``--T_max`` in epochs) prunes only the
backbone; ``--target-flops`` is resolved at 300 x 300, the resolution the backbone FLOPs are quoted at. Training
runs on the shared run harness (docs/harness.md): checkpoints ``checkpoint_NNNNNN.pth`` plus NVIDIA's ``epoch_K.pt``
names in ``--save``, and ``model_compact.pt`` at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

if __package__ in (None, ""):  # run as a script from DET/ (upstream usage): make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from chex_core import checkpoint as ckpt_utils
from chex_core import cli as chex_cli
from chex_core.engine import NonFiniteLossError
from chex_tasks.harness import (DataError, OneLineParser, Run, add_run_args, check_run_args, require_at_least,
                                run_guarded, start_runtime)
from DET.benchmark import run_benchmark
from DET.box_coder import BoxCoder, dboxes300_coco
from DET.data import build_loaders
from DET.evaluate import run_evaluation
from DET.model import BACKBONES, StateDictMismatch
from DET.summary import JsonSummary, upstream_params
from DET.task import DetTask, make_optimizer

logger = logging.getLogger("DET")

MODES = ("training", "evaluation", "benchmark-training", "benchmark-inference")
BASE_LR = 2.6e-3  # NVIDIA SSD's base learning rate for a global batch of 32


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="DET/main.py", description="SSD300 on COCO2017 with CHEX channel exploration on the "
                      "backbone", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", "-d", default="/coco",
                   help="COCO root holding train2017/, val2017/ and annotations/instances_{train,val}2017.json")
    p.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES),
                   help="torchvision ResNet used up to layer3, initialised as upstream with torchvision's ImageNet "
                        "weights (IMAGENET1K_V1, from the torch hub cache, downloaded there if missing)")
    p.add_argument("--backbone-path", "--pretrained-backbone", dest="backbone_path", default=None, metavar="PATH",
                   help="initialise the backbone from this local ImageNet ResNet file (torchvision state dict or a "
                        "CLS checkpoint) instead of torchvision's ImageNet weights; nothing is downloaded")
    p.add_argument("--random-backbone", action="store_true",
                   help="initialise the backbone randomly (upstream never does; for tests and from-scratch studies)")
    p.add_argument("--mode", default="training", choices=MODES, help="what to run")
    p.add_argument("--epochs", "--epoch", "-e", dest="epochs", type=int, default=65, help="number of epochs")
    p.add_argument("--bs", "--batch-size", dest="bs", type=int, default=32, help="training batch size per process")
    p.add_argument("--eval-batch-size", "--ebs", type=int, default=32, help="evaluation batch size per process")
    p.add_argument("--learning-rate", "--lr", type=float, default=BASE_LR,
                   help="base lr for a global batch of 32; the actual lr is lr × world_size × bs / 32")
    p.add_argument("--momentum", "-m", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", "--wd", type=float, default=5e-4,
                   help="SGD weight decay (not applied to BatchNorm parameters and biases)")
    p.add_argument("--warmup", type=int, default=0, help="iterations of linear learning-rate warm-up")
    p.add_argument("--multistep", nargs="*", type=int, default=[43, 54],
                   help="epochs at which the learning rate is multiplied by 0.1")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU")
    p.add_argument("--no-cuda", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--json-summary", default=None, metavar="FILE",
                   help="write parameters, per-epoch times and mAP and the final summary to FILE as upstream's "
                        "dllogger JSON lines (see DET/summary.py)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write checkpoints (checkpoint_NNNNNN.pth and epoch_{k}.pt), args.json, TensorBoard and "
                        "model_compact.pt after CHEX training here (nothing is written without it)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="training: resume from this checkpoint (same as --resume PATH); evaluation: the weights to "
                        "evaluate (ours, compact, or a released upstream one)")
    p.add_argument("--seed", "-s", type=int, default=None,
                   help="random seed shared by all ranks (default: drawn at random and logged)")
    p.add_argument("--eval-on-epochs", "--evaluation", dest="eval_on_epochs", nargs="*", type=int, default=None,
                   help="0-based epochs after which to run COCO evaluation (default: only after the last epoch)")
    p.add_argument("--num-workers", "-j", type=int, default=4, help="data loader worker processes per rank")
    p.add_argument("--max-iters-per-epoch", type=int, default=None,
                   help="cut every epoch after this many iterations (quick CPU runs and tests; epochs then "
                        "count these shortened epochs for --delta_T/--T_max/--multistep)")
    p.add_argument("--log-interval", type=int, default=20, help="iterations between training log lines")
    p.add_argument("--benchmark-iterations", type=int, default=20, help="timed iterations in benchmark modes")
    p.add_argument("--benchmark-warmup", type=int, default=5, help="untimed iterations before benchmarking")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the legacy torch.distributed.launch; ignored (the LOCAL_RANK variable is used)")
    add_run_args(p, progress=False)
    chex_cli.add_chex_args(p, unit="epochs",
                           defaults={"channel_sparsity": 0.5, "init_channel_ratio": 0.2, "delta_T": 2, "T_max": 180})
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate; user mistakes exit with status 2 and one line naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    chex_cli.validate_chex_args(parser, args)
    check_run_args(parser, args)
    if not os.path.isdir(args.data):
        parser.error(f"--data: directory not found: {args.data}")
    if args.mode in ("training", "benchmark-training") and args.bs < 2:
        parser.error(f"--bs must be >= 2 for training (BatchNorm on SSD's 1x1 feature map), got {args.bs}")
    require_at_least(parser, ("--epochs", args.epochs, 1), ("--eval-batch-size", args.eval_batch_size, 1),
                     ("--warmup", args.warmup, 0), ("--num-workers", args.num_workers, 0),
                     ("--log-interval", args.log_interval, 1),
                     ("--max-iters-per-epoch", args.max_iters_per_epoch or 1, 1),
                     ("--benchmark-iterations", args.benchmark_iterations, 1),
                     ("--benchmark-warmup", args.benchmark_warmup, 0))
    if args.learning_rate <= 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    if any(m < 0 for m in args.multistep) or args.multistep != sorted(args.multistep):
        parser.error(f"--multistep must be non-negative epochs in increasing order, got {args.multistep}")
    if args.mode == "evaluation" and not args.checkpoint:
        parser.error("--mode evaluation needs --checkpoint")
    for flag, path in (("--checkpoint", args.checkpoint), ("--backbone-path", args.backbone_path)):
        if path and not os.path.isfile(path):
            parser.error(f"{flag}: file not found: {path}")
    if args.backbone_path and args.random_backbone:
        parser.error("--random-backbone and --backbone-path exclude each other")
    if args.mode == "training" and args.checkpoint:
        args.resume = args.checkpoint       # NVIDIA SSD: --checkpoint continues training from that file
    return args


def runtime_device(args: argparse.Namespace) -> str | None:
    """``--no-cuda``: the CPU even when CUDA is available; else the harness's choice (CUDA when available)."""
    return "cpu" if args.no_cuda else None


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv)
    rt = start_runtime(args, device=runtime_device(args))
    logger.info("seed %d; args: %s", args.seed, vars(args))
    coder = BoxCoder(dboxes300_coco())
    summary = JsonSummary(args.json_summary, rt.is_main)
    summary.log("PARAMETER", upstream_params(args))
    def body():
        if args.mode == "training":
            loaders = build_loaders(args.data, coder, args.bs, args.eval_batch_size, args.num_workers, rt.rank,
                                    rt.world_size, seed=args.seed)
            run = Run(DetTask(args, loaders, coder, summary), args, rt, args.save, print_freq=args.log_interval)
            run.setup()
            run.train()
        elif args.mode == "evaluation":
            metrics = run_evaluation(args, rt, coder)
            if metrics is not None:
                summary.log((), {"mAP": metrics["AP"]})
        else:
            rate = run_benchmark(args, rt, coder, lambda m: make_optimizer(m, args.learning_rate, args.momentum,
                                                                           args.weight_decay))
            summary.log((), {"avg_img/sec": rate})

    # a DataLoader re-raises worker errors with the worker traceback in the message: one_line keeps its last line
    return run_guarded(parser, body, run_errors=(DataError, StateDictMismatch, ckpt_utils.CheckpointError,
                                                 NonFiniteLossError))

if __name__ == "__main__":
    sys.exit(main())
