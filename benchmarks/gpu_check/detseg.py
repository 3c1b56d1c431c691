"""A few DET (SSD300) and SEG (Mask R-CNN R-50-FPN) training iterations with AMP and one CHEX event each.

Why: the detection and segmentation models have never run in fp16 on a GPU here. This builds them with the task
folders' own builders (``DET.model.SSD300`` + ``MultiBoxLoss`` with ``DET.box_coder`` targets,
``SEG.model.build_maskrcnn`` with the released GroupNorm body) and trains them with ``chex_core``'s ``AmpConfig``
(fp16 + ``GradScaler``), ``TrainStep`` and ``ChannelExplorer`` — the same objects the entry points use, not their
internals — on synthetic images with random boxes and masks. The explorer fires exactly once (schedule ΔT = T_max =
``event_step`` steps), so one prune/regrow/re-allocate runs between fp16 steps.

Checks: every loss finite (``TrainStep`` raises on a non-finite all-reduced loss), exactly one event, the density
after it equals 1 − S (δ = 0 at T_max), the GradScaler's scale finite and positive, fewer skipped steps than steps
(the first fp16 steps of a random-init model at the initial scale 2^16 overflow and are skipped — that is what the
scaler is for — but the scale must come down far enough for steps to be applied), and the pruned channels' producer
weights still exactly zero after the steps that follow the event. On CPU (``--quick``) autocast is bf16 and needs no
scaler: fp16 CPU kernels take tens of seconds per SSD step; the fp16 scaler path is covered by the ``amp`` section.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from chex_core import ChannelExplorer, ExplorationSchedule
from chex_core.engine import AmpConfig, NonFiniteLossError, TrainStep

from .common import Config, sync


def _det_batch(coder, batch: int, gen: torch.Generator, num_classes: int):
    """Random images and 1–3 random boxes per image, encoded against the 8732 SSD300 default boxes."""
    images = torch.randn(batch, 3, 300, 300, generator=gen)
    offsets, labels = [], []
    for _ in range(batch):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * 0.6
        wh = 0.1 + torch.rand(k, 2, generator=gen) * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1)
        o, lab = coder.encode_target(boxes, torch.randint(1, num_classes, (k,), generator=gen))
        offsets.append(o)
        labels.append(lab)
    return images, torch.stack(offsets), torch.stack(labels)


def _seg_batch(batch: int, size: int, gen: torch.Generator, num_classes: int):
    """Random images with 1–3 rectangular instances each (boxes in pixels, binary masks)."""
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, size, size, generator=gen))
        k = int(torch.randint(1, 4, (1,), generator=gen))
        boxes, masks = [], torch.zeros(k, size, size, dtype=torch.uint8)
        for j in range(k):
            x0, y0 = (torch.rand(2, generator=gen) * size * 0.5).long().tolist()
            w, h = (size * (0.2 + torch.rand(2, generator=gen) * 0.3)).long().tolist()
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks[j, y0:y0 + h, x0:x0 + w] = 1
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "masks": masks,
                        "labels": torch.randint(1, num_classes, (k,), generator=gen)})
    return images, targets


def _train(name: str, model: nn.Module, explored: nn.Module, groups, step_fn, cfg: Config, lr: float,
           sparsity: float, delta0: float, explorer_kw: dict) -> dict:
    """Shared loop: SGD + fp16 AMP + TrainStep + one explorer event at step ``event_step``."""
    device = cfg.device
    event_step = max(1, cfg.detseg_iters // 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    amp = AmpConfig(enabled=True, device_type=device.type, dtype=cfg.amp_dtype)
    scaler = amp.make_scaler()
    schedule = ExplorationSchedule(1, 1, sparsity, delta0, steps_per_unit=event_step)
    explorer = ChannelExplorer(explored, groups, schedule, seed=cfg.seed, **explorer_kw)
    explorer.start(opt)
    trainer = TrainStep(opt, scaler=scaler, explorer=explorer)
    model.train()
    losses, events, times, problems = [], [], [], []
    for it in range(cfg.detseg_iters):
        t = time.perf_counter()
        try:
            with amp.autocast():
                loss_dict = step_fn(it)
            r = trainer(loss_dict)
        except NonFiniteLossError as exc:
            problems.append(f"iteration {it + 1}: {str(exc).splitlines()[0]}")
            break
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(sum(r.losses.values()))
        if r.event is not None:
            events.append({"step": r.event.step, "density": explorer.density()})
    scale = scaler.get_scale()
    if len(events) != 1:
        problems.append(f"{len(events)} CHEX events, expected 1")
    elif abs(events[0]["density"] - (1 - sparsity)) > 0.02:
        problems.append(f"density {events[0]['density']:.3f} after the event, expected {1 - sparsity:.3f}")
    if not all(math.isfinite(v) for v in losses) or len(losses) < cfg.detseg_iters:
        problems.append(f"losses {losses}")
    if not (math.isfinite(scale) and scale > 0):
        problems.append(f"GradScaler scale {scale}")
    if trainer.skipped_steps >= cfg.detseg_iters:
        problems.append(f"all {trainer.skipped_steps} steps skipped by the GradScaler")
    for g in explorer.groups:
        w = explored.get_submodule(g.producer).weight.detach()[~explorer.masks[g.name].to(device)]
        if w.numel() and bool(w.abs().max() != 0):
            problems.append(f"{name}: pruned channels of {g.producer} are not zero after the event")
            break
    return {"task": name, "ok": not problems, "problems": problems, "losses": losses, "events": events,
            "scale": scale, "skipped_steps": trainer.skipped_steps, "iteration_s": times}


def run_det(cfg: Config) -> dict:
    from DET.box_coder import BoxCoder, dboxes300_coco
    from DET.model import SSD300, MultiBoxLoss, channel_groups

    torch.manual_seed(cfg.seed)
    device, classes = cfg.device, 81
    # NCHW, as DET/main.py trains it
    model = SSD300(cfg.det_backbone, num_classes=classes).to(device)
    coder, criterion = BoxCoder(dboxes300_coco()), MultiBoxLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = [_det_batch(coder, cfg.det_batch, gen, classes) for _ in range(cfg.detseg_iters)]

    def step(it):
        images, offsets, labels = (t.to(device) for t in batches[it])
        locs, confs = model(images)
        return criterion(locs, confs, offsets, labels)

    # the DET recipe: lr 2.6e-3 per 32 images, S = 0.5, δ0 = 0.2, backbone only; the explorer sees the whole SSD with
    # the backbone's groups, as DET/main.py builds it
    out = _train("det", model, model, channel_groups(model), step, cfg,
                 2.6e-3 * cfg.det_batch / 32, 0.5, 0.2, {})
    out.update(model=f"SSD300-{cfg.det_backbone}", batch=cfg.det_batch, image_size=300)
    return out


def run_seg(cfg: Config) -> dict:
    from SEG.model import SamplingConfig, build_maskrcnn, channel_groups

    torch.manual_seed(cfg.seed)
    device, classes, size = cfg.device, 5, cfg.seg_size
    small = SamplingConfig(200, 100, 100, 50, 64, 64, 20) if cfg.quick else SamplingConfig()
    model = build_maskrcnn(classes, norm="gn", head_norm="gn", min_size=size, max_size=size, sampling=small)
    model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = [_seg_batch(cfg.seg_batch, size, gen, classes) for _ in range(cfg.detseg_iters)]

    def step(it):
        images, targets = batches[it]
        return model([i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets])

    # the released SEG variant: leverage CSS, random regrowth, uniform allocation; S = 0.5, δ0 = 0.5
    # the explorer sees the whole Mask R-CNN with the body's groups, as SEG/train.py builds it
    out = _train("seg", model, model, channel_groups(model), step, cfg, 0.02 * cfg.seg_batch / 16,
                 0.5, 0.5, {"criterion": "leverage", "regrow": "random", "allocation": "uniform"})
    out.update(model="Mask R-CNN R-50-FPN (GN)", batch=cfg.seg_batch, image_size=size)
    return out


def run(cfg: Config, deadline=None) -> dict:
    results = [run_det(cfg), run_seg(cfg)]
    return {"ok": all(r["ok"] for r in results), "problems": [p for r in results for p in r["problems"]],
            "tasks": results, "dtype": str(cfg.amp_dtype)}
