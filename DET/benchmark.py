"""DET ``--mode benchmark-training|benchmark-inference`` (NVIDIA SSD's modes): images/s of the SSD300 step."""
from __future__ import annotations

import logging
import time

import torch

from chex_core.engine import AmpConfig, TrainStep
from DET.box_coder import BoxCoder
from DET.data import build_loaders
from DET.model import SSD300, MultiBoxLoss

logger = logging.getLogger("DET")


def run_benchmark(args, rt, coder: BoxCoder, optimizer_for) -> float:
    """Images/s per process over ``--benchmark-iterations`` batches after ``--benchmark-warmup`` untimed ones (the
    backbone is randomly initialised: its weights do not change the speed)."""
    training = args.mode == "benchmark-training"
    loaders = build_loaders(args.data, coder, args.bs, args.eval_batch_size, args.num_workers, rt.rank,
                            rt.world_size, seed=args.seed, with_train=training)
    model = SSD300(args.backbone, len(loaders.val_set.label_map) + 1).to(rt.device)
    amp = AmpConfig(enabled=args.amp, device_type=rt.device.type)
    loader = loaders.train if training else loaders.val
    step = TrainStep(optimizer_for(model), scaler=amp.make_scaler())
    criterion = MultiBoxLoss()
    model.train(training)
    n_images, tic, done = 0, None, 0
    while done < args.benchmark_warmup + args.benchmark_iterations:
        for batch in loader:
            if done == args.benchmark_warmup:
                tic = time.perf_counter()
            images = batch[0].to(rt.device)
            with amp.autocast(), torch.set_grad_enabled(training):
                locs, confs = model(images)
            if training:
                step(criterion(locs, confs, batch[1].to(rt.device), batch[2].to(rt.device)))
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            n_images += images.shape[0] if done >= args.benchmark_warmup else 0
            done += 1
            if done >= args.benchmark_warmup + args.benchmark_iterations:
                break
    elapsed = time.perf_counter() - tic
    logger.info("%s: %.2f img/s per process (%d images in %.2f s, batch %d)", args.mode, n_images / elapsed,
                n_images, elapsed, images.shape[0])
    return n_images / elapsed
