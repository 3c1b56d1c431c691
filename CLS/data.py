"""Data backends for CLS: ImageNet folders (``pytorch``), random tensors (``synthetic``) and sklearn digits.

Every backend returns a :class:`Loaders` with train/val ``DataLoader``s, the number of classes and the image size.
Shapes: a batch is ``(images: float32 (B, 3, S, S), labels: int64 (B,))``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("pytorch", "synthetic", "digits", "dali-cpu", "dali-gpu")   # dali-*: CLS/dali.py, optional extra
# 'syntetic' is upstream's spelling of synthetic.
BACKEND_ALIASES = {"syntetic": "synthetic"}


class DataError(ValueError):
    """A user-facing problem with the dataset (missing folder, wrong layout, too many unreadable images)."""


@dataclass
class Loaders:
    train: DataLoader | None
    val: DataLoader
    num_classes: int
    image_size: int
    train_sampler: Sampler | None = None
    generator: torch.Generator | None = None  # the single-process shuffle generator (None with a train_sampler)
    seed: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the training order a function of ``(seed, epoch)`` only, so a resumed run replays it:
        ``DistributedSampler.set_epoch``, or re-seed the single-process shuffle generator with ``seed + epoch``
        (a generator that just advanced from epoch to epoch would restart at epoch 0's order after a resume)."""
        if isinstance(self.train_sampler, DistributedSampler):
            self.train_sampler.set_epoch(epoch)
        elif self.generator is not None:
            self.generator.manual_seed(self.seed + epoch)


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank ``r`` of ``w`` reads indices ``r, r+w, …`` with no padding.

    ``DistributedSampler`` pads the last shard with repeated samples, which would bias top-1 by a few images;
    summing correct counts over these exact shards gives the true accuracy.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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
def build_loaders(backend: str, root: str | None, *, batch_size: int, workers: int, image_size: int | None,
                  need_train: bool, rank: int, world_size: int, num_classes: int | None = None,
                  synthetic_samples: int = 1024, max_bad_images: int = 100, pin_memory: bool = False,
                  seed: int = 0) -> Loaders:
    """Build train/val loaders for ``backend`` (``batch_size`` is per process, as upstream's ``-b``).

    ``image_size`` defaults to 224 (ImageNet, synthetic) or 32 (digits). Raises :class:`DataError` for user errors.
    """
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend.startswith("dali-"):
        from CLS import dali  # NVIDIA DALI is an optional extra: imported only when asked for
        return dali.build_loaders(backend, root, batch_size=batch_size, workers=workers, image_size=image_size,
                                  need_train=need_train, rank=rank, world_size=world_size, num_classes=num_classes,
                                  max_bad_images=max_bad_images, seed=seed)
    if backend == "pytorch":
        image_size = image_size or 224
        train, val, n_cls = _imagenet_datasets(root, image_size, need_train, max_bad_images)
        if num_classes is not None and num_classes != n_cls:
            raise DataError(f"--num-classes {num_classes} but {root}/val has {n_cls} class folders")
    elif backend == "synthetic":
        image_size = image_size or 224
        n_cls = num_classes or 1000
        train = SyntheticDataset(synthetic_samples, n_cls, image_size, seed=1) if need_train else None
        val = SyntheticDataset(max(synthetic_samples // 4, 1), n_cls, image_size, seed=2)
    elif backend == "digits":
        image_size = image_size or 32
        n_cls = 10
        if num_classes not in (None, 10):
            raise DataError(f"--num-classes {num_classes} does not match the digits dataset (10 classes)")
        train = DigitsDataset("train", image_size) if need_train else None
        val = DigitsDataset("val", image_size)
    else:
        raise DataError(f"unknown data backend {backend!r} (choose from {', '.join(BACKENDS)})")

    if len(val) == 0 or (train is not None and len(train) == 0):
        raise DataError(f"the {backend} dataset at {root} is empty")

    train_loader, train_sampler = None, None
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    if train is not None:
        if world_size > 1:
            train_sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                               drop_last=True)
        g = torch.Generator().manual_seed(seed)
        # drop_last keeps every micro-batch full, so gradient accumulation always averages the same number of images
        drop_last = len(train) // world_size >= batch_size
        train_loader = DataLoader(train, batch_size=batch_size, sampler=train_sampler,
                                  shuffle=train_sampler is None, drop_last=drop_last, generator=g, **common)
        if len(train_loader) == 0:
            raise DataError(f"the training set ({len(train)} images) is too small for {world_size} process(es)")
    val_loader = DataLoader(val, batch_size=batch_size, sampler=ShardSampler(len(val), rank, world_size), **common)
    return Loaders(train_loader, val_loader, n_cls, image_size, train_sampler,
                   generator=g if train is not None else None, seed=seed)

