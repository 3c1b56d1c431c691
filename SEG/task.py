"""SEG as a run-harness task: maskrcnn-benchmark's iteration-based Mask R-CNN recipe with CHEX on the backbone body
(see docs/harness.md)."""
from __future__ import annotations

import logging

import torch

from chex_core import distributed
from chex_tasks.harness import DataError, Layout, LRSchedule, Run, Task, make_train_loader

from .data import CocoInstances, GroupedInfiniteBatchSampler, aspect_ratio_groups, collate
from .evaluate import FINAL_NAME, model_from_args, run_evaluation

logger = logging.getLogger("SEG.train")
COMPACT_NAME = "model_compact.pth"


class SegTask(Task):
    """maskrcnn-benchmark's iteration-based recipe with CHEX on the backbone body: one "epoch" of ``--max-iter``
    steps, ΔT and T_max counted in iterations."""

    name = "SEG"
    layout = Layout(model_key="model", final_name=FINAL_NAME, pointer_name="last_checkpoint",
                    compact_name=COMPACT_NAME, weights_flag="--weights (evaluation only)")
    prunable_path = "backbone.body"

    def __init__(self, args, dataset: CocoInstances):
        self.args, self.dataset = args, dataset

    def build_model(self, run: Run):
        return model_from_args(self.args, self.dataset.num_classes)

    def flops_input_size(self, run: Run) -> tuple[int, int, int]:
        return (3, 224, 224)   # the paper quotes body FLOPs at 224 x 224

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
