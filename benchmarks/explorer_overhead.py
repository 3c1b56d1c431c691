"""What CHEX costs on top of training: mask re-application per step, and one prune/regrow event per ΔT.

Measured side by side in one run on ResNet-50 (torchvision layout, the official 32 inner groups; ``--residual`` adds
the 5 residual-stream groups):
  - a plain training step (forward + backward + SGD momentum step), median of ``--steps``;
  - ``explorer.apply_masks(optimizer)`` (runs after every optimizer step), median of many repetitions;
  - one full exploration event (CSS + MRU restore + importance regrowth + re-allocation), median of ``--events``.
It prints mask re-application as a share of a step, and one event as a share of an ImageNet epoch (1.28 M images)
extrapolated from the measured step time. CPU by default; ``--device cuda`` (with ``--amp``) when a GPU is there.

    python benchmarks/explorer_overhead.py                 # ResNet-50, 224 px, batch 16, CPU
    python benchmarks/explorer_overhead.py --quick         # a few seconds, for CI smoke
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from chex_core import ChannelExplorer, ExplorationSchedule, resnet_groups

IMAGENET_TRAIN = 1_281_167


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    times = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help="torchvision architecture (default resnet50)")
    p.add_argument("--batch", type=int, default=16, help="training batch size per step (default 16)")
    p.add_argument("--image-size", type=int, default=224, help="input resolution (default 224)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (default 5)")
    p.add_argument("--events", type=int, default=3, help="timed exploration events (default 3)")
    p.add_argument("--criterion", default="qr", choices=["qr", "leverage", "l1"], help="CSS criterion")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--amp", action="store_true", help="autocast fp16 (cuda) / bf16 (cpu) for the training step")
    p.add_argument("--residual", action="store_true",
                   help="also explore the residual streams as coupled groups (--chex-residual): bigger CSS matrices "
                        "(every producer of a stream side by side) and more masked tensors")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (resnet18, 64 px, batch 4)")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.image_size, args.steps, args.events = "resnet18", 4, 64, 2, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)().to(device)
    groups = resnet_groups(model, residual=args.residual)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3e-5)
    ex = ChannelExplorer(model, groups, ExplorationSchedule(2, 180, 0.7, 0.3, steps_per_unit=1000),
                         criterion=args.criterion)
    ex.start(opt)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def train_step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_step()                                             # warm-up (and creates momentum buffers)
    step_s = timed(train_step, args.steps, device)
    mask_s = timed(lambda: ex.apply_masks(opt), max(20, args.steps * 10), device)
    event_step = iter(range(2000, 2000 + 2000 * args.events, 2000))
    event_s = timed(lambda: ex.explore(next(event_step), opt), args.events, device)
    steps_per_epoch = IMAGENET_TRAIN / args.batch
    result = {
        "arch": args.arch, "device": str(device), "batch": args.batch, "image_size": args.image_size,
        "amp": args.amp, "criterion": args.criterion, "residual": args.residual, "threads": torch.get_num_threads(),
        "step_s": step_s, "mask_apply_s": mask_s, "event_s": event_s,
        "mask_share_of_step": mask_s / step_s,
        "event_share_of_epoch": event_s / (step_s * steps_per_epoch),
    }
    print(f"{args.arch} on {device} ({torch.get_num_threads()} threads), batch {args.batch}, {args.image_size} px, "
          f"amp={args.amp}, criterion={args.criterion}, residual groups={args.residual}")
    print(f"  training step            {step_s * 1e3:10.1f} ms (median of {args.steps})")
    print(f"  mask re-application      {mask_s * 1e3:10.3f} ms  = {100 * result['mask_share_of_step']:.3f} % of a step")
    print(f"  one exploration event    {event_s:10.3f} s   = {100 * result['event_share_of_epoch']:.5f} % of an "
          f"ImageNet epoch ({steps_per_epoch:.0f} steps at this batch, extrapolated)")
    return result


if __name__ == "__main__":
    main()
