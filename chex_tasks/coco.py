"""COCO helpers shared by DET and SEG: a tiny COCO-format dataset generator and COCOeval glue.

* :func:`make_tiny_coco` writes a small synthetic dataset in the *real* COCO directory layout
  (``train{year}/``, ``val{year}/``, ``annotations/instances_{train,val}{year}.json``) so that the
  full data/evaluation pipeline of both tasks runs on CPU without any download.
* :func:`coco_evaluate` wraps ``pycocotools.cocoeval.COCOeval`` and returns the six numbers of the
  upstream results tables (AP, AP50, AP75, APs, APm, APl), never crashing on empty predictions.
* :func:`format_metrics` renders those numbers as one log line.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import pathlib
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["TINY_CATEGORIES", "METRIC_NAMES", "make_tiny_coco", "subset_annotations", "load_coco", "coco_evaluate", "format_metrics"]

logger = logging.getLogger(__name__)

#: Category ids are deliberately non-contiguous (like COCO's 1..90 with gaps) so that the
#: category-id <-> contiguous-label mapping of the task code is exercised.
TINY_CATEGORIES = (
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "circle", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
)

#: Names of the metrics, in the order of the upstream results tables and of COCOeval.stats[:6].
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# Well separated, saturated colours per category make the tiny set learnable in a few hundred steps.
_CATEGORY_COLOURS = {1: (230, 40, 40), 3: (40, 200, 40), 7: (40, 60, 230)}
_MIN_INSTANCE_PIXELS = 20


def _file_name(year: str, split: str, image_id: int) -> str:
    """COCO file naming: ``COCO_train2014_000000000001.jpg`` for 2014, ``000000000001.jpg`` for 2017."""
    if str(year) == "2014":
        return f"COCO_{split}{year}_{image_id:012d}.jpg"
    return f"{image_id:012d}.jpg"


def _draw_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Binary mask ``(size, size)`` uint8 of one filled shape of random position and scale."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    side = int(rng.integers(size // 6, size // 2))
    x0 = int(rng.integers(0, size - side))
    y0 = int(rng.integers(0, size - side))
    if kind == "square":
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=1)
    elif kind == "circle":
        draw.ellipse([x0, y0, x0 + side - 1, y0 + side - 1], fill=1)
    else:  # triangle
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def _make_image(size: int, n_shapes: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One noisy RGB image ``(size, size, 3)`` uint8 and its visible instances ``[(category_id, mask)]``.

    Shapes drawn later are occluded by earlier ones (``mask &= ~occupied``), so the stored masks are
    exactly the visible pixels and ``bbox``/``area`` derived from them match the image.
    """
    background = rng.integers(60, 180, size=3)
    img = np.clip(background + rng.normal(0, 25, size=(size, size, 3)), 0, 255)
    occupied = np.zeros((size, size), dtype=bool)
    instances: list[tuple[int, np.ndarray]] = []
    names = {c["id"]: c["name"] for c in TINY_CATEGORIES}
    for _ in range(n_shapes):
        cat_id = int(rng.choice([c["id"] for c in TINY_CATEGORIES]))
        m = _draw_shape(names[cat_id], size, rng).astype(bool) & ~occupied
        if m.sum() < _MIN_INSTANCE_PIXELS:
            continue
        colour = np.asarray(_CATEGORY_COLOURS[cat_id]) + rng.normal(0, 10, size=3)
        img[m] = np.clip(colour + rng.normal(0, 8, size=(int(m.sum()), 3)), 0, 255)
        occupied |= m
        instances.append((cat_id, m.astype(np.uint8)))
    return img.astype(np.uint8), instances


def _annotation(ann_id: int, image_id: int, cat_id: int, m: np.ndarray, iscrowd: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    area = float(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "segmentation": rle,
            "area": area, "bbox": bbox, "iscrowd": iscrowd}


def _write_split(root: pathlib.Path, year: str, split: str, n_images: int, image_size: int,
                 rng: np.random.Generator, first_ann_id: int, empty_image: bool, crowd: bool) -> int:
    """Write ``root/{split}{year}/*.jpg`` and ``root/annotations/instances_{split}{year}.json``.

    Returns the next free annotation id (ids are unique across splits, as in COCO).
    """
    img_dir = root / f"{split}{year}"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    crowd_done = not crowd
    for i in range(n_images):
        image_id = i + 1
        # The last image of a split may be an empty scene (no annotations), as COCO has ~1% of those.
        is_empty = empty_image and i == n_images - 1
        img, instances = _make_image(image_size, 0 if is_empty else int(rng.integers(1, 5)), rng)
        name = _file_name(year, split, image_id)
        # quality=95: JPEG artefacts stay small so mask-accurate evaluation of ground truth is unaffected.
        Image.fromarray(img).save(img_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
        # One crowd instance per split (the last object of the first image holding >= 2 objects, so that
        # image still has a normal instance) exercises iscrowd handling in training and COCOeval.
        mark_crowd = not crowd_done and len(instances) >= 2
        for k, (cat_id, m) in enumerate(instances):
            is_crowd = int(mark_crowd and k == len(instances) - 1)
            annotations.append(_annotation(ann_id, image_id, cat_id, m, is_crowd))
            ann_id += 1
        crowd_done = crowd_done or mark_crowd
    data = {
        "info": {"description": "CHEX tiny synthetic COCO", "version": "1.0", "year": int(year)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in TINY_CATEGORIES],
    }
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{split}{year}.json").write_text(json.dumps(data))
    return ann_id


def make_tiny_coco(root, year: str = "2017", n_train: int = 16, n_val: int = 8, image_size: int = 128,
                   seed: int = 0) -> pathlib.Path:
    """Write a tiny synthetic dataset in the real COCO layout and return ``root`` as a Path.

    Layout: ``root/train{year}/*.jpg``, ``root/val{year}/*.jpg`` and
    ``root/annotations/instances_{train,val}{year}.json``. Images are ``image_size``² RGB JPEGs with a
    noisy background and 1–4 filled, colour-coded shapes (square id 1, circle id 3, triangle id 7).
    Each instance has an RLE mask (so ``COCO.annToMask`` works) with ``bbox``/``area`` computed from it.
    The last training image has no annotations; the first image of each split with ≥ 2 objects holds
    one ``iscrowd=1`` instance. Deterministic given ``seed``.
    """
    year = str(year)
    if n_train < 2 or n_val < 1:
        raise ValueError(f"make_tiny_coco needs n_train >= 2 and n_val >= 1, got {n_train}, {n_val}")
    if image_size < 32:
        raise ValueError(f"make_tiny_coco needs image_size >= 32, got {image_size}")
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    next_id = _write_split(root, year, "train", n_train, image_size, rng, 1, empty_image=True, crowd=True)
    _write_split(root, year, "val", n_val, image_size, rng, next_id, empty_image=False, crowd=True)
    return root


def subset_annotations(src, dst, image_ids) -> None:
    """Write to ``dst`` the COCO annotation file ``src`` restricted to ``image_ids`` (images and their annotations),
    e.g. a minival-style split of a generated set."""
    data = json.loads(pathlib.Path(src).read_text())
    ids = set(image_ids)
    data["images"] = [i for i in data["images"] if i["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    pathlib.Path(dst).write_text(json.dumps(data))


def load_coco(annotation_file) -> COCO:
    """Load a COCO annotation JSON quietly; ``FileNotFoundError``/``ValueError`` naming the file on bad input."""
    path = pathlib.Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return COCO(str(path))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as exc:
            raise ValueError(f"not a valid COCO annotation file: {path} ({type(exc).__name__}: {exc})") from exc


def _zero_metrics() -> dict[str, float]:
    return {name: 0.0 for name in METRIC_NAMES}


def coco_evaluate(coco_gt: COCO, results: Sequence[dict], iou_type: str = "bbox",
                  image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """COCO AP metrics of ``results`` against ``coco_gt``.

    Args:
        coco_gt: ground truth (``pycocotools.coco.COCO``).
        results: COCO result dicts: ``image_id``, ``category_id`` (the *COCO* id, not a contiguous
            label), ``score`` and ``bbox`` ``[x, y, w, h]`` in pixels (``iou_type="bbox"``) or
            ``segmentation`` as RLE (``iou_type="segm"``).
        iou_type: ``"bbox"`` or ``"segm"``.
        image_ids: restrict evaluation to these images (default: every image of ``coco_gt``; images
            without predictions then count as misses).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in [0, 1]. COCOeval reports -1 for an area
        range with no ground truth; that is mapped to 0.0 so that callers can always format numbers.
        Empty ``results`` give all zeros and a warning (``COCO.loadRes([])`` would raise).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    results = list(results)
    if not results:
        logger.warning("coco_evaluate(%s): no predictions; reporting 0.0 for every metric", iou_type)
        return _zero_metrics()
    # loadRes mutates the result dicts (adds area/id, and for bbox a polygon segmentation): work on copies
    # so the same list can be evaluated twice with identical output.
    results = copy.deepcopy(results)
    # pycocotools prints progress to stdout; keep logs clean and route it to debug level instead.
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("COCOeval output:\n%s", buffer.getvalue())
    stats = evaluator.stats[: len(METRIC_NAMES)]
    return {name: (float(v) if v >= 0 and math.isfinite(v) else 0.0) for name, v in zip(METRIC_NAMES, stats)}


def format_metrics(metrics: dict[str, float]) -> str:
    """One line for logs, e.g. ``AP 25.90 | AP50 43.00 | ...`` (percent, like the upstream tables)."""
    return " | ".join(f"{name} {100.0 * metrics.get(name, 0.0):.2f}" for name in METRIC_NAMES)
