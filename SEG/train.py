"""Mask R-CNN R-50-FPN on COCO2014 with CHEX channel exploration of the backbone body (upstream SEG recipe).

Launch from the repository root (``SEG/scripts/train.sh`` and ``SEG/scripts/eval.sh`` do this)::

    torchrun --standalone --nproc_per_node 8 -m SEG.train --data-path /data/coco2014 --output-dir results --grow_prune
    torchrun --standalone --nproc_per_node 8 -m SEG.train --data-path /data/coco2014 --eval-only --weights results

Upstream recipe (``e2e_mask_rcnn_R_50_FPN_1x_gn.yaml`` + the constants in ``engine/trainer.py``): 8 GPUs x 4 images,
lr 0.04, 270k iterations with steps at 210k/250k, linear warmup; CHEX every ΔT = 1000 iterations up to
T_max = 0.75 x max-iter, S = 0.5, δ0 = 0.5 (so training starts dense), uniform per-layer sparsity, random regrowth.
Training runs on the shared run harness (docs/harness.md), as maskrcnn-benchmark does it: one pass of ``--max-iter``
iterations, checkpoints every ``--checkpoint-period``, ``last_checkpoint``, ``model_final.pth``, resumed
automatically from ``--output-dir``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

from chex_core import cli as chex_cli
from chex_core.checkpoint import CheckpointError
from chex_core.engine import NonFiniteLossError
from chex_tasks.harness import (DataError, OneLineParser, Run, UserError, add_run_args, check_run_args,
                                require_at_least, run_guarded, start_runtime)

from .data import MINIVAL_ANN, SPLIT_CHOICES, build_instances
from .evaluate import UPSTREAM_CHECKPOINT, evaluate_checkpoint, find_eval_checkpoint  # noqa: F401 (re-exported)
from .evaluate import model_from_args, read_eval_checkpoint, splits_from_args
from .model import CONVENTIONS, NORMS, CheckpointMismatchError, is_upstream_state_dict
from .task import FLOPS_SIZE, SegTask

logger = logging.getLogger("SEG.train")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="SEG.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SEG overrides of the CHEX flag defaults: --chex-criterion leverage, --chex-regrow random, "
               "--chex-allocation uniform (the released SEG variant); --T_max 0 means 0.75 x --max-iter.")
    p.add_argument("--data-path", default="data/coco2014",
                   help="COCO root with train2014/, val2014/ and annotations/instances_{train,val}2014.json, plus "
                        "instances_{minival,valminusminival}2014.json for upstream's split")
    p.add_argument("--year", default="2014",
                   help="COCO release year in folder/file names (default 2014; 2017: train2017/val2017, which is "
                        "upstream's split under other names)")
    p.add_argument("--eval-split", choices=SPLIT_CHOICES, default="auto",
                   help="COCO2014 evaluation set: minival = upstream's (5,000 images; also trains on "
                        "valminusminival), val = all of val2014 (overlaps the released model's training images), "
                        "auto = minival when its annotation files exist, else val with a warning (default auto)")
    p.add_argument("--output-dir", default="results", help="checkpoints, TensorBoard logs, args.json, metrics")
    # schedule (iterations; upstream SOLVER section)
    p.add_argument("--max-iter", type=int, default=270000, help="total training iterations (optimizer steps)")
    p.add_argument("--steps", type=int, nargs="+", default=[210000, 250000],
                   help="iterations at which the learning rate is multiplied by --gamma")
    p.add_argument("--gamma", type=float, default=0.1, help="learning-rate decay factor at each of --steps")
    p.add_argument("--lr", type=float, default=0.04, help="base learning rate (upstream: 0.04 for 32 images/iter)")
    p.add_argument("--warmup-iters", type=int, default=500, help="linear warmup length in iterations")
    p.add_argument("--warmup-factor", type=float, default=1.0 / 3, help="learning-rate factor at iteration 0")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (not applied to biases)")
    p.add_argument("--bias-lr-factor", type=float, default=2.0, help="learning-rate multiplier for biases")
    p.add_argument("--batch-size", type=int, default=4, help="images per process per iteration (upstream 32 / 8)")
    p.add_argument("--workers", type=int, default=4, help="data-loading worker processes per rank")
    p.add_argument("--aspect-ratio-group-factor", type=int, default=0,
                   help="aspect-ratio groups for batching: 0 = portrait/landscape (upstream), k = 2k+1 bins")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and data order (same on all ranks)")
    # model
    p.add_argument("--norm", choices=NORMS, default="gn",
                   help="backbone-body norm: gn (GroupNorm 32, upstream), bn, syncbn (CUDA only; bn on CPU)")
    p.add_argument("--head-norm", choices=("gn", "none"), default="gn",
                   help="GroupNorm in FPN, box head and mask head (upstream gn config) or none")
    p.add_argument("--stride-in-1x1", action=argparse.BooleanOptionalAction, default=True,
                   help="stride in each bottleneck's first 1x1 conv (maskrcnn-benchmark) instead of the 3x3")
    p.add_argument("--conventions", choices=("auto", *CONVENTIONS), default="auto",
                   help="box/anchor arithmetic: upstream = maskrcnn-benchmark's (anchors, +1 box coding, proposal "
                        "selection, BGR255 pixels; docs/upstream_conventions.md), torchvision = torchvision's; auto = "
                        "upstream for a released maskrcnn-benchmark checkpoint in --weights, else torchvision "
                        "(scripts/train.sh passes upstream)")
    p.add_argument("--rpn-post-nms-per-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="upstream conventions, training: keep the best --rpn-post-nms-top-n-train proposals of the "
                        "whole batch (maskrcnn-benchmark) instead of per image")
    p.add_argument("--min-size", type=int, default=800, help="shorter image side after resizing (pixels)")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the longer image side (pixels)")
    for name, default, what in (("rpn-pre-nms-top-n-train", 2000, "RPN proposals per level before NMS"),
                                ("rpn-post-nms-top-n-train", 2000, "RPN proposals kept after NMS"),
                                ("rpn-pre-nms-top-n-test", 1000, "RPN proposals per level before NMS (eval)"),
                                ("rpn-post-nms-top-n-test", 1000, "RPN proposals kept after NMS (eval)"),
                                ("rpn-batch-size-per-image", 256, "anchors sampled per image for RPN loss"),
                                ("box-batch-size-per-image", 512, "ROIs sampled per image for the heads"),
                                ("box-detections-per-img", 100, "detections kept per image (eval)")):
        p.add_argument(f"--{name}", type=int, default=default, help=what)
    # runtime
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 + loss scaling on CUDA, bf16 on CPU)")
    p.add_argument("--print-freq", type=int, default=20, help="log every N iterations (rank 0)")
    p.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate on val after training")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --weights (no training)")
    p.add_argument("--weights", default=None,
                   help="--eval-only: checkpoint file to evaluate, or a folder: the upstream release file, else "
                        "model_final.pth, else the newest checkpoint in it (default: --output-dir). Training: start "
                        "from this file's weights (ours, a compact export or a released upstream file), as "
                        "maskrcnn-benchmark's MODEL.WEIGHT; a checkpoint in --output-dir to resume from wins")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let --weights fully unpickle a trusted release checkpoint that the safe loader rejects")
    p.add_argument("--check-args", action="store_true",
                   help="only check the flags and the data layout (exit 0, or 2 with one line); scripts/*.sh run "
                        "this before launching torchrun, so a mistake is not buried in a launcher traceback")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N val images")
    add_run_args(p, resume_default="auto", period_flags=("--checkpoint-period",), period_default=2500)
    # SEG recipe: constants hard-coded in upstream engine/trainer.py, as flags here (ΔT, T_max in iterations).
    chex_cli.add_chex_args(p, unit="iterations", defaults={"channel_sparsity": 0.5, "init_channel_ratio": 0.5,
                                                           "delta_T": 1000, "T_max": 0, "chex_criterion": "leverage",
                                                           "chex_regrow": "random", "chex_allocation": "uniform"})
    return p


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    require_at_least(parser, ("--max-iter", args.max_iter, 1), ("--batch-size", args.batch_size, 1),
                     ("--checkpoint-period", args.checkpoint_every, 1), ("--print-freq", args.print_freq, 1),
                     ("--min-size", args.min_size, 1), ("--max-size", args.max_size, 1), ("--workers", args.workers, 0),
                     ("--eval-limit", args.eval_limit, 1))
    if sorted(args.steps) != args.steps:
        parser.error(f"--steps must be increasing, got {args.steps}")
    if args.T_max == 0:
        args.T_max = max(int(0.75 * args.max_iter), args.delta_T)
    chex_cli.validate_chex_args(parser, args)
    check_run_args(parser, args)
    if args.grow_prune and args.T_max > args.max_iter:
        parser.error(f"--T_max ({args.T_max}) is beyond --max-iter ({args.max_iter})")
    # Fail on a wrong data path now, with the flag's name, rather than deep inside a worker.
    minival = Path(args.data_path) / "annotations" / MINIVAL_ANN
    if args.eval_split == "minival" and str(args.year) == "2014" and not minival.is_file():
        parser.error(f"--eval-split minival: {minival} not found (coco_annotations_minival.tgz, as upstream's "
                     "download_dataset.sh fetches it)")
    try:
        splits_from_args(args)
    except DataError as err:
        parser.error(f"--data-path: {err}")
    if args.eval_only or args.weights:
        try:
            args.weights = str(find_eval_checkpoint(args.weights or args.output_dir))
        except FileNotFoundError as err:
            parser.error(f"--weights: {err}")
    return args


def resolve_conventions(args, weights: dict | None) -> str:
    """``--conventions auto``: upstream for a released maskrcnn-benchmark file in ``--weights``, the recorded ones for
    one of our checkpoints, else torchvision. A released file always computes with upstream's conventions: asking for
    torchvision's is a ``UserError``."""
    weights = weights if isinstance(weights, dict) else {}
    state = weights.get("model", weights.get("state_dict", weights))
    upstream_file = isinstance(state, dict) and is_upstream_state_dict(state)
    if upstream_file and args.conventions == "torchvision":
        raise UserError(f"--conventions torchvision: {args.weights} is a maskrcnn-benchmark checkpoint, which is "
                        "trained and evaluated with upstream's conventions (drop the flag)")
    if args.conventions != "auto":
        return args.conventions
    recorded = (weights.get("args") or {}).get("conventions") if isinstance(weights.get("args"), dict) else None
    return "upstream" if upstream_file else recorded if recorded in CONVENTIONS else "torchvision"


def check_target_flops(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--check-args`` with ``--target-flops``: resolve the target on the dense body as training will (exit 2 with
    one line when it cannot be met), so the scripts catch it before torchrun starts."""
    model = model_from_args(args, 2)   # the class count changes the heads only, not the body the target is about
    body = model.backbone.body
    chex_cli.explorer_from_args(copy.copy(args), body, chex_cli.groups_from_args(args, body), steps_per_unit=1,
                                input_size=(3, FLOPS_SIZE, FLOPS_SIZE), parser=parser)


def check_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--check-args``: what ``parse_args`` checks, plus the checks that need a model or the --weights file."""
    def body():
        if args.eval_only:
            return
        if args.weights and args.conventions == "torchvision":
            resolve_conventions(args, read_eval_checkpoint(args.weights, args.allow_pickle))
        if args.grow_prune and args.target_flops is not None:
            check_target_flops(parser, args)

    return run_guarded(parser, body, run_errors=(CheckpointError,))


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if args.check_args:
        return check_only(parser, args)
    rt = start_runtime(args)
    def body():
        splits = splits_from_args(args)
        for warning in splits.warnings:
            logger.warning("%s", warning)
        if args.eval_only:
            evaluate_checkpoint(args, rt.device)
            return
        weights = read_eval_checkpoint(args.weights, args.allow_pickle) if args.weights else None
        args.conventions = resolve_conventions(args, weights)
        logger.info("training on %s, evaluating on %s, %s conventions", " + ".join(s.name for s in splits.train),
                    splits.test.name, args.conventions)
        dataset = build_instances(splits.train, train=True, box_convention=args.conventions)
        run = Run(SegTask(args, dataset, weights), args, rt, args.output_dir, print_freq=args.print_freq)
        run.setup()
        run.train()

    # worker exceptions arrive with the worker's traceback in the message: one_line keeps its last line
    return run_guarded(parser, body, run_errors=(DataError, CheckpointError, CheckpointMismatchError,
                                                 NonFiniteLossError))

if __name__ == "__main__":
    sys.exit(main())
