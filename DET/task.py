"""DET as a run-harness task: NVIDIA's SSD300 recipe with CHEX on the backbone (see docs/harness.md)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from chex_core import distributed as dist_utils
from chex_tasks.harness import Layout, LRSchedule, Run, Runtime, Task, UserError
from DET.box_coder import BoxCoder
from DET.evaluate import evaluate, log_evaluation
from DET.model import (HEAD_CONSUMERS, SSD300, BackboneInit, BackboneWeightsError, MultiBoxLoss,
                       resolve_backbone_init)
from DET.summary import JsonSummary

logger = logging.getLogger("DET")

#: the resolution DET quotes backbone FLOPs at (SSD300's input), so --target-flops is resolved there too
FLOPS_SIZE = 300


def backbone_init(args, rt: Runtime) -> BackboneInit:
    """The backbone's initial weights (``--backbone-path``, ``--random-backbone`` or torchvision's ImageNet file).

    The first process of each machine resolves them, downloading into the torch hub cache if needed; the others then
    read that cache without downloading, so one machine never fetches the file twice at once. A failure anywhere is
    the same one-line ``UserError`` on every rank (no rank is left waiting in a collective)."""
    def resolve(download: bool) -> tuple[BackboneInit | None, str | None]:
        try:
            return resolve_backbone_init(args.backbone, args.backbone_path, args.random_backbone, download), None
        except BackboneWeightsError as err:
            return None, str(err)

    init, error = resolve(True) if rt.info.local_rank == 0 else (None, None)
    for attempt in range(2):   # the local first process, then the rest from the cache it filled
        errors = [e for e in dist_utils.all_gather_object(error) if e]
        if errors:
            raise UserError(errors[0])
        if attempt == 0 and init is None:
            init, error = resolve(False)
    return init


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only (BatchNorm γ/β and biases are 1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over :func:`param_groups`."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)


class DetTask(Task):
    """NVIDIA's SSD300 recipe with CHEX on the backbone, as a run-harness task."""

    name = "DET"
    layout = Layout(model_key="model", epoch_alias="epoch_{n}.pt", compact_name="model_compact.pt",
                    weights_flag="--backbone-path (backbone weights only)")
    prunable_path = "backbone"
    stage_consumers = HEAD_CONSUMERS        # --chex-residual: the heads reading layer3 narrow with its stream

    def __init__(self, args, loaders, coder: BoxCoder, summary: JsonSummary | None = None):
        self.args, self.loaders, self.coder = args, loaders, coder
        self.summary = summary or JsonSummary(None)
        self.label_map = loaders.train_set.label_map
        self.criterion = MultiBoxLoss()
        self.total_time, self.last_map = 0.0, None

    def build_model(self, run: Run) -> SSD300:
        model = SSD300(self.args.backbone, len(self.label_map) + 1)
        init = backbone_init(self.args, run.rt)
        init.apply(model.backbone)
        if init.source == "random":
            logger.warning("backbone: random init (--random-backbone); upstream starts from ImageNet weights")
        else:
            logger.info("backbone initialised from %s", init.description)
        return model

    def flops_input_size(self, run: Run) -> tuple[int, int, int]:
        return (3, FLOPS_SIZE, FLOPS_SIZE)

    def train_loader(self, run: Run):
        return self.loaders.train

    def steps(self, run: Run, loader) -> tuple[int, int, int]:
        return self.args.epochs, min(len(loader), self.args.max_iters_per_epoch or len(loader)), 1

    def param_groups(self, model):
        return param_groups(model, self.args.weight_decay)

    def optimizer(self, run: Run, model):
        lr = self.args.learning_rate * run.rt.world_size * self.args.bs / 32
        return torch.optim.SGD(self.param_groups(model), lr=lr, momentum=self.args.momentum)

    def lr_schedule(self, run: Run) -> LRSchedule:
        spe = run.steps_per_epoch
        return LRSchedule("step", warmup_steps=self.args.warmup, milestones=[m * spe for m in self.args.multistep])

    def forward(self, run: Run, model, batch):
        images, offsets, labels = batch
        images = images.to(run.rt.device, non_blocking=True)
        with run.amp.autocast():
            locs, confs = model(images)
        return self.criterion(locs, confs, offsets.to(run.rt.device), labels.to(run.rt.device)), images.shape[0]

    def resume_checks(self, run: Run, ckpt: dict, path: str) -> None:
        trained = ckpt.get("backbone") or (ckpt.get("args") or {}).get("backbone")
        if trained and trained != self.args.backbone:
            raise UserError(f"--resume {path} holds an SSD300 with backbone {trained}, not --backbone "
                            f"{self.args.backbone}")

    def extra_state(self, run: Run) -> dict:
        return {"label_map": dict(self.label_map), "backbone": self.args.backbone}

    def end_epoch(self, run: Run, epoch: int, stats: dict) -> None:
        self.total_time += stats["time_s"]
        self.summary.log((epoch,), {"time": stats["time_s"], "loss": stats["loss"]})
        eval_epochs = set(self.args.eval_on_epochs) if self.args.eval_on_epochs is not None else {self.args.epochs - 1}
        if epoch in eval_epochs:
            inverse = {label: cat for cat, label in self.label_map.items()}
            metrics = evaluate(run.model, self.loaders.val, self.coder, inverse, run.rt.device,
                               run.amp.autocast_dtype if self.args.amp else None)
            log_evaluation(run.model, self.args.backbone, metrics, f"epoch {epoch} COCO bbox")
            if metrics is not None:
                self.last_map = metrics["AP"]
                self.summary.log((epoch,), {"mAP": metrics["AP"]})
        return None

    def export_metadata(self, run: Run) -> dict:
        return {"backbone": self.args.backbone, "label_map": dict(self.label_map)}

    def finish(self, run: Run) -> None:
        """The JSON summary's last records; after CHEX training the physically smaller model, loadable with
        ``--mode evaluation --checkpoint``."""
        self.summary.log((), {"total time": self.total_time})
        self.summary.log((), {"mAP": self.last_map} if self.last_map is not None else {})
        if run.explorer is None:
            return
        small, _, path = run.export_compact()
        if path is not None:
            logger.info("compact model written to %s (backbone params %.2fM -> %.2fM)", path,
                        sum(p.numel() for p in run.model.backbone.parameters()) / 1e6,
                        sum(p.numel() for p in small.backbone.parameters()) / 1e6)
