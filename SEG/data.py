"""COCO2014 instance-segmentation data for Mask R-CNN: dataset, flip, aspect-ratio grouped batches.

Layout (upstream ``download_dataset.sh``): ``DATA/train2014/``, ``DATA/val2014/``,
``DATA/annotations/instances_{train,val}2014.json`` and, from ``coco_annotations_minival.tgz``,
``DATA/annotations/instances_{minival,valminusminival}2014.json``. Resizing to ``--min-size``/``--max-size`` is done
inside the model (torchvision ``GeneralizedRCNNTransform``), so samples keep their original resolution and
predictions come back in original pixel coordinates, ready for COCOeval.

Splits (``resolve_splits``): upstream trains on train2014 + valminusminival and evaluates on minival (5,000 images).
All of val2014 contains valminusminival, i.e. the released model's training images, so evaluating there is flagged.
COCO2017 has the same split under other names: train2017 = train2014 + valminusminival, val2017 = minival.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import ConcatDataset, Dataset, Sampler

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


SPLIT_CHOICES = ("auto", "minival", "val")
MINIVAL_ANN = "instances_minival2014.json"
VALMINUSMINIVAL_ANN = "instances_valminusminival2014.json"


@dataclass(frozen=True)
class SplitSource:
    """One annotated image set: a name (maskrcnn-benchmark's catalogue name), its image folder and annotation file."""

    name: str
    images: Path
    annotations: Path


@dataclass(frozen=True)
class SegSplits:
    """Training sets (concatenated), the evaluation set and the warnings to show (at start and in the metrics)."""

    train: tuple[SplitSource, ...]
    test: SplitSource
    warnings: tuple[str, ...] = ()


def overlap_warning(root: str | Path) -> str:
    """Why scoring on all of val2014 is not upstream's number, and what to put on disk instead."""
    return ("evaluating on all of val2014 (40,504 images), which contains the 35,504 valminusminival images the "
            "released CHEX Mask R-CNN was trained on: a released checkpoint is scored partly on its own training "
            "data and the AP is not comparable with upstream's minival (5,000 images). For upstream's split put "
            f"{MINIVAL_ANN} and {VALMINUSMINIVAL_ANN} (coco_annotations_minival.tgz, as upstream's "
            f"download_dataset.sh fetches) in {Path(root) / 'annotations'}, or use COCO2017 (--year 2017: "
            "train2017 = train2014 + valminusminival, val2017 = minival)")


def _source(root: Path, name: str, images: str, ann: str) -> SplitSource:
    source = SplitSource(name, root / images, root / "annotations" / ann)
    if not source.images.is_dir():
        raise DataError(f"image folder not found: {source.images} (expected the COCO layout under {root})")
    if not source.annotations.is_file():
        raise DataError(f"annotation file not found: {source.annotations}")
    return source


def resolve_splits(root: str | Path, year: str = "2014", split: str = "auto", need_train: bool = True) -> SegSplits:
    """Training and evaluation sets under ``root`` (``DataError`` naming what is missing).

    ``split``: "auto" = upstream's minival split when its annotation files exist, else all of val2014 (with
    ``overlap_warning``); "minival" = upstream's split, required; "val" = train{year} / val{year}. COCO2017 (any
    ``year`` but 2014) is train2017 / val2017, which already is upstream's split. ``need_train=False`` (evaluation
    only): no training set is looked for or returned.
    """
    if split not in SPLIT_CHOICES:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLIT_CHOICES}")
    root, year = Path(root), str(year)
    train = (_source(root, f"coco_{year}_train", f"train{year}", f"instances_train{year}.json"),) if need_train \
        else ()
    if year != "2014":
        return SegSplits(train, _source(root, f"coco_{year}_val", f"val{year}", f"instances_val{year}.json"))
    minival = root / "annotations" / MINIVAL_ANN
    if split == "val" or (split == "auto" and not minival.is_file()):
        val = _source(root, "coco_2014_val", "val2014", "instances_val2014.json")
        return SegSplits(train, val, (overlap_warning(root),))
    if not minival.is_file():
        raise DataError(f"upstream's evaluation split needs {minival} (from coco_annotations_minival.tgz)")
    test = _source(root, "coco_2014_minival", "val2014", MINIVAL_ANN)
    if not need_train:
        return SegSplits((), test)
    if not (root / "annotations" / VALMINUSMINIVAL_ANN).is_file():
        note = (f"training on train2014 only: {root / 'annotations' / VALMINUSMINIVAL_ANN} not found, so the "
                "35,504 valminusminival images upstream also trains on are left out")
        return SegSplits(train, test, (note,))
    extra = _source(root, "coco_2014_valminusminival", "val2014", VALMINUSMINIVAL_ANN)
    return SegSplits((*train, extra), test)


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

    ``box_convention`` "torchvision": x2 = x + w, clamped to [0, W]; "upstream" (maskrcnn-benchmark, for a model in
    its conventions): inclusive boxes x2 = x + w - 1, clamped to [0, W - 1], boxes left empty dropped, and a
    horizontal flip maps x to W - 1 - x.
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, train: bool, flip_prob: float = 0.5,
                 box_convention: str = "torchvision"):
        if box_convention not in ("torchvision", "upstream"):
            raise ValueError(f"unknown box convention {box_convention!r}")
        self.box_convention = box_convention
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
        if self.box_convention == "upstream":  # BoxList(xywh).convert("xyxy").clip_to_image(remove_empty=True)
            boxes[:, 2:] = boxes[:, :2] + (boxes[:, 2:] - 1).clamp(min=0)
            boxes[:, 0::2].clamp_(0, width - 1)
            boxes[:, 1::2].clamp_(0, height - 1)
            keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
            anns, boxes = [a for a, k in zip(anns, keep) if k], boxes[torch.tensor(keep, dtype=torch.bool)]
        else:
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
            image, target = hflip(image, target, self.box_convention)
        return image, target


class ConcatInstances(ConcatDataset):
    """Several ``CocoInstances`` as one training set (upstream: train2014 + valminusminival). They must share the
    category list, so labels mean the same in all of them."""

    def __init__(self, datasets: Sequence[CocoInstances]):
        super().__init__(datasets)
        first = datasets[0]
        for other in datasets[1:]:
            if other.cat_to_label != first.cat_to_label:
                raise DataError(f"{first.image_dir} and {other.image_dir} annotation files list different categories")
        self.cat_to_label, self.label_to_cat = first.cat_to_label, first.label_to_cat

    @property
    def num_classes(self) -> int:
        return self.datasets[0].num_classes

    def aspect_ratio(self, index: int) -> float:
        part = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[part - 1] if part else 0
        return self.datasets[part].aspect_ratio(index - start)


def build_instances(sources: Sequence[SplitSource], train: bool,
                    box_convention: str = "torchvision") -> CocoInstances | ConcatInstances:
    """The dataset of one or more ``SplitSource`` (a ``ConcatInstances`` when there are several)."""
    parts = [CocoInstances(s.images, s.annotations, train=train, box_convention=box_convention) for s in sources]
    return parts[0] if len(parts) == 1 else ConcatInstances(parts)


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


def hflip(image: torch.Tensor, target: dict, box_convention: str = "torchvision") -> tuple[torch.Tensor, dict]:
    """Horizontal flip of a (3, H, W) image with its xyxy boxes and (N, H, W) masks (inclusive "upstream" boxes
    map x to W - 1 - x, as maskrcnn-benchmark's ``BoxList.transpose``)."""
    width = image.shape[-1] - (1 if box_convention == "upstream" else 0)
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
