"""COCO2014 instance-segmentation data for Mask R-CNN: dataset, flip, aspect-ratio grouped batches.

Layout (upstream ``download_dataset.sh``): ``DATA/train2014/``, ``DATA/val2014/``,
``DATA/annotations/instances_{train,val}2014.json``. Resizing to ``--min-size``/``--max-size`` is done inside the
model (torchvision ``GeneralizedRCNNTransform``), so samples keep their original resolution and predictions come
back in original pixel coordinates, ready for COCOeval.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset, Sampler

from chex_tasks.coco import load_coco
from chex_tasks.harness.data import DataError  # noqa: F401  (re-exported: SEG.data.DataError)

logger = logging.getLogger(__name__)


def split_paths(root: str | Path, split: str, year: str = "2014") -> tuple[Path, Path]:
    """(image folder, annotation file) of ``split`` ("train" | "val"); ``DataError`` if either is missing."""
    root = Path(root)
    images, ann = root / f"{split}{year}", root / "annotations" / f"instances_{split}{year}.json"
    if not images.is_dir():
        raise DataError(f"image folder not found: {images} (expected the COCO{year} layout under {root})")
    if not ann.is_file():
        raise DataError(f"annotation file not found: {ann}")
    return images, ann


def _valid_box(ann: dict) -> bool:
    """Non-crowd instance whose box has positive width and height (torchvision references' filter)."""
    x, y, w, h = ann["bbox"]
    return not ann.get("iscrowd", 0) and w > 1 and h > 1


class CocoInstances(Dataset):
    """COCO instances: ``(image, target)`` with image (3, H, W) float in [0, 1] (RGB) and target

    ``boxes`` (N, 4) float xyxy pixels, ``labels`` (N,) int64 contiguous 1..K (0 is background), ``masks``
    (N, H, W) uint8, ``image_id`` int. For training, crowd instances and degenerate boxes are dropped and
    images left without instances are removed (they carry no loss in torchvision's Mask R-CNN); for evaluation
    every image is kept.
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, train: bool, flip_prob: float = 0.5):
        self.image_dir = Path(image_dir)
        try:
            self.coco = load_coco(annotation_file)
        except (FileNotFoundError, ValueError) as err:  # both name the file
            raise DataError(str(err)) from None
        self.train = train
        self.flip_prob = flip_prob if train else 0.0
        cat_ids = sorted(self.coco.getCatIds())
        # Contiguous labels in sorted COCO-id order, the mapping maskrcnn-benchmark uses (so released heads fit).
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        ids = sorted(self.coco.imgs)
        if train:
            kept = [i for i in ids if any(_valid_box(a) for a in self.coco.imgToAnns.get(i, []))]
            if len(kept) < len(ids):
                logger.info("training set: dropped %d of %d images without usable instances",
                            len(ids) - len(kept), len(ids))
            ids = kept
        if not ids:
            raise DataError(f"no usable images in {annotation_file}")
        self.ids = ids

    @property
    def num_classes(self) -> int:
        """Foreground classes + background."""
        return len(self.cat_to_label) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratio(self, index: int) -> float:
        info = self.coco.imgs[self.ids[index]]
        return float(info["width"]) / float(info["height"])

    def _load_image(self, image_id: int) -> torch.Tensor:
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"corrupt image file: {path} ({err})") from None
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def _target(self, image_id: int, height: int, width: int) -> dict:
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not self.train or _valid_box(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        for k, ann in enumerate(anns):
            masks[k] = _ann_to_mask(ann, height, width)
        return {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "image_id": int(image_id),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        target = self._target(image_id, image.shape[-2], image.shape[-1])
        if self.flip_prob and torch.rand(()) < self.flip_prob:
            image, target = hflip(image, target)
        return image, target


def _ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask from polygon, uncompressed RLE or RLE segmentation."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Horizontal flip of a (3, H, W) image with its xyxy boxes and (N, H, W) masks."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate(batch: Sequence) -> tuple:
    """Detection batches are lists: images differ in size until the model's transform batches them."""
    return tuple(zip(*batch))


def aspect_ratio_groups(ratios: Sequence[float], k: int) -> list[int]:
    """Group id per image from its aspect ratio, with 2k+1 log-spaced bins (torchvision references' scheme).

    ``k = 0`` puts everything into two groups, portrait (<1) and landscape (>=1), like maskrcnn-benchmark.
    """
    bins = [1.0] if k == 0 else (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist()
    return [bisect.bisect_right(bins, r) for r in ratios]


class GroupedInfiniteBatchSampler(Sampler[list[int]]):
    """Iteration-based, rank-sharded batches whose images share an aspect-ratio group.

    Each pass over the data is a seeded permutation (seed + pass index, identical on every rank) split into
    per-rank shards of equal length; indices are then batched within their group so padded batches waste little.
    Yields ``num_iterations`` batches of ``batch_size`` indices. The stream depends only on its arguments, so the
    harness's stateful loader resumes it by replaying the sampler to the checkpointed position
    (``chex_tasks.harness.data``): a resumed run sees the data it would have seen.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, num_iterations: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        per_rank = math.ceil(len(group_ids) / world_size)
        if per_rank < batch_size:
            # Otherwise no full batch could ever be formed and iteration would never yield.
            raise ValueError(f"batch size per process ({batch_size}) exceeds the images per process ({per_rank})")
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.num_iterations = num_iterations
        self.rank, self.world_size = rank, world_size
        self.seed = seed

    def _shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.group_ids), generator=g).tolist()
        per_rank = math.ceil(len(order) / self.world_size)
        order = (order * math.ceil(per_rank * self.world_size / len(order)))[: per_rank * self.world_size]
        return order[self.rank::self.world_size]

    def _all_batches(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            buffers: dict[int, list[int]] = defaultdict(list)
            leftovers: list[int] = []
            for idx in self._shard(epoch):
                buf = buffers[self.group_ids[idx]]
                buf.append(idx)
                if len(buf) == self.batch_size:
                    yield list(buf)
                    buf.clear()
            for buf in buffers.values():
                leftovers.extend(buf)
            # Mixed-group remainder, so small datasets still produce full batches every pass.
            for i in range(0, len(leftovers) - self.batch_size + 1, self.batch_size):
                yield leftovers[i:i + self.batch_size]
            epoch += 1

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self._all_batches(), self.num_iterations)

    def __len__(self) -> int:
        return max(0, self.num_iterations)
