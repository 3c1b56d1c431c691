"""SEG as a run-harness task: maskrcnn-benchmark's iteration-based Mask R-CNN recipe with CHEX on the backbone body
(see docs/harness.md)."""
from __future__ import annotations

import logging

import torch

from chex_core import distributed
from chex_tasks.harness import DataError, Layout, LRSchedule, Run, Task, UserError, make_train_loader

from .data import CocoInstances, ConcatInstances, GroupedInfiniteBatchSampler, aspect_ratio_groups, collate
from .evaluate import FINAL_NAME, model_from_args, run_evaluation
from .model import FPN_LATERALS, load_model_weights

logger = logging.getLogger("SEG.train")
COMPACT_NAME = "model_compact.pth"
FLOPS_SIZE = 224   # the paper quotes body FLOPs at 224 x 224; --target-flops is resolved there too


class SegTask(Task):
    """maskrcnn-benchmark's iteration-based recipe with CHEX on the backbone body: one "epoch" of ``--max-iter``
    steps, ΔT and T_max counted in iterations."""

    name = "SEG"
    layout = Layout(model_key="model", final_name=FINAL_NAME, pointer_name="last_checkpoint",
                    compact_name=COMPACT_NAME, weights_flag="--weights (evaluation only)")
    prunable_path = "backbone.body"
    stage_consumers = FPN_LATERALS          # --chex-residual: the FPN laterals narrow with the stages they read

    def __init__(self, args, dataset: CocoInstances | ConcatInstances, weights: dict | None = None):
        self.args, self.dataset, self.weights = args, dataset, weights

    def build_model(self, run: Run):
        """The model of the flags; with ``--weights``, started from that file (a released maskrcnn-benchmark file
        also installs its anchors; ``--conventions`` was resolved to upstream for it)."""
        model = model_from_args(self.args, self.dataset.num_classes)
        if self.weights is not None:
            kind = load_model_weights(model, self.weights)
            logger.info("initialised from %s checkpoint %s", kind, self.args.weights)
        return model

    def flops_input_size(self, run: Run) -> tuple[int, int, int]:
        return (3, FLOPS_SIZE, FLOPS_SIZE)

    def resume_checks(self, run: Run, ckpt: dict, path: str) -> None:
        """The same weights load in either convention, so a resume under the other one would continue silently
        with different arithmetic: refuse it."""
        saved = (ckpt.get("args") or {}).get("conventions") or "torchvision"
        if saved != self.args.conventions:
            raise UserError(f"--resume {path} was trained with --conventions {saved}; this run uses "
                            f"{self.args.conventions} (pass --conventions {saved})")

    def train_loader(self, run: Run):
        a, ds = self.args, self.dataset
        groups = aspect_ratio_groups([ds.aspect_ratio(i) for i in range(len(ds))], a.aspect_ratio_group_factor)
        try:
            sampler = GroupedInfiniteBatchSampler(groups, a.batch_size, a.max_iter, run.rt.rank, run.rt.world_size,
                                                  seed=a.seed)
        except ValueError as err:
            raise DataError(str(err)) from None
        return make_train_loader(ds, batch_sampler=sampler, workers=a.workers, seed=a.seed, rank=run.rt.rank,
                                 world_size=run.rt.world_size, collate_fn=collate)

    def steps(self, run: Run, loader) -> tuple[int, int, int]:
        return 1, self.args.max_iter, 1

    def units_per_step(self, run: Run, steps_per_epoch: int) -> int:
        return 1

    def param_groups(self, model):
        a = self.args
        weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
        biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
        return [{"params": weights, "lr": a.lr, "weight_decay": a.weight_decay},
                {"params": biases, "lr": a.lr * a.bias_lr_factor, "weight_decay": 0.0}]

    def lr_schedule(self, run: Run) -> LRSchedule:
        a = self.args
        return LRSchedule("step", total_steps=a.max_iter, warmup_steps=a.warmup_iters, warmup_start=a.warmup_factor,
                          warmup_offset=0, milestones=a.steps, gamma=a.gamma)

    def forward(self, run: Run, model, batch):
        images, targets = batch
        device = run.rt.device
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with run.amp.autocast():
            losses = model([img.to(device, non_blocking=True) for img in images], targets)
        return losses, len(images)

    def finish(self, run: Run) -> None:
        """The compact body (BN bodies only: a GroupNorm body stays dense with zeros), then the final evaluation."""
        if run.explorer is not None and self.args.norm == "gn":
            logger.info("GroupNorm body: no compact export (GN statistics include pruned channels); %s is the "
                        "dense masked model", FINAL_NAME)
        elif run.explorer is not None:
            was_training = run.model.training
            run.model.eval()
            small, _, path = run.export_compact()
            run.model.train(was_training)
            logger.info("compact export: %s (%d of %d body params)", path,
                        sum(p.numel() for p in small.backbone.body.parameters()),
                        sum(p.numel() for p in run.model.backbone.body.parameters()))
        distributed.barrier()
        if self.args.final_eval:
            run_evaluation(run.model, self.args, run.rt.device)
