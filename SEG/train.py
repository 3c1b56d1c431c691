"""Mask R-CNN R-50-FPN on COCO2014 with CHEX channel exploration of the backbone body (upstream SEG recipe).

Launch from the repository root (``SEG/scripts/train.sh`` and ``SEG/scripts/eval.sh`` do this)::

    torchrun --standalone --nproc_per_node 8 -m SEG.train --data-path /data/coco2014 --output-dir results --grow_prune
    torchrun --standalone --nproc_per_node 8 -m SEG.train --data-path /data/coco2014 --eval-only --weights results

Upstream recipe (``e2e_mask_rcnn_R_50_FPN_1x_gn.yaml`` + the constants in ``engine/trainer.py``): 8 GPUs x 4 images,
lr 0.04, 270k iterations with steps at 210k/250k, linear warmup; CHEX every ΔT = 1000 iterations up to
T_max = 0.75 x max-iter, S = 0.5, δ0 = 0.5 (so training starts dense), uniform per-layer sparsity, random regrowth.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from chex_core import cli as chex_cli
from chex_core import distributed
from chex_core.checkpoint import (CheckpointError, CheckpointManager, capture_rng_state, load_checkpoint,
                                  restore_rng_state, save_checkpoint)
from chex_core.engine import AmpConfig, NonFiniteLossError, TrainStep
from chex_tasks.progress import TensorBoardWriter, args_to_dict, save_args

from .data import CocoInstances, DataError, GroupedInfiniteBatchSampler, aspect_ratio_groups, collate, split_paths
from .evaluate import evaluate_results, format_report, predict
from .model import (NORMS, CheckpointMismatchError, SamplingConfig, body_macs, build_maskrcnn, channel_groups,
                    compact_maskrcnn, dense_body_macs, is_upstream_state_dict, load_model_weights)

logger = logging.getLogger("SEG.train")

UPSTREAM_CHECKPOINT = "maskrcnn_37%flops_37.3apbox_34.5apmask.pth.tar"
FINAL_NAME = "model_final.pth"
COMPACT_NAME = "model_compact.pth"
# Architecture flags recorded in our checkpoints: evaluation rebuilds the model the checkpoint was trained with.
ARCH_FLAGS = ("norm", "head_norm", "stride_in_1x1")
UPSTREAM_ARCH = {"norm": "gn", "head_norm": "gn", "stride_in_1x1": True}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SEG overrides of the CHEX flag defaults: --chex-criterion leverage, --chex-regrow random, "
               "--chex-allocation uniform (the released SEG variant); --T_max 0 means 0.75 x --max-iter.")
    p.add_argument("--data-path", default="data/coco2014",
                   help="COCO root with train2014/, val2014/ and annotations/instances_{train,val}2014.json")
    p.add_argument("--year", default="2014", help="COCO release year in folder/file names (default 2014)")
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
    p.add_argument("--min-size", type=int, default=800, help="shorter image side after resizing (pixels)")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the longer image side (pixels)")
    p.add_argument("--rpn-pre-nms-top-n-train", type=int, default=2000, help="RPN proposals per level before NMS")
    p.add_argument("--rpn-post-nms-top-n-train", type=int, default=2000, help="RPN proposals kept after NMS")
    p.add_argument("--rpn-pre-nms-top-n-test", type=int, default=1000, help="RPN proposals per level before NMS (eval)")
    p.add_argument("--rpn-post-nms-top-n-test", type=int, default=1000, help="RPN proposals kept after NMS (eval)")
    p.add_argument("--rpn-batch-size-per-image", type=int, default=256, help="anchors sampled per image for RPN loss")
    p.add_argument("--box-batch-size-per-image", type=int, default=512, help="ROIs sampled per image for the heads")
    p.add_argument("--box-detections-per-img", type=int, default=100, help="detections kept per image (eval)")
    # runtime
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 + loss scaling on CUDA, bf16 on CPU)")
    p.add_argument("--checkpoint-period", type=int, default=2500, help="save a checkpoint every N iterations")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="rolling checkpoints kept in --output-dir")
    p.add_argument("--print-freq", type=int, default=20, help="log every N iterations (rank 0)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the newest loadable checkpoint in --output-dir, if any")
    p.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate on val after training")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --weights (no training)")
    p.add_argument("--weights", default=None,
                   help="checkpoint file to evaluate, or a folder: the upstream release file, else model_final.pth, "
                        "else the newest checkpoint in it (default: --output-dir)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let --eval-only fully unpickle a trusted release checkpoint that the safe loader rejects")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N val images")
    # SEG recipe: constants hard-coded in upstream engine/trainer.py, as flags here (ΔT, T_max in iterations).
    # Released SEG variant: SVD leverage scores, random regrowth, the same sparsity in every layer.
    # T_max 0 means 0.75 x --max-iter (upstream's rule).
    chex_cli.add_chex_args(p, unit="iterations", defaults={"channel_sparsity": 0.5, "init_channel_ratio": 0.5,
                                                           "delta_T": 1000, "T_max": 0, "chex_criterion": "leverage",
                                                           "chex_regrow": "random", "chex_allocation": "uniform"})
    return p


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for flag in ("max_iter", "batch_size", "checkpoint_period", "print_freq", "min_size", "max_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.eval_limit is not None and args.eval_limit < 1:
        parser.error(f"--eval-limit must be >= 1, got {args.eval_limit}")
    if sorted(args.steps) != args.steps:
        parser.error(f"--steps must be increasing, got {args.steps}")
    if args.T_max == 0:
        args.T_max = max(int(0.75 * args.max_iter), args.delta_T)
    chex_cli.validate_chex_args(parser, args)
    if args.grow_prune and args.T_max > args.max_iter:
        parser.error(f"--T_max ({args.T_max}) is beyond --max-iter ({args.max_iter})")
    # Fail on a wrong data path now, with the flag's name, rather than deep inside a worker.
    try:
        if not args.eval_only:
            split_paths(args.data_path, "train", args.year)
        split_paths(args.data_path, "val", args.year)  # evaluation needs val either way
    except DataError as err:
        parser.error(f"--data-path: {err}")
    if args.eval_only:
        try:
            args.weights = str(find_eval_checkpoint(args.weights or args.output_dir))
        except FileNotFoundError as err:
            parser.error(f"--weights: {err}")
    return args


def find_eval_checkpoint(path: str | os.PathLike) -> Path:
    """A file as given; for a folder: the upstream release file, else ``model_final.pth``, else the newest
    loadable rolling checkpoint. ``FileNotFoundError`` when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint file or folder at {path}")
    for name in (UPSTREAM_CHECKPOINT, FINAL_NAME):
        if (path / name).is_file():
            return path / name
    latest = CheckpointManager(str(path)).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path} (looked for {UPSTREAM_CHECKPOINT}, {FINAL_NAME}, "
                                "checkpoint_*.pth)")
    return Path(latest)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(args.rpn_pre_nms_top_n_train, args.rpn_post_nms_top_n_train, args.rpn_pre_nms_top_n_test,
                          args.rpn_post_nms_top_n_test, args.rpn_batch_size_per_image, args.box_batch_size_per_image,
                          args.box_detections_per_img)


def model_from_args(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    return build_maskrcnn(num_classes, norm=args.norm, head_norm=args.head_norm, stride_in_1x1=args.stride_in_1x1,
                          min_size=args.min_size, max_size=args.max_size, sampling=sampling_from_args(args))


class WarmupMultiStep:
    """LR factor at iteration i: linear warmup from ``warmup_factor`` over ``warmup_iters``, then x gamma at each
    of ``steps`` (maskrcnn-benchmark ``WarmupMultiStepLR``). A plain object so ``LambdaLR.state_dict`` keeps it."""

    def __init__(self, steps: list[int], gamma: float, warmup_iters: int, warmup_factor: float) -> None:
        self.steps, self.gamma = list(steps), gamma
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor

    def __call__(self, it: int) -> float:
        warm = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            warm = self.warmup_factor * (1 - alpha) + alpha
        return warm * self.gamma ** sum(it >= s for s in self.steps)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD with maskrcnn-benchmark's groups: biases at lr x bias-lr-factor without weight decay."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    return torch.optim.SGD([
        {"params": weights, "lr": args.lr, "weight_decay": args.weight_decay},
        {"params": biases, "lr": args.lr * args.bias_lr_factor, "weight_decay": 0.0},
    ], lr=args.lr, momentum=args.momentum)


def _to_device(targets, device):
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def run_evaluation(model, args, device, dense_macs: int | None = None) -> dict:
    """Sharded inference + COCOeval on rank 0; logs the upstream-style table and writes ``eval_metrics.json``."""
    images, ann = split_paths(args.data_path, "val", args.year)
    val = CocoInstances(images, ann, train=False)
    bbox_res, segm_res = predict(model, val, device, batch_size=1, workers=min(args.workers, 2), limit=args.eval_limit)
    if not distributed.is_main_process():
        return {}
    ids = val.ids[:args.eval_limit] if args.eval_limit else None
    metrics = evaluate_results(val, bbox_res, segm_res, image_ids=ids)
    macs = body_macs(model)
    dense = dense_macs if dense_macs is not None else dense_body_macs(args.stride_in_1x1)
    logger.info("COCO%s val (%d images, %d detections):\n%s", args.year, len(ids) if ids else len(val),
                len(bbox_res), format_report(metrics, macs, dense))
    out = {**metrics, "body_macs": macs, "dense_body_macs": dense, "flops_reduction": 1 - macs / dense}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "eval_metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def read_eval_checkpoint(path: str, allow_pickle: bool) -> dict:
    """``torch.load(weights_only=True)``; with ``allow_pickle`` a trusted third-party file may fall back to a full
    unpickle (a release file could hold pickled objects that the safe loader rejects)."""
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        if not allow_pickle or not os.path.isfile(path):
            raise CheckpointError(f"{err} (if this is a trusted release file, retry with --allow-pickle)") from None
        logger.warning("loading %s with weights_only=False (--allow-pickle)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def evaluate_checkpoint(args, dist_info) -> dict:
    """``--eval-only``: rebuild the model a checkpoint was trained with, load it (upstream names mapped), evaluate."""
    ckpt = read_eval_checkpoint(args.weights, args.allow_pickle)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    # Our checkpoints record their architecture flags; a released upstream file implies the upstream layout.
    upstream = isinstance(state, dict) and is_upstream_state_dict(state)
    saved = dict(UPSTREAM_ARCH) if upstream else ckpt.get("args") or {}
    for flag in ARCH_FLAGS:
        if flag in saved and saved[flag] != getattr(args, flag):
            logger.info("using the checkpoint's --%s %s", flag.replace("_", "-"), saved[flag])
            setattr(args, flag, saved[flag])
    num_classes = CocoInstances(*split_paths(args.data_path, "val", args.year), train=False).num_classes
    model = model_from_args(args, num_classes)
    kind = load_model_weights(model, ckpt)
    logger.info("loaded %s checkpoint %s (iteration %s)", kind, args.weights, ckpt.get("iteration", "?"))
    model.to(dist_info.device)
    return run_evaluation(model, args, dist_info.device)


@dataclass
class TrainState:
    """Everything a checkpoint must restore (ARCHITECTURE.md §4.4); ``model`` is the unwrapped module."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    explorer: object | None
    iteration: int = 0
    rng: list = field(default_factory=list)

    def to_checkpoint(self, args: argparse.Namespace) -> dict:
        """Collective (gathers every rank's RNG state): call on all ranks."""
        explorer = self.explorer.state_dict() if self.explorer is not None else None
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "explorer": explorer,
                "rng": distributed.all_gather_object(capture_rng_state()), "args": args_to_dict(args)}

    def load(self, ckpt: dict, path: str) -> None:
        load_model_weights(self.model, ckpt)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointMismatchError(f"{path}: optimizer state does not fit this model ({err})") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.explorer is not None:
            if not ckpt.get("explorer"):
                raise CheckpointError(f"{path} has no explorer state but --grow_prune is on")
            try:
                self.explorer.load_state_dict(ckpt["explorer"], self.optimizer)
            except ValueError as err:  # e.g. saved with(out) --chex-prune-downsample
                raise CheckpointMismatchError(f"{path}: {err}") from None
        self.iteration = int(ckpt["iteration"])
        self.rng = list(ckpt.get("rng") or [])


def build_training(args: argparse.Namespace, num_classes: int, device: torch.device,
                   parser: argparse.ArgumentParser | None = None) -> TrainState:
    torch.manual_seed(args.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = model_from_args(args, num_classes).to(device)
    optimizer = make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupMultiStep(args.steps, args.gamma, args.warmup_iters, args.warmup_factor))
    scaler = AmpConfig(enabled=args.amp, device_type=device.type).make_scaler()
    # CHEX prunes the ResNet body only; ΔT and T_max are iterations, so one unit = one optimizer step.
    # the explorer sees the whole Mask R-CNN (groups found within its body): residual groups reach the FPN laterals;
    # --target-flops counts the body's MACs, the paper's convention
    groups = channel_groups(model, args.chex_prune_downsample, args.chex_residual)
    explorer = chex_cli.explorer_from_args(args, model, groups, steps_per_unit=1, parser=parser,
                                           flops_within="backbone.body")
    return TrainState(model, optimizer, scheduler, scaler, explorer)


def make_train_loader(dataset: CocoInstances, args: argparse.Namespace, dist_info, start_iter: int) -> DataLoader:
    groups = aspect_ratio_groups([dataset.aspect_ratio(i) for i in range(len(dataset))], args.aspect_ratio_group_factor)
    sampler = GroupedInfiniteBatchSampler(groups, args.batch_size, args.max_iter, dist_info.rank,
                                          dist_info.world_size, seed=args.seed, start_iter=start_iter)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate)


def train(args: argparse.Namespace, dist_info, parser: argparse.ArgumentParser | None = None) -> dict:
    """setup -> data -> model/optimizer/explorer -> resume or start -> iterations -> final save/export/eval."""
    device = dist_info.device
    dataset = CocoInstances(*split_paths(args.data_path, "train", args.year), train=True)
    state = build_training(args, dataset.num_classes, device, parser)
    manager = CheckpointManager(args.output_dir, keep=args.keep_checkpoints)
    latest = manager.latest() if args.resume else None
    if latest:
        state.load(load_checkpoint(latest), latest)
        logger.info("resumed from %s at iteration %d", latest, state.iteration)
    elif state.explorer is not None:
        state.explorer.start(state.optimizer)
    if dist_info.is_main:
        save_args(args, args.output_dir)
    loader = make_train_loader(dataset, args, dist_info, state.iteration)
    logger.info("training %d -> %d iterations, %d images, world %d x batch %d", state.iteration, args.max_iter,
                len(dataset), dist_info.world_size, args.batch_size)
    train_loop(state, loader, manager, args, dist_info)
    final = state.to_checkpoint(args)
    save_checkpoint({k: final[k] for k in ("model", "iteration", "explorer", "args")},
                    str(Path(args.output_dir) / FINAL_NAME))
    export_compact(state.model, state.explorer, args)
    distributed.barrier()
    return run_evaluation(state.model, args, device) if args.final_eval else {}


def train_loop(state: TrainState, loader: DataLoader, manager: CheckpointManager, args, dist_info) -> None:
    """Iterations ``state.iteration + 1 .. --max-iter``: forward, TrainStep (AMP, non-finite check, SGD, LR,
    explorer.after_step), rank-0 logs and TensorBoard, periodic checkpoints."""
    device, model = dist_info.device, state.model
    ddp = model
    if dist_info.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    amp = AmpConfig(enabled=args.amp, device_type=device.type)
    step = TrainStep(state.optimizer, scaler=state.scaler, explorer=state.explorer, lr_scheduler=state.scheduler,
                     start_step=state.iteration)
    writer = TensorBoardWriter(Path(args.output_dir) / "tb", is_main=dist_info.is_main)
    model.train()
    batches = iter(loader)  # draws the loader's base seed first, as the uninterrupted run did at iteration 0
    if len(state.rng) == dist_info.world_size:
        # Flips and RPN/ROI sampling use the global RNG: restore each rank's stream for an exact resume.
        restore_rng_state(state.rng[dist_info.rank])
    tic = time.perf_counter()
    for images, targets in batches:
        with amp.autocast():
            losses = ddp([img.to(device, non_blocking=True) for img in images], _to_device(targets, device))
        result = step(losses)
        it = state.iteration = step.step_count
        lr = state.optimizer.param_groups[0]["lr"]
        if result.event is not None:
            ev = result.event
            logger.info("iter %d: CHEX event delta=%.4f regrown=%d density=%.4f", it, ev.delta, ev.n_regrown,
                        ev.density)
            writer.scalars("chex", {"density": ev.density, "delta": ev.delta, "regrown": ev.n_regrown}, it)
        if it % args.print_freq == 0 or it == args.max_iter:
            total = sum(result.losses.values())
            logger.info("iter %d/%d loss %.4f (%s) lr %.5f %.2fs/it", it, args.max_iter, total,
                        " ".join(f"{k} {v:.4f}" for k, v in result.losses.items()), lr,
                        (time.perf_counter() - tic) / args.print_freq)
            writer.scalars("train", {**result.losses, "loss": total, "lr": lr}, it)
            tic = time.perf_counter()
        if it % args.checkpoint_period == 0 or it == args.max_iter:
            manager.save(state.to_checkpoint(args), it)
    writer.close()


def export_compact(model, explorer, args) -> None:
    """Write the physically pruned model (BN bodies only; a GN body stays dense with zeros, see compact_maskrcnn)."""
    if explorer is None or not distributed.is_main_process():
        return
    if args.norm == "gn":
        logger.info("GroupNorm body: no compact export (GN statistics include pruned channels); "
                    "%s is the dense masked model", FINAL_NAME)
        return
    small, spec = compact_maskrcnn(model, explorer.groups, explorer.masks)
    compact = {"model": small.state_dict(), "body_spec": dict(spec), "iteration": args.max_iter,
               "args": args_to_dict(args)}
    path = save_checkpoint(compact, str(Path(args.output_dir) / COMPACT_NAME))
    logger.info("compact export: %s (%d of %d body params)", path,
                sum(p.numel() for p in small.backbone.body.parameters()),
                sum(p.numel() for p in model.backbone.body.parameters()))


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    dist_info = distributed.init_distributed()
    setup_logging(dist_info.is_main)
    try:
        if args.eval_only:
            evaluate_checkpoint(args, dist_info)
        else:
            train(args, dist_info, parser)
    except (DataError, CheckpointError, CheckpointMismatchError, NonFiniteLossError) as err:
        # Worker exceptions arrive with the worker's traceback in the message; its last line names the file.
        logger.error("%s: %s", type(err).__name__, str(err).strip().splitlines()[-1])
        return 1
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
