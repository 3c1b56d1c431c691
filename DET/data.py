"""COCO2017 detection data for SSD300: dataset, SSD augmentation, loaders.

Layout (as downloaded from cocodataset.org): ``DATA/train2017/*.jpg``, ``DATA/val2017/*.jpg``,
``DATA/annotations/instances_{train,val}2017.json``. ``chex_tasks.coco.make_tiny_coco`` writes the same
layout for CPU tests.

Training samples are ``(image (3,300,300) float, offsets (8732,4), labels (8732,) int64)``, already
matched and encoded by ``BoxCoder`` in the loader workers (as NVIDIA's SSD does), so the training step
only runs the network. Validation samples are ``(image, image_id, (height, width))``.

Which images and boxes are used follows NVIDIA's SSD (the code the CHEX DET numbers come from):
* evaluation: ``src/utils.py: COCODetection`` drops images without any annotation (crowd ones count), so COCOeval
  never sees detections on the 48 empty val2017 images;
* training: the DALI ``COCOReader`` (``src/coco_pipeline.py``: ``skip_empty=True``, default ``size_threshold`` 0.1,
  crowd boxes included) trains on crowd boxes like any other object, skips boxes narrower or lower than 0.1 px
  and images left without boxes. ``crowd_as_objects=False`` drops crowd boxes instead (torchvision's choice).
"""

from __future__ import annotations

import logging
import math
import pathlib
import random
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from chex_tasks.coco import load_coco
from chex_tasks.harness.data import DataError, TrainLoader, make_eval_loader, make_train_loader
from DET.box_coder import BoxCoder

__all__ = ["DataError", "CocoDetection", "SSDTrainTransform", "SSDEvalTransform", "build_loaders", "Loaders",
           "dataset_paths"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSD_SIZE = 300


def dataset_paths(data_dir, split: str, year: str = "2017") -> tuple[pathlib.Path, pathlib.Path]:
    """``(image_dir, annotation_file)`` of a COCO split under ``data_dir``."""
    data_dir = pathlib.Path(data_dir)
    return data_dir / f"{split}{year}", data_dir / "annotations" / f"instances_{split}{year}.json"


class CocoDetection(Dataset):
    """COCO detection set with category id ↔ contiguous label mapping.

    Args:
        image_dir: folder holding the images named in the annotation file.
        ann_file: ``instances_*.json``.
        transform: callable ``(PIL image, boxes (G,4) normalised ltrb, labels (G,)) -> sample``.
        train: keep only images with at least one training box (see the module docstring); otherwise keep
            every image that has an annotation.
        crowd_as_objects: crowd boxes are training targets (NVIDIA's DALI reader) or are dropped.

    Attributes:
        label_map: COCO category id → contiguous label in 1..K (0 is background), ordered by id.
        label_info: contiguous label → category name.
    """

    def __init__(self, image_dir, ann_file, transform, train: bool, crowd_as_objects: bool = True):
        self.image_dir = pathlib.Path(image_dir)
        try:
            self.coco = load_coco(ann_file)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(str(exc)) from exc
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        self.transform = transform
        self.train = train
        self.crowd_as_objects = crowd_as_objects
        cat_ids = sorted(self.coco.getCatIds())
        self.label_map = {cat_id: i + 1 for i, cat_id in enumerate(cat_ids)}
        self.label_info = {i + 1: self.coco.cats[c]["name"] for i, c in enumerate(cat_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if self._training_anns(i)]
        else:
            ids = [i for i in ids if self.coco.imgToAnns.get(i)]
        self.ids = ids
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise DataError(f"{len(missing)} images listed in {ann_file} are missing from {self.image_dir}, "
                            f"e.g. {missing[0]}")
        if not self.ids:
            raise DataError(f"no usable images in {ann_file}")

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc

    def _training_anns(self, image_id: int) -> list[dict]:
        """Annotations that become training boxes: w and h >= 0.1 px (DALI's ``size_threshold``), crowd ones
        only with ``crowd_as_objects``."""
        return [a for a in self.coco.imgToAnns.get(image_id, [])
                if a["bbox"][2] >= 0.1 and a["bbox"][3] >= 0.1 and (self.crowd_as_objects or not a.get("iscrowd"))]

    def targets(self, image_id: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training boxes ``(G, 4)`` normalised ltrb (clamped to [0, 1], which leaves COCO's in-image boxes
        unchanged) and contiguous labels ``(G,)`` of one image."""
        boxes, labels = [], []
        for ann in self._training_anns(image_id):
            x, y, w, h = ann["bbox"]
            boxes.append([x / width, y / height, (x + w) / width, (y + h) / height])
            labels.append(self.label_map[ann["category_id"]])
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).clamp_(0, 1),
                torch.tensor(labels, dtype=torch.long))

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        img = self.load_image(image_id)
        width, height = img.size
        boxes, labels = self.targets(image_id, width, height)
        return self.transform(img, boxes, labels, image_id)


def _normalise(img: Image.Image) -> torch.Tensor:
    t = TF.to_image(img)
    t = TF.to_dtype(t, torch.float32, scale=True)
    return TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD)


class SSDTrainTransform:
    """SSD augmentation (NVIDIA ``SSDTransformer(val=False)``): IoU-constrained random crop, horizontal
    flip, resize to 300×300, colour jitter, ImageNet normalisation, then target encoding.

    Randomness comes from Python's ``random``, which the DataLoader seeds per worker and epoch.
    """

    # None = keep the whole image; otherwise (min IoU, max IoU) that every box must have with the crop
    CROP_MODES = (None, (0.1, None), (0.3, None), (0.5, None), (0.7, None), (0.9, None), (None, None))

    def __init__(self, coder: BoxCoder, size: int = SSD_SIZE):
        self.coder = coder
        self.size = size
        self.jitter = T.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05)

    def crop(self, img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor):
        """Random crop of 0.3–1 of each side, aspect 0.5–2, whose IoU with every box lies in the chosen
        range; boxes whose centre falls outside are dropped. One attempt per mode draw (as NVIDIA)."""
        while True:
            mode = random.choice(self.CROP_MODES)
            if mode is None:
                return img, boxes, labels
            min_iou = -math.inf if mode[0] is None else mode[0]
            w, h = random.uniform(0.3, 1.0), random.uniform(0.3, 1.0)
            if not 0.5 <= w / h <= 2:
                continue
            left, top = random.uniform(0, 1.0 - w), random.uniform(0, 1.0 - h)
            right, bottom = left + w, top + h
            crop = torch.tensor([[left, top, right, bottom]])
            if not (box_iou(boxes, crop) > min_iou).all():
                continue
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            inside = (cx > left) & (cx < right) & (cy > top) & (cy < bottom)
            if not inside.any():
                continue
            boxes = boxes[inside].clone()
            boxes[:, 0::2] = ((boxes[:, 0::2] - left) / w).clamp(0, 1)
            boxes[:, 1::2] = ((boxes[:, 1::2] - top) / h).clamp(0, 1)
            W, H = img.size
            img = img.crop((int(left * W), int(top * H), int(right * W), int(bottom * H)))
            return img, boxes, labels[inside]

    def __call__(self, img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, image_id: int):
        img, boxes, labels = self.crop(img, boxes, labels)
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
        img = self.jitter(img.resize((self.size, self.size), Image.BILINEAR))
        offsets, matched_labels = self.coder.encode_target(boxes, labels)
        return _normalise(img), offsets, matched_labels


class SSDEvalTransform:
    """Resize to 300×300 and normalise; keeps the image id and original ``(height, width)`` for COCO results."""

    def __init__(self, size: int = SSD_SIZE):
        self.size = size

    def __call__(self, img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, image_id: int):
        width, height = img.size
        img = img.resize((self.size, self.size), Image.BILINEAR)
        return _normalise(img), image_id, torch.tensor([height, width])


@dataclass
class Loaders:
    train: TrainLoader | None
    val: DataLoader
    train_set: CocoDetection | None
    val_set: CocoDetection


def build_loaders(data_dir, coder: BoxCoder, batch_size: int, eval_batch_size: int, num_workers: int,
                  rank: int, world_size: int, seed: int, with_train: bool = True) -> Loaders:
    """Train loader (the run harness's resumable loader, shuffled per epoch as a ``DistributedSampler`` even in one
    process; ``drop_last``: BatchNorm on the 1×1 map needs ≥ 2 images) and val loader (each rank evaluates a
    disjoint shard; see ``DET.evaluate``)."""
    val_dir, val_ann = dataset_paths(data_dir, "val")
    val_set = CocoDetection(val_dir, val_ann, SSDEvalTransform(), train=False)
    val = make_eval_loader(val_set, batch_size=eval_batch_size, workers=num_workers, rank=rank, world_size=world_size)
    train = train_set = None
    if with_train:
        train_dir, train_ann = dataset_paths(data_dir, "train")
        train_set = CocoDetection(train_dir, train_ann, SSDTrainTransform(coder), train=True)
        if train_set.label_map != val_set.label_map:
            raise DataError(f"train and val annotation files have different categories ({train_ann}, {val_ann})")
        if len(train_set) < batch_size * world_size:
            raise DataError(f"{len(train_set)} training images are fewer than one batch ({batch_size} per process)")
        train = make_train_loader(train_set, batch_size=batch_size, workers=num_workers, seed=seed, rank=rank,
                                  world_size=world_size, distributed_order=True)
    return Loaders(train, val, train_set, val_set)
