"""Data backends for CLS: ImageNet folders (``pytorch``), random tensors (``synthetic``) and sklearn digits.

The backends form a registry (:data:`BACKENDS`): a backend is one function ``DataRequest -> Loaders`` registered
with :func:`register_backend`, so another input pipeline (e.g. NVIDIA DALI) is one more entry. The built-in ones
build datasets and hand them to the run harness's loaders (``chex_tasks.harness.data``): an exactly resumable
training loader and an exact, unpadded evaluation shard per rank.
Shapes: a batch is ``(images: float32 (B, 3, S, S), labels: int64 (B,))``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from chex_tasks.harness.data import DataError, TrainLoader, make_eval_loader, make_train_loader

__all__ = ["DataError", "DataRequest", "Loaders", "BACKENDS", "BACKEND_ALIASES", "register_backend", "build_loaders",
           "check_image_folder"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 'syntetic' is upstream's spelling of synthetic.
BACKEND_ALIASES = {"syntetic": "synthetic"}


@dataclass(frozen=True)
class DataRequest:
    """What a backend is asked for (``batch_size`` is per process, as upstream's ``-b``)."""

    root: str | None
    batch_size: int
    workers: int
    image_size: int | None
    need_train: bool
    rank: int = 0
    world_size: int = 1
    num_classes: int | None = None
    synthetic_samples: int = 1024
    max_bad_images: int = 100
    pin_memory: bool = False
    seed: int = 0


@dataclass
class Loaders:
    train: TrainLoader | None
    val: DataLoader
    num_classes: int
    image_size: int


BACKENDS: dict[str, Callable[[DataRequest], Loaders]] = {}


def register_backend(name: str):
    """Decorator: ``@register_backend("name")`` on a ``DataRequest -> Loaders`` function adds ``--data-backend name``."""
    def add(fn):
        BACKENDS[name] = fn
        return fn
    return add


# --------------------------------------------------------------------------------------------------- ImageNet
class SafeImageFolder(Dataset):
    """``torchvision.datasets.ImageFolder`` that skips unreadable images (logging their path) up to a bound.

    A corrupt JPEG in a 1.28 M-image set should not kill a multi-day run, but a folder of unreadable files must
    not train silently either: after ``max_bad`` failures (per worker process) it raises :class:`DataError`.
    """

    def __init__(self, root: Path, transform, max_bad: int):
        from torchvision.datasets import ImageFolder

        try:
            self.inner = ImageFolder(str(root), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no image files
            raise DataError(f"{root}: {str(exc).splitlines()[0]}") from None
        self.max_bad = max_bad
        self.bad = 0
        self.classes = self.inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        for attempt in range(len(self.inner)):
            i = (index + attempt) % len(self.inner)
            try:
                return self.inner[i]
            except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for truncated/corrupt files
                self.bad += 1
                path = self.inner.samples[i][0]
                log.warning("skipping unreadable image %s (%s)", path, exc)
                if self.bad > self.max_bad:
                    raise DataError(f"more than {self.max_bad} unreadable images (last: {path}); "
                                    "check the dataset or raise --max-bad-images") from None
        raise DataError(f"no readable image in {self.inner.root}")


def _imagenet_transforms(image_size: int):
    from torchvision import transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    # the standard 256→224 ratio, kept for other sizes
    val = T.Compose([T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), T.ToTensor(), norm])
    return train, val


def check_image_folder(root: str | os.PathLike | None, need_train: bool) -> Path:
    """Validate the ImageNet layout (``root/train/<class>/*``, ``root/val/<class>/*``); raise :class:`DataError`."""
    if not root:
        raise DataError("the pytorch data backend needs the dataset directory as the positional DIR argument")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    for split in (("train", "val") if need_train else ("val",)):
        sub = root / split
        if not sub.is_dir():
            raise DataError(f"data directory {root} has no '{split}/' folder (expected {root}/{split}/<class>/<image>)")
        if not any(p.is_dir() for p in sub.iterdir()):
            raise DataError(f"{sub} has no class sub-folders (expected {sub}/<class>/<image>)")
    return root


def _imagenet_datasets(root, image_size: int, need_train: bool, max_bad: int):
    root = check_image_folder(root, need_train)
    train_tf, val_tf = _imagenet_transforms(image_size)
    val = SafeImageFolder(root / "val", val_tf, max_bad)
    train = SafeImageFolder(root / "train", train_tf, max_bad) if need_train else None
    if train is not None and train.classes != val.classes:
        raise DataError(f"train/ and val/ under {root} have different class folders "
                        f"({len(train.classes)} vs {len(val.classes)})")
    return train, val, len(val.classes)


# --------------------------------------------------------------------------------------------------- synthetic
class SyntheticDataset(Dataset):
    """Random normal images and uniform labels, fixed per index (for speed runs; nothing can be learnt)."""

    def __init__(self, length: int, num_classes: int, image_size: int, seed: int = 0):
        self.length, self.num_classes, self.image_size, self.seed = length, num_classes, image_size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(3, self.image_size, self.image_size, generator=g)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        return image, label


# --------------------------------------------------------------------------------------------------- digits
class DigitsDataset(Dataset):
    """scikit-learn's built-in handwritten digits (1797 real 8×8 images, 10 classes), no download.

    Images are upsampled bilinearly to ``image_size``, repeated to 3 channels and standardised. The split is
    fixed (stratified, 20 % validation, ``random_state=0``) so every run and every rank sees the same sets.
    Training adds a random shift of up to ``image_size/16`` pixels (the digits are centred; this is the usual
    pad-and-crop augmentation).
    """

    VAL_FRACTION = 0.2

    def __init__(self, split: str, image_size: int):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        idx = torch.arange(len(digits.target))
        tr, va = train_test_split(idx.numpy(), test_size=self.VAL_FRACTION, random_state=0,
                                  stratify=digits.target)
        chosen = tr if split == "train" else va
        x = torch.as_tensor(digits.images[chosen], dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = (x - 0.3) / 0.4  # roughly zero-mean, unit-variance for the digits' ink/background mix
        self.images = x.expand(-1, 3, -1, -1).contiguous()
        self.labels = torch.as_tensor(digits.target[chosen], dtype=torch.int64)
        self.train = split == "train"
        self.shift = max(1, image_size // 16)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.train:
            dy, dx = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        return image, int(self.labels[index])


# --------------------------------------------------------------------------------------------------- loaders
def _loaders(req: DataRequest, train: Dataset | None, val: Dataset, num_classes: int, image_size: int) -> Loaders:
    if len(val) == 0 or (train is not None and len(train) == 0):
        raise DataError(f"the dataset at {req.root} is empty")
    # drop_last keeps every micro-batch full, so gradient accumulation always averages the same number of images
    train_loader = None if train is None else make_train_loader(
        train, batch_size=req.batch_size, workers=req.workers, seed=req.seed, rank=req.rank,
        world_size=req.world_size, drop_last=len(train) // req.world_size >= req.batch_size,
        pin_memory=req.pin_memory)
    val_loader = make_eval_loader(val, batch_size=req.batch_size, workers=req.workers, rank=req.rank,
                                  world_size=req.world_size, pin_memory=req.pin_memory)
    return Loaders(train_loader, val_loader, num_classes, image_size)


@register_backend("pytorch")
def imagenet_backend(req: DataRequest) -> Loaders:
    image_size = req.image_size or 224
    train, val, n_cls = _imagenet_datasets(req.root, image_size, req.need_train, req.max_bad_images)
    if req.num_classes is not None and req.num_classes != n_cls:
        raise DataError(f"--num-classes {req.num_classes} but {req.root}/val has {n_cls} class folders")
    return _loaders(req, train, val, n_cls, image_size)


@register_backend("synthetic")
def synthetic_backend(req: DataRequest) -> Loaders:
    image_size, n_cls = req.image_size or 224, req.num_classes or 1000
    train = SyntheticDataset(req.synthetic_samples, n_cls, image_size, seed=1) if req.need_train else None
    val = SyntheticDataset(max(req.synthetic_samples // 4, 1), n_cls, image_size, seed=2)
    return _loaders(req, train, val, n_cls, image_size)


@register_backend("digits")
def digits_backend(req: DataRequest) -> Loaders:
    image_size = req.image_size or 32
    if req.num_classes not in (None, 10):
        raise DataError(f"--num-classes {req.num_classes} does not match the digits dataset (10 classes)")
    train = DigitsDataset("train", image_size) if req.need_train else None
    return _loaders(req, train, DigitsDataset("val", image_size), 10, image_size)


def _dali_backend(name: str) -> Callable[[DataRequest], Loaders]:
    def build(req: DataRequest) -> Loaders:
        from CLS import dali  # NVIDIA DALI is an optional extra: imported only when one of its backends is asked for
        return dali.build_loaders(name, req)
    return build


for _name in ("dali-cpu", "dali-gpu"):        # NVIDIA's recipe: decode and augment with DALI (CLS/dali.py)
    register_backend(_name)(_dali_backend(_name))


def build_loaders(backend: str, root: str | None = None, **request) -> Loaders:
    """Train/val loaders of ``backend`` (see :class:`DataRequest` for the keyword arguments). Raises
    :class:`DataError` for user errors."""
    name = BACKEND_ALIASES.get(backend, backend) if backend not in BACKENDS else backend
    if name not in BACKENDS:
        raise DataError(f"unknown data backend {backend!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name](DataRequest(root=root, **request))
