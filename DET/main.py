"""SSD300 (ResNet-50 backbone) on COCO2017, trained with CHEX channel exploration on the backbone.

Run from ``DET/``. The upstream commands work verbatim:

    python -m torch.distributed.launch --nproc_per_node=8 ./main.py --backbone resnet50 --warmup 300 --bs 64 \
        --amp --data /coco --epoch 650 --multistep 430 540 --grow_prune --channel_sparsity 0.5 \
        --init_channel_ratio 0.2 --delta_T 2 --T_max 470 --save ./logs
    python ./main.py --backbone resnet50 --mode evaluation --checkpoint ckpt.pth.tar --data /coco

``torchrun --nproc_per_node=N ./main.py ...`` works as well. Flags keep NVIDIA SSD's meaning: ``--warmup`` is
in iterations, ``--multistep`` in epochs (×0.1 each), ``--bs`` per process, lr = 2.6e-3 × world × bs / 32.
CHEX (``--grow_prune``; ``--delta_T``/``--T_max`` in epochs) prunes only the backbone, through ``chex_core``
(with ``--chex-residual`` also its residual stream, narrowing the heads that read layer3's output with it).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import pathlib
import random
import sys
import time

if __package__ in (None, ""):  # run as a script from DET/ (upstream usage): make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from chex_core import apply_width_spec, compact_model
from chex_core import checkpoint as ckpt_utils
from chex_core import cli as chex_cli
from chex_core import distributed as dist_utils
from chex_core.engine import AmpConfig, NonFiniteLossError, TrainStep
from chex_core.physical import PhysicalTraining, ddp_wrapper
from chex_tasks.coco import format_metrics
from DET.box_coder import BoxCoder, dboxes300_coco
from DET.data import DataError, build_loaders
from DET.evaluate import backbone_flops, evaluate
from DET.model import (BACKBONES, SSD300, MultiBoxLoss, StateDictMismatch, channel_groups, load_pretrained_backbone,
                       load_state_dict_checked, map_upstream_state_dict)

logger = logging.getLogger("DET")

MODES = ("training", "evaluation", "benchmark-training", "benchmark-inference")
BASE_LR = 2.6e-3  # NVIDIA SSD's base learning rate for a global batch of 32


class _Parser(argparse.ArgumentParser):
    """Bad flags end with one line on stderr (not the 25-line usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="SSD300 on COCO2017 with CHEX channel exploration on the backbone",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", "-d", default="/coco",
                   help="COCO root holding train2017/, val2017/ and annotations/instances_{train,val}2017.json")
    p.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES),
                   help="torchvision ResNet used up to layer3 (random init unless --pretrained-backbone)")
    p.add_argument("--pretrained-backbone", default=None, metavar="PATH",
                   help="local ImageNet ResNet state dict (torchvision or CLS checkpoint); never downloaded")
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
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write epoch_{k}.pt checkpoints (and model_compact.pt after CHEX training) here")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="how many epoch_{k}.pt files --save keeps")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint to resume training from, or to evaluate (ours or a released upstream one)")
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
    chex_cli.add_chex_args(p, unit="epochs",
                           defaults={"channel_sparsity": 0.5, "init_channel_ratio": 0.2, "delta_T": 2, "T_max": 180})
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate; user mistakes exit with status 2 and one line naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    chex_cli.validate_chex_args(parser, args)
    if not os.path.isdir(args.data):
        parser.error(f"--data: directory not found: {args.data}")
    training = args.mode in ("training", "benchmark-training")
    if training and args.bs < 2:
        parser.error(f"--bs must be >= 2 for training (BatchNorm on SSD's 1x1 feature map), got {args.bs}")
    for flag, value, low in (("--epochs", args.epochs, 1), ("--eval-batch-size", args.eval_batch_size, 1),
                             ("--warmup", args.warmup, 0), ("--num-workers", args.num_workers, 0),
                             ("--keep-checkpoints", args.keep_checkpoints, 1), ("--log-interval", args.log_interval, 1),
                             ("--benchmark-iterations", args.benchmark_iterations, 1),
                             ("--benchmark-warmup", args.benchmark_warmup, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.max_iters_per_epoch is not None and args.max_iters_per_epoch < 1:
        parser.error(f"--max-iters-per-epoch must be >= 1, got {args.max_iters_per_epoch}")
    if args.learning_rate <= 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    if any(m < 0 for m in args.multistep) or args.multistep != sorted(args.multistep):
        parser.error(f"--multistep must be non-negative epochs in increasing order, got {args.multistep}")
    if args.mode == "evaluation" and not args.checkpoint:
        parser.error("--mode evaluation needs --checkpoint")
    for flag, path in (("--checkpoint", args.checkpoint), ("--pretrained-backbone", args.pretrained_backbone)):
        if path and not os.path.isfile(path):
            parser.error(f"{flag}: file not found: {path}")
    return args


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)


def shared_seed(seed: int | None) -> int:
    """The user's seed, or one drawn on rank 0 and broadcast, so every rank initialises identically."""
    if seed is None:
        seed = dist_utils.broadcast_object(random.SystemRandom().randrange(2**31))
    return int(seed)


def lr_factor(iteration: int, iters_per_epoch: int, warmup: int, milestones: list[int]) -> float:
    """NVIDIA SSD schedule as one per-iteration factor: linear warm-up over ``warmup`` iterations, then ×0.1
    for every milestone epoch reached (epochs are 0-based, as MultiStepLR stepped once per epoch)."""
    epoch = iteration // iters_per_epoch
    decay = 0.1 ** sum(epoch >= m for m in milestones)
    return decay * (min(1.0, (iteration + 1) / warmup) if warmup else 1.0)


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only (BatchNorm γ/β and biases are 1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=momentum)


def checkpoint_num_classes(state_dict: dict) -> int | None:
    """Number of classes of an SSD300 state dict (ours or upstream): conf.0 has 4 boxes × classes rows."""
    for key, value in state_dict.items():
        if key.endswith("conf.0.weight"):
            return value.shape[0] // 4
    return None


def read_model_checkpoint(path: str, backbone: str) -> tuple[dict, dict]:
    """``(checkpoint dict, model state dict in SSD300 names)`` of one of our checkpoints, our compact export, or a
    released upstream checkpoint (``model`` key, or a bare state dict; ``module.`` prefixes allowed)."""
    ckpt = ckpt_utils.load_checkpoint(path)
    trained = ckpt.get("backbone") or (ckpt.get("args") or {}).get("backbone")
    if trained and trained != backbone:
        raise StateDictMismatch(f"{path} holds an SSD300 with backbone {trained}, but --backbone is {backbone}")
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    try:
        return ckpt, map_upstream_state_dict(state)
    except StateDictMismatch as exc:
        raise StateDictMismatch(f"{path}: {exc}") from exc


def checkpoint_label_map(ckpt: dict, dataset) -> dict[int, int]:
    """COCO category id → contiguous label the checkpoint was trained with.

    Ours store ``{category id: label}``. Upstream NVIDIA/CHEX checkpoints store under the same key the
    dataset's ``label_info`` (``{label: category name}``, 0 = background); the label order is then the sorted
    category ids of the dataset, which is checked by name.
    """
    stored = ckpt.get("label_map") or {}
    if stored and all(isinstance(v, str) for v in stored.values()):
        names = [stored[k] for k in sorted(stored) if int(k) != 0]
        if names != [dataset.label_info[k] for k in sorted(dataset.label_info)]:
            raise StateDictMismatch(f"checkpoint classes {names[:3]}... differ from the dataset's "
                                    f"{list(dataset.label_info.values())[:3]}...")
        return dict(dataset.label_map)
    return {int(k): int(v) for k, v in stored.items()} or dict(dataset.label_map)


def build_model(args, num_classes: int, state: dict | None, ckpt: dict | None, what: str) -> SSD300:
    """SSD300 for ``args.backbone``; rebuilt to a compact width spec if the checkpoint has one; weights loaded."""
    model = SSD300(args.backbone, num_classes)
    if ckpt is not None and ckpt.get("width_spec"):
        if ckpt.get("backbone", args.backbone) != args.backbone:
            raise StateDictMismatch(f"{what} was exported for --backbone {ckpt['backbone']}, not {args.backbone}")
        # the spec names backbone groups (residual ones too after --chex-residual); the groups say which layers,
        # heads included, each name narrows
        apply_width_spec(model, ckpt["width_spec"], groups=channel_groups(model, residual=True))
    if state is not None:
        load_state_dict_checked(model, state, what)
    elif args.pretrained_backbone:
        load_pretrained_backbone(model.backbone, ckpt_utils.load_checkpoint(args.pretrained_backbone),
                                 args.pretrained_backbone)
        logger.info("backbone initialised from %s", args.pretrained_backbone)
    return model


def log_evaluation(model: SSD300, args, metrics: dict[str, float] | None, prefix: str) -> None:
    if metrics is None:
        return
    flops = backbone_flops(model.backbone, args.backbone)
    logger.info("%s: %s", prefix, format_metrics(metrics))
    logger.info("Backbone GMACs @300px: %.3f (dense %.3f) -> FLOPs reduction %.1f%%", flops["gmacs"],
                flops["dense_gmacs"], 100.0 * flops["reduction"])


def run_evaluation(args, info, coder: BoxCoder) -> None:
    """``--mode evaluation``: load ``--checkpoint`` (ours, compact, or upstream) and print COCO bbox AP."""
    loaders = build_loaders(args.data, coder, args.bs, args.eval_batch_size, args.num_workers, info.distributed,
                            seed=0, with_train=False)
    ckpt, state = read_model_checkpoint(args.checkpoint, args.backbone)
    label_map = checkpoint_label_map(ckpt, loaders.val_set)
    num_classes = checkpoint_num_classes(state) or len(label_map) + 1
    if set(label_map) != set(loaders.val_set.label_map) or num_classes != len(label_map) + 1:
        raise StateDictMismatch(f"{args.checkpoint} was trained for {num_classes - 1} classes "
                                f"{sorted(label_map)[:5]}..., the dataset has {len(loaders.val_set.label_map)} "
                                f"{sorted(loaders.val_set.label_map)[:5]}...")
    model = build_model(args, num_classes, state, ckpt, args.checkpoint).to(info.device)
    amp = AmpConfig(enabled=args.amp, device_type=info.device.type)
    inverse = {int(label): int(cat) for cat, label in label_map.items()}
    metrics = evaluate(model, loaders.val, coder, inverse, info.device, amp.autocast_dtype if args.amp else None)
    log_evaluation(model, args, metrics, f"COCO bbox evaluation of {args.checkpoint}")


def save_training_checkpoint(args, state: dict, epoch: int) -> None:
    """``--save/epoch_{epoch}.pt`` atomically on rank 0, keeping the newest ``--keep-checkpoints``."""
    if not args.save or not dist_utils.is_main_process():
        return
    ckpt_utils.CheckpointManager(args.save, keep=args.keep_checkpoints, name_format="epoch_{n}.pt").save(state, epoch)


def export_compact(args, model: SSD300, groups, explorer, label_map: dict, phys=None) -> None:
    """After CHEX training: physically remove pruned backbone channels and save ``--save/model_compact.pt``,
    loadable with ``--mode evaluation --checkpoint``."""
    if explorer is None or not args.save or not dist_utils.is_main_process():
        return
    if phys is not None and phys.compact:      # trained compact already (--compact-training)
        compact, spec = copy.deepcopy(model), phys.width_spec()
    else:
        compact, spec = compact_model(model, groups, explorer.masks)
    compact = compact.cpu()
    small_backbone = compact.backbone
    path = pathlib.Path(args.save) / "model_compact.pt"
    ckpt_utils.save_checkpoint({"model": compact.state_dict(), "width_spec": spec, "backbone": args.backbone,
                                "label_map": label_map, "args": dict(vars(args))}, str(path))
    n_dense = sum(p.numel() for p in model.backbone.parameters())
    n_small = sum(p.numel() for p in small_backbone.parameters())
    logger.info("compact model written to %s (backbone params %.2fM -> %.2fM)", path, n_dense / 1e6, n_small / 1e6)


def resume(args, ckpt: dict | None, optimizer, scheduler, scaler, explorer, phys=None) -> tuple[int, int]:
    """Restore optimizer/scheduler/scaler/explorer from a training checkpoint; returns ``(start_epoch, iteration)``.

    A checkpoint without optimizer state (e.g. a released upstream model) only initialises the weights. Without
    explorer state a CHEX run starts exploring from the loaded weights. With ``--compact-training`` (``phys``) a
    compact checkpoint narrows the freshly built model first and loads model, optimizer and explorer through it.
    """
    start_epoch = iteration = 0
    physical = ckpt.get("physical") if ckpt is not None else None
    if physical and phys is None:
        raise StateDictMismatch(f"{args.checkpoint} was written with --compact-training; resume it the same way")
    if phys is not None and physical:
        try:
            phys.load_state_dict(physical, explorer_state=ckpt["explorer"], model_state=ckpt["model"],
                                 optimizer_state=ckpt["optimizer"])
        except (ValueError, RuntimeError) as exc:
            raise StateDictMismatch(f"{args.checkpoint}: {exc}") from exc
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        return int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0))
    # only our own checkpoints (they carry "args") resume optimizer/schedule; upstream ones initialise weights
    if ckpt is not None and "optimizer" in ckpt and "args" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, iteration = int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0))
        logger.info("resumed from %s at epoch %d, iteration %d", args.checkpoint, start_epoch, iteration)
    elif ckpt is not None:
        logger.info("initialised weights from %s (no optimizer state: training starts at epoch 0)", args.checkpoint)
    if explorer is not None:
        if ckpt is not None and ckpt.get("explorer"):
            try:
                explorer.load_state_dict(ckpt["explorer"], optimizer)
            except ValueError as exc:
                raise StateDictMismatch(f"{args.checkpoint}: {exc}") from exc
        else:
            explorer.start(optimizer)
            if phys is not None:
                phys.start()
    elif ckpt is not None and ckpt.get("explorer"):
        logger.warning("%s holds CHEX explorer state but --grow_prune is off: its masks are not enforced",
                       args.checkpoint)
    return start_epoch, iteration


def train_one_epoch(ctx: dict, epoch: int) -> None:
    """One (possibly --max-iters-per-epoch shortened) pass over the training loader."""
    args, loaders, step = ctx["args"], ctx["loaders"], ctx["step"]
    device, amp, criterion = ctx["device"], ctx["amp"], ctx["criterion"]
    if loaders.train_sampler is not None:
        loaders.train_sampler.set_epoch(epoch)
    tic, seen = time.perf_counter(), 0
    for i, (images, offsets, labels) in enumerate(loaders.train):
        if i >= ctx["iters_per_epoch"]:
            break
        images = images.to(device, non_blocking=True)
        with amp.autocast():
            locs, confs = ctx["ddp_model"](images)   # re-read: --compact-training swaps the model at events
        losses = criterion(locs, confs, offsets.to(device), labels.to(device))
        result = step(losses)
        seen += images.shape[0] * ctx["world_size"]
        if result.event is not None:
            ev = result.event
            logger.info("epoch %d iter %d: CHEX event delta=%.4f regrown=%d backbone channel density=%.4f",
                        epoch, step.step_count, ev.delta, ev.n_regrown, ev.density)
        if i == 0 or step.step_count % args.log_interval == 0 or i + 1 == ctx["iters_per_epoch"]:
            logger.info("epoch %d iter %d/%d: loss %.4f (box %.4f, cls %.4f) lr %.3g %.1f img/s", epoch, i + 1,
                        ctx["iters_per_epoch"], sum(result.losses.values()), result.losses["loss_box"],
                        result.losses["loss_cls"], ctx["optimizer"].param_groups[0]["lr"],
                        seen / (time.perf_counter() - tic))


def run_training(args, info, coder: BoxCoder) -> None:
    """``--mode training``: data → model → SGD + warm-up/multistep → CHEX explorer → epochs → compact export."""
    loaders = build_loaders(args.data, coder, args.bs, args.eval_batch_size, args.num_workers, info.distributed,
                            seed=args.seed)
    label_map = loaders.train_set.label_map
    ckpt, state = read_model_checkpoint(args.checkpoint, args.backbone) if args.checkpoint else (None, None)
    compact_resume = bool(ckpt is not None and ckpt.get("physical"))   # its weights load through PhysicalTraining
    model = build_model(args, len(label_map) + 1, None if compact_resume else state, ckpt,
                        args.checkpoint or "").to(info.device)
    iters_per_epoch = min(len(loaders.train), args.max_iters_per_epoch or len(loaders.train))
    # the explorer sees the whole SSD (groups found within its backbone), so residual groups reach the heads
    groups = channel_groups(model, args.chex_prune_downsample, args.chex_residual)
    explorer = chex_cli.explorer_from_args(args, model, groups, steps_per_unit=iters_per_epoch,
                                           flops_within="backbone")
    lr = args.learning_rate * info.world_size * args.bs / 32
    optimizer = make_optimizer(model, lr, args.momentum, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, args.warmup, args.multistep))
    amp = AmpConfig(enabled=args.amp, device_type=info.device.type)
    scaler = amp.make_scaler()
    phys = None
    if args.compact_training:
        ctx: dict = {}

        def follow(p: PhysicalTraining) -> None:       # the loop and the checkpoint read the current objects
            ctx.update(ddp_model=p.train_model, optimizer=p.optimizer)

        phys = PhysicalTraining(model, explorer, optimizer, mode=args.compact_training_mode,
                                lr_scheduler=scheduler, on_rebuild=follow,
                                wrap=ddp_wrapper(device_ids=[info.device.index] if info.device.type == "cuda"
                                                 else None) if info.distributed else None)
    start_epoch, iteration = resume(args, ckpt, optimizer, scheduler, scaler, explorer, phys)
    logger.info("training %s-SSD300: %d classes, %d images, %d iterations/epoch, world %d, lr %.4g, amp %s, CHEX %s",
                args.backbone, len(label_map), len(loaders.train_set), iters_per_epoch, info.world_size, lr,
                amp.autocast_dtype if args.amp else "off", "on" if explorer else "off")
    ddp_model = model
    if phys is not None:
        ddp_model, optimizer = phys.train_model, phys.optimizer     # DDP-wrapped by PhysicalTraining when distributed
    elif info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    step = TrainStep(optimizer, scaler=scaler, explorer=phys or explorer, lr_scheduler=scheduler,
                     start_step=iteration)
    if phys is not None:
        phys.trainer = step
    ctx = ctx if phys is not None else {}
    ctx.update({"args": args, "loaders": loaders, "step": step, "device": info.device, "amp": amp,
                "optimizer": optimizer, "ddp_model": ddp_model, "criterion": MultiBoxLoss(),
                "iters_per_epoch": iters_per_epoch, "world_size": info.world_size})
    eval_epochs = set(args.eval_on_epochs) if args.eval_on_epochs is not None else {args.epochs - 1}
    inverse = {label: cat for cat, label in label_map.items()}
    for epoch in range(start_epoch, args.epochs):
        train_one_epoch(ctx, epoch)
        save_training_checkpoint(args, {
            "model": model.state_dict(), "optimizer": ctx["optimizer"].state_dict(),
            "scheduler": scheduler.state_dict(), "physical": phys.state_dict() if phys is not None else None,
            "scaler": scaler.state_dict(), "epoch": epoch + 1, "iteration": step.step_count,
            "label_map": dict(label_map), "explorer": explorer.state_dict() if explorer else {},
            "backbone": args.backbone, "args": dict(vars(args))}, epoch)
        if epoch in eval_epochs:
            metrics = evaluate(model, loaders.val, coder, inverse, info.device,
                               amp.autocast_dtype if args.amp else None)
            log_evaluation(model, args, metrics, f"epoch {epoch} COCO bbox")
    export_compact(args, model, groups, explorer, label_map, phys)
    dist_utils.barrier()


def run_benchmark(args, info, coder: BoxCoder) -> None:
    """``--mode benchmark-training|benchmark-inference``: images/s over ``--benchmark-iterations`` batches."""
    training = args.mode == "benchmark-training"
    loaders = build_loaders(args.data, coder, args.bs, args.eval_batch_size, args.num_workers, info.distributed,
                            seed=args.seed, with_train=training)
    model = build_model(args, len(loaders.val_set.label_map) + 1, None, None, "").to(info.device)
    amp = AmpConfig(enabled=args.amp, device_type=info.device.type)
    loader = loaders.train if training else loaders.val
    optimizer = make_optimizer(model, args.learning_rate, args.momentum, args.weight_decay)
    step = TrainStep(optimizer, scaler=amp.make_scaler())
    criterion = MultiBoxLoss()
    model.train(training)
    n_images, tic, done = 0, None, 0
    while done < args.benchmark_warmup + args.benchmark_iterations:
        for batch in loader:
            if done == args.benchmark_warmup:
                tic = time.perf_counter()
            images = batch[0].to(info.device)
            with amp.autocast(), torch.set_grad_enabled(training):
                locs, confs = model(images)
            if training:
                step(criterion(locs, confs, batch[1].to(info.device), batch[2].to(info.device)))
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            n_images += images.shape[0] if done >= args.benchmark_warmup else 0
            done += 1
            if done >= args.benchmark_warmup + args.benchmark_iterations:
                break
    elapsed = time.perf_counter() - tic
    logger.info("%s: %.2f img/s per process (%d images in %.2f s, batch %d)", args.mode, n_images / elapsed,
                n_images, elapsed, images.shape[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    info = dist_utils.init_distributed()
    setup_logging(info.rank)
    args.seed = shared_seed(args.seed)
    random.seed(args.seed + info.rank)  # augmentation in the main process (num_workers=0) differs per rank
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    logger.info("seed %d; args: %s", args.seed, vars(args))
    coder = BoxCoder(dboxes300_coco())
    try:
        if args.mode == "training":
            run_training(args, info, coder)
        elif args.mode == "evaluation":
            run_evaluation(args, info, coder)
        else:
            run_benchmark(args, info, coder)
    except (DataError, StateDictMismatch, ckpt_utils.CheckpointError, NonFiniteLossError) as exc:
        # the DataLoader re-raises worker errors with the worker traceback in the message: keep its last line
        logger.error("%s", str(exc).strip().splitlines()[-1])
        return 1
    finally:
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
