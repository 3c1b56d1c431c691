"""Input pipeline throughput: the ``pytorch`` (PIL) backend vs ``dali-cpu`` (and ``dali-gpu`` on a GPU), per CPU core.

Why: a compact CHEX model trains ~2× faster than dense, so the data loader, not the GPU, decides the wall clock
unless it keeps up. This measures how many training (random-resized crop + flip + normalise) and validation
(resize + centre crop + normalise) images per second each CLS backend delivers, through the same
``CLS.data.build_loaders`` the training script uses.

Data: a generated ImageNet-layout folder (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) of JPEGs at ImageNet's
typical 500×375, quality 90, whose content is smooth colour fields with edges and fine noise so that they compress
to ImageNet-like file sizes (~100 KB) and decode at realistic cost (pure noise or flat images would not).

Measurement, side by side in one run (backends interleaved round by round): each backend delivers one whole epoch
per round after one untimed warm-up epoch (see :class:`Feed` for why whole epochs); reported are wall-clock images/s and images per CPU-second of this
process (``time.process_time`` covers DALI's threads and the main thread; the pytorch backend runs with ``-j 0`` in
this process, so both count every cycle they use). With one thread each (``--threads 1``), images per CPU-second is
the per-core throughput, insensitive to other programs sharing the machine.

    python benchmarks/input_pipeline.py                      # 1 thread per backend, CPU, writes benchmarks/results/
    python benchmarks/input_pipeline.py --quick --out /tmp/q # seconds, for the CI smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):          # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info  # noqa: E402
from CLS import data as cls_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- data
def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An RGB uint8 image with ImageNet-like JPEG statistics: multi-scale smooth colour fields, a few hard-edged
    shapes and fine noise (so it neither compresses to nothing nor looks like white noise)."""
    from PIL import Image, ImageDraw

    acc = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((3, 1.0), (12, 0.45), (48, 0.3), (250, 0.35)):
        grid = (rng.random((max(2, cells * height // width), cells, 3)) * 255).astype(np.uint8)
        acc += amp * np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
    acc = acc / 2.1
    img = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    arr = np.asarray(img, np.float32) + rng.normal(0, 10, (height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def make_image_folder(root: str | os.PathLike, classes: int = 4, train_per_class: int = 32, val_per_class: int = 8,
                      size: tuple[int, int] = (500, 375), seed: int = 0, quality: int = 90) -> Path:
    """Write an ImageNet-layout JPEG folder (idempotent: an existing complete folder is reused)."""
    from PIL import Image

    root = Path(root)
    stamp = root / ".complete"
    want = f"{classes} {train_per_class} {val_per_class} {size} {seed} {quality}"
    if stamp.is_file() and stamp.read_text() == want:
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(natural_image(rng, *size)).save(d / f"img_{i:05d}.JPEG", quality=quality)
    stamp.write_text(want)
    return root


def folder_stats(root: Path) -> dict:
    files = sorted(root.glob("*/*/*.JPEG"))
    sizes = [f.stat().st_size for f in files]
    return {"images": len(files), "mean_kb": round(sum(sizes) / max(len(sizes), 1) / 1024, 1)}


# --------------------------------------------------------------------------------------------------- timing
class Feed:
    """One backend's loader over one split. Every timed window is one whole epoch, from creating the iterator to the
    last batch: DALI prefetches batches on its own threads, so a window that stopped mid-epoch would leave work
    running into the next backend's window (and its CPU time). At the end of an epoch there is nothing left to
    prefetch, so each window holds exactly its backend's work, pipeline start-up included."""

    def __init__(self, backend: str, root: Path, split: str, batch: int, threads: int, image_size: int,
                 device: torch.device, pytorch_workers: int = 0):
        self.name, self.split, self.device = backend, split, device
        # pytorch with 0 workers decodes in this process, so process_time counts all of its work
        workers = pytorch_workers if backend == "pytorch" else threads
        loaders = cls_data.build_loaders(backend, str(root), batch_size=batch, workers=workers,
                                         image_size=image_size, need_train=split == "train", rank=0, world_size=1,
                                         pin_memory=device.type == "cuda")
        self.loader = loaders.train if split == "train" else loaders.val
        self.loaders, self.epoch = loaders, 0
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.images: list[int] = []

    def epoch_images(self) -> int:
        """Deliver one epoch to the device, as the training loop would; returns the number of images."""
        if hasattr(self.loader, "set_epoch"):       # the training loader (the validation order is fixed)
            self.loader.set_epoch(self.epoch)
        self.epoch += 1
        n = 0
        for images, _ in self.loader:
            images = images.to(self.device, non_blocking=True)
            n += images.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return n

    def timed(self) -> None:
        t, c = time.perf_counter(), time.process_time()
        n = self.epoch_images()
        self.wall.append(time.perf_counter() - t)
        self.cpu.append(time.process_time() - c)
        self.images.append(n)

    def result(self) -> dict:
        n = self.images[-1]
        return {"backend": self.name, "split": self.split, "images_per_epoch": n,
                "images_per_s": n / statistics.median(self.wall),
                "images_per_cpu_s": n / statistics.median(self.cpu), "rounds": len(self.wall)}


def measure(backends: list[str], root: Path, splits: list[str], batch: int, threads: int, image_size: int,
            rounds: int, device: torch.device, pytorch_workers: int = 0) -> list[dict]:
    """Images/s and images per CPU-second of every (backend, split): one epoch per round, rounds interleaved
    across backends, after one untimed warm-up epoch each (first allocations, library start-up). With
    ``pytorch_workers`` > 0 the pytorch backend decodes in worker processes, whose CPU time is not counted."""
    feeds = [Feed(b, root, s, batch, threads, image_size, device, pytorch_workers) for s in splits for b in backends]
    for f in feeds:
        f.epoch_images()
    for _ in range(rounds):
        for f in feeds:
            f.timed()
    out = [f.result() for f in feeds]
    for r in out:                                                # ratio to the pytorch backend on the same split
        ref = next((q for q in out if q["backend"] == "pytorch" and q["split"] == r["split"]), None)
        if ref is not None:
            r["per_cpu_s_vs_pytorch"] = r["images_per_cpu_s"] / ref["images_per_cpu_s"]
            r["per_s_vs_pytorch"] = r["images_per_s"] / ref["images_per_s"]
    return out


def table(rows: list[dict]) -> str:
    head = "| backend | split | images/s (wall) | images per CPU-second | vs pytorch (per CPU-s) | vs pytorch (wall) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['split']} | {r['images_per_s']:.1f} | {r['images_per_cpu_s']:.1f} | "
                     f"{r.get('per_cpu_s_vs_pytorch', float('nan')):.2f}× | {r.get('per_s_vs_pytorch', float('nan')):.2f}× |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["pytorch", "dali-cpu"],
                   choices=["pytorch", "dali-cpu", "dali-gpu"], help="backends to compare (default pytorch dali-cpu)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                   help="pipelines to measure (default train val)")
    p.add_argument("--threads", type=int, default=1, help="DALI threads; pytorch decodes in-process (default 1)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--image-size", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of one epoch each (default 3)")
    p.add_argument("--classes", type=int, default=4, help="class folders to generate (default 4)")
    p.add_argument("--per-class", type=int, default=64, help="training images per class (default 64; val: 1/4)")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "jpeg_folder",
                   help="where the generated folder is written/reused (default runs/jpeg_folder)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where batches are delivered")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    p.add_argument("--quick", action="store_true", help="CI smoke: 64x48 images, 2 classes, batch 4, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.image_size, args.rounds, args.classes, args.per_class = 4, 32, 1, 2, 4
    for flag in ("threads", "batch", "image_size", "rounds", "classes", "per_class"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)         # ToTensor/Normalize of the pytorch backend: the same core budget
    size = (64, 48) if args.quick else (500, 375)
    root = make_image_folder(args.data, args.classes, args.per_class, max(1, args.per_class // 4), size)
    from CLS.dali import dali_unavailable_reason

    skipped = {b: dali_unavailable_reason(b) for b in args.backends if b.startswith("dali")}
    skipped = {b: why for b, why in skipped.items() if why}
    for b, why in skipped.items():
        print(f"input_pipeline.py: skipping {b}: {why}", file=sys.stderr)
    backends = [b for b in args.backends if b not in skipped]
    try:
        rows = measure(backends, root, args.splits, args.batch, args.threads, args.image_size, args.rounds,
                       torch.device(args.device))
    except cls_data.DataError as exc:
        print(f"input_pipeline.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    meta = {"machine": machine_info(), "folder": folder_stats(root), "image_wh": size, "threads": args.threads,
            "skipped": skipped,
            "batch": args.batch, "image_size": args.image_size, "device": args.device, "command": " ".join(sys.argv)}
    md = (f"Input pipelines on {meta['machine']['cpu_count']}-core CPU, {args.threads} thread(s) per backend, "
          f"{meta['folder']['images']} generated {size[0]}×{size[1]} JPEGs (mean {meta['folder']['mean_kb']} KB), "
          f"crop {args.image_size}, batch {args.batch}, batches delivered to {args.device}; medians of "
          f"{args.rounds} interleaved rounds; 1-min load average {meta['machine'].get('loadavg_1m')}.\n\n"
          + table(rows) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"input_pipeline_{args.device}" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
