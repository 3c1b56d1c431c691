"""NVIDIA DALI input pipelines for CLS: ``--data-backend dali-cpu`` and ``--data-backend dali-gpu``.

Why: the ``pytorch`` backend decodes and augments JPEGs with PIL in DataLoader worker processes. A GPU trains a
ResNet-50 faster than a few CPU cores can feed it, and a compact CHEX model trains faster still, so without a faster
input pipeline the saving never reaches the wall clock. The NVIDIA ConvNets recipe that CLS follows offers DALI for
this; here it is an optional extra (``pip install -e ".[dali]"``, the ``nvidia-dali-cuda130`` wheel), imported only
when one of these backends is selected.

Same semantics as the ``pytorch`` backend (``CLS/data.py``):
  - train: random-resized crop (area 8–100 %, aspect ratio 3/4–4/3, fused into the JPEG decode), resize to S×S
    (antialiased), horizontal flip with p = 0.5, normalise with the ImageNet mean/std; float32 CHW batches;
  - val: decode, resize the shorter side to round(S·256/224) (antialiased), centre crop S×S, normalise;
  - order: in epoch e the training files are visited in a permutation that depends only on (seed, e) — exactly the
    indices ``DistributedSampler(shuffle=True, seed=seed, drop_last=True)`` gives rank r of w, so each DDP rank reads
    its own equal shard and a resumed run replays the order (the run harness calls ``set_epoch`` every epoch). Only full batches are trained,
    as with the pytorch backend. Validation: rank r reads images r, r+w, … with no padding (the harness's
    ``ShardSampler``), so summed counts give the exact accuracy;
  - augmentation randomness: the pipeline of epoch e on rank r is built with a seed derived from (seed, e, r), so a
    resumed epoch also draws the same crops and flips;
  - mid-epoch resume: the loader's ``state_dict`` is (epoch, batches served). DALI's random draws depend on every
    batch the pipeline ran before, so a resumed loader rebuilds the epoch's pipeline and runs (and discards) the
    batches already served: exact, at the cost of decoding them once more.

Devices: ``dali-gpu`` decodes with nvJPEG ("mixed") and crops, resizes, flips and normalises on the GPU; batches
arrive on the current CUDA device. ``dali-cpu`` runs everything on ``-j`` CPU threads and needs no GPU (the training
loop copies batches to the GPU as it does for the pytorch backend).

Files are listed with torchvision's ImageFolder rules and read by Python (``fn.external_source``), which is what
makes the order ours to control. Unreadable images: zero-byte files are dropped when the folder is scanned (logged,
counted against ``--max-bad-images``); DALI's decoder cannot skip a corrupt JPEG, so one aborts the run with a
:class:`~CLS.data.DataError` that names the batch's files — use the ``pytorch`` backend (which skips and logs them) on
a dataset that has not been checked.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from CLS.data import IMAGENET_MEAN, IMAGENET_STD, DataError, DataRequest, Loaders, check_image_folder

log = logging.getLogger(__name__)

DALI_BACKENDS = ("dali-cpu", "dali-gpu")
INSTALL_HINT = 'pip install -e ".[dali]" (NVIDIA DALI, Linux only)'


def import_dali(backend: str = "dali-cpu"):
    """The ``nvidia.dali`` modules ``(fn, types, pipeline_def, feed_ndarray)``; a one-line :class:`DataError` when
    DALI is not installed or cannot load."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except (ImportError, OSError) as exc:     # OSError: a shared library of the wheel failed to load
        raise DataError(f"--data-backend {backend} needs NVIDIA DALI: {INSTALL_HINT}; import failed: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return fn, types, pipeline_def, feed_ndarray


def dali_unavailable_reason(backend: str = "dali-cpu") -> str | None:
    """None when ``backend`` can run here, else why not (for skips and reports)."""
    try:
        import_dali(backend)
    except DataError as exc:
        return str(exc)
    if backend == "dali-gpu" and not torch.cuda.is_available():
        return "--data-backend dali-gpu needs a CUDA GPU (torch sees none); use dali-cpu or pytorch"
    return None


# --------------------------------------------------------------------------------------------------- file lists
def scan_folder(split_dir: Path, max_bad: int) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of an ImageFolder-layout split, zero-byte files dropped (with a warning each)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{split_dir}: {str(exc).splitlines()[0]}") from None
    empty = [p for p, _ in samples if Path(p).stat().st_size == 0]
    for p in empty[:20]:
        log.warning("skipping empty image file %s", p)
    if len(empty) > max_bad:
        raise DataError(f"{len(empty)} empty image files under {split_dir} (more than --max-bad-images {max_bad})")
    drop = set(empty)
    return [(p, int(c)) for p, c in samples if p not in drop], classes


def train_indices(n: int, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's training indices for ``epoch``: ``DistributedSampler(shuffle=True, drop_last=True)``'s, exactly."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil((n - world_size) / world_size) if n % world_size else n // world_size
    return order[: per_rank * world_size][rank::world_size]


def val_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Validation shard of ``rank``: r, r+w, … with no padding (``chex_tasks.harness.data.ShardSampler``)."""
    return list(range(rank, n, world_size))


def pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """DALI's seed for (seed, epoch, rank): fixed per epoch and rank, different across them."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 12) % (2**31 - 1)


# --------------------------------------------------------------------------------------------------- loader
@dataclass
class DaliConfig:
    """One pipeline's settings (train or val) and where this process sits in the job."""

    backend: str                  # dali-cpu | dali-gpu
    batch_size: int
    threads: int                  # DALI CPU threads (-j, at least 1)
    image_size: int
    train: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    prefetch: int = 2


class DaliLoader:
    """Iterable of ``(images float32 (B,3,S,S), labels int64 (B,))`` like a DataLoader: ``len()`` batches per epoch,
    ``set_epoch(e)`` selects the epoch's order and augmentation seed (see the module docstring)."""

    def __init__(self, samples: list[tuple[str, int]], cfg: DaliConfig):
        self.samples, self.cfg, self.epoch = samples, cfg, 0
        self.served = 0          # batches of the current epoch handed out so far
        self._skip = 0           # batches to run and discard at the next __iter__ (a mid-epoch resume)
        self._dali = import_dali(cfg.backend)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.backend == "dali-gpu" \
            else torch.device("cpu")

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        """Where the loader is inside its epoch (plain ints; the order and crops follow from (seed, epoch, rank))."""
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        """Continue an epoch: the next ``__iter__`` starts after the ``served`` batches of ``epoch``."""
        self.epoch, self._skip = int(state["epoch"]), int(state["served"])

    def indices(self) -> list[int]:
        c = self.cfg
        if c.train:
            return train_indices(len(self.samples), self.epoch, c.seed, c.rank, c.world_size)
        return val_indices(len(self.samples), c.rank, c.world_size)

    def batches(self) -> list[list[int]]:
        idx, b = self.indices(), self.cfg.batch_size
        # train: full batches only (one short batch when a shard is smaller than a batch, as the pytorch backend)
        full = max(len(idx) // b, min(len(idx), 1)) if self.cfg.train else math.ceil(len(idx) / b)
        return [idx[i * b:(i + 1) * b] for i in range(full)]

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self):
        batches = self.batches()
        pipe = build_pipeline(self._dali, self.cfg, self._source(batches),
                              pipeline_seed(self.cfg.seed, self.epoch, self.cfg.rank), self.device)
        skip, self._skip = min(self._skip, len(batches)), 0
        if skip:
            log.info("%s: resuming epoch %d after batch %d (re-running the served batches so the augmentation "
                     "draws continue exactly)", self.cfg.backend, self.epoch, skip)
        self.served = 0
        for i, batch in enumerate(batches):
            try:
                images, labels = pipe.run()
            except RuntimeError as exc:          # DALI reports decode failures as RuntimeError
                files = ", ".join(self.samples[i][0] for i in batch[:4])
                raise DataError(f"DALI failed on a batch of {len(batch)} images ({files}, ...): "
                                f"{str(exc).strip().splitlines()[0]}; the pytorch backend skips unreadable "
                                "images") from None
            self.served = i + 1
            if i >= skip:
                yield self._to_torch(images), self._to_torch(labels)

    def _source(self, batches: list[list[int]]):
        """Generator of the epoch's batches of encoded files and labels (DALI pulls it ahead of ``run``)."""
        for batch in batches:
            yield ([np.fromfile(self.samples[i][0], dtype=np.uint8) for i in batch],
                   [np.array(self.samples[i][1], dtype=np.int64) for i in batch])

    def _to_torch(self, tensor_list) -> torch.Tensor:
        feed_ndarray = self._dali[3]
        t = tensor_list.as_tensor()
        on_gpu = type(t).__name__.endswith("GPU")
        out = torch.empty(t.shape(), dtype=torch.float32 if len(t.shape()) > 1 else torch.int64,
                          device=self.device if on_gpu else "cpu")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(out.device) if on_gpu else None)
        return out


def build_pipeline(dali, cfg: DaliConfig, source, seed: int, device: torch.device):
    """The recipe's train or val pipeline, fed by ``source``; built and ready to ``run()``."""
    fn, types, pipeline_def, _ = dali
    gpu = cfg.backend == "dali-gpu"
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]
    size = cfg.image_size

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.threads, device_id=device.index if gpu else None,
                  seed=seed, prefetch_queue_depth=cfg.prefetch)
    def pipe():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, dtype=[types.UINT8, types.INT64])
        decoder = "mixed" if gpu else "cpu"
        # nvJPEG scratch sizes of the NVIDIA recipe: fewer re-allocations while the first epoch warms up
        pads = {"device_memory_padding": 211_025_920, "host_memory_padding": 140_544_512} if gpu else {}
        if cfg.train:
            images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10, **pads)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **pads)
            images = fn.resize(images, resize_shorter=int(round(size * 256 / 224)),
                               interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                                          mean=mean, std=std, mirror=mirror)
        return images, labels

    p = pipe()
    p.build()
    return p


def build_loaders(backend: str, req: DataRequest) -> Loaders:
    """DALI train/val loaders over the ImageNet layout (``root/train/<class>/*``, ``root/val/<class>/*``), for the
    ``dali-*`` entries of :data:`CLS.data.BACKENDS`. DataLoader-only options of the request (``pin_memory``,
    ``synthetic_samples``) have no meaning here. Raises :class:`DataError` for user errors (DALI missing, no GPU for
    dali-gpu, bad folder layout)."""
    root, batch_size, workers, image_size = req.root, req.batch_size, req.workers, req.image_size
    need_train, rank, world_size, num_classes = req.need_train, req.rank, req.world_size, req.num_classes
    max_bad_images, seed = req.max_bad_images, req.seed
    if backend not in DALI_BACKENDS:
        raise DataError(f"unknown DALI backend {backend!r} (choose from {', '.join(DALI_BACKENDS)})")
    reason = dali_unavailable_reason(backend)
    if reason:
        raise DataError(reason)
    root = check_image_folder(root, need_train)
    image_size = image_size or 224
    val_samples, classes = scan_folder(root / "val", max_bad_images)
    train_samples = None
    if need_train:
        train_samples, train_classes = scan_folder(root / "train", max_bad_images)
        if train_classes != classes:
            raise DataError(f"train/ and val/ under {root} have different class folders "
                            f"({len(train_classes)} vs {len(classes)})")
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"--num-classes {num_classes} but {root}/val has {len(classes)} class folders")
    common = dict(backend=backend, batch_size=batch_size, threads=max(1, workers), image_size=image_size,
                  seed=seed, rank=rank, world_size=world_size)
    val = DaliLoader(val_samples, DaliConfig(train=False, **common))
    train = DaliLoader(train_samples, DaliConfig(train=True, **common)) if need_train else None
    if len(val.samples) == 0 or (train is not None and len(train.samples) == 0):
        raise DataError(f"the {backend} dataset at {root} is empty")
    if train is not None and len(train) == 0:
        raise DataError(f"the training set ({len(train.samples)} images) is too small for {world_size} process(es) "
                        f"of batch {batch_size}")
    log.info("%s: %d train / %d val images, %d classes, %d DALI thread(s)", backend,
             len(train.samples) if train else 0, len(val.samples), len(classes), max(1, workers))
    return Loaders(train, val, len(classes), image_size)
