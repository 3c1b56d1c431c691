"""The study's tasks, built from real images that ship inside installed packages (nothing is downloaded).

``digits``
    scikit-learn's ``load_digits``: 1797 real 8×8 handwritten digits, 10 classes, upsampled to ``res`` px, a fixed
    stratified train/validation split. Every method ties on it at 16 px (see README, *Results*): at these widths the
    task is too easy for FLOPs to limit accuracy.

``photo-patches`` (the study's default)
    Which photograph does a small grey-scale patch come from? 17 real photos — 15 of scikit-image's ``skimage.data``
    (astronaut, brick, camera, cell, chelsea, coffee, coins, grass, gravel, hubble_deep_field, immunohistochemistry,
    moon, motorcycle, retina, rocket) and scikit-learn's two ``load_sample_images`` (china, flower) — are converted to
    grey, resized so the shorter side is ``photo_side`` px (area averaging), and cut into ``res``×``res`` patches.
    Why it is harder than digits: colour and brightness are gone (grey, and every patch is standardised to zero mean
    and unit variance on its own), flat patches are rejected (local std below ``min_std``), so a patch can only be
    told apart by its texture and local structure, and several photos share textures (grass/gravel/brick, two
    portraits, fur, micrographs). Training patches are fresh random crops (plus horizontal flips) every epoch, so more
    epochs mean more data rather than more passes over a small set, and capacity — width — is what limits accuracy.

    No leakage: every photo is cut into a ``grid``×``grid`` array of cells; ``grid`` of them (one per row and one per
    column, a permutation fixed by ``split_seed``) are validation cells, the others training cells. A patch always lies
    entirely inside one cell, so no pixel of any validation patch is ever seen in training. The validation set is
    ``val_per_class`` patches per photo, drawn once (``split_seed``) and the same for every method and seed.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["Task", "load_task", "split_positions", "photos", "PHOTOS", "TASKS"]

TASKS = ("photo-patches", "digits")
# skimage.data function names (and the argument-free call that returns the image), then scikit-learn's two photos
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "stereo_motorcycle", "retina", "rocket",
          "sklearn:china.jpg", "sklearn:flower.jpg")

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class Task:
    """A classification task: a fixed validation set and, per training seed, a stream of training epochs.

    ``train_stream(seed, batch)`` returns a function; each call yields one epoch of ``(x, y)`` batches, drawn from a
    generator seeded once with ``seed`` (so the whole data order of a run is fixed by its seed).
    """
    name: str
    in_size: tuple[int, int, int]
    num_classes: int
    x_val: torch.Tensor
    y_val: torch.Tensor
    steps_per_epoch: int
    train_stream: Callable[[int, int], Batches]
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------ digits
def digits_task(res: int, val_frac: float, split_seed: int, batch: int) -> Task:
    """sklearn digits → standardised ``(N, 1, res, res)`` tensors, stratified split; epochs are permutations."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0          # (1797, 1, 8, 8) in [0, 1]
    if res != 8:
        x = nn.functional.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_tr, idx_va = train_test_split(np.arange(len(y)), test_size=val_frac, stratify=digits.target,
                                      random_state=split_seed)
    idx_tr, idx_va = torch.from_numpy(idx_tr), torch.from_numpy(idx_va)
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std
    x_tr, y_tr = x[idx_tr], y[idx_tr]

    def stream(seed: int, bs: int) -> Batches:
        gen = torch.Generator().manual_seed(seed)

        def epoch():
            perm = torch.randperm(len(y_tr), generator=gen)
            for i in range(0, len(y_tr), bs):
                b = perm[i:i + bs]
                yield x_tr[b], y_tr[b]
        return epoch

    return Task("digits", (1, res, res), 10, x[idx_va], y[idx_va], math.ceil(len(y_tr) / batch), stream,
                {"n_train": len(y_tr)})


# ----------------------------------------------------------------------------------------------------- photo-patches
def _load_photo(name: str) -> np.ndarray:
    """One shipped photo as float32 grey in [0, 1] (ITU-R 709 luma for colour images, as skimage.color.rgb2gray)."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(name.split(":", 1)[1])
    else:
        import skimage.data
        img = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":             # (left, right, disparity): the left view only
            img = img[0]
    img = np.asarray(img, dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 3:
        img = img[..., :3] @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    return img


def _resize_short_side(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return nn.functional.interpolate(t, size=size, mode="area")[0, 0].numpy()


def _local_std(img: np.ndarray, p: int) -> np.ndarray:
    """Standard deviation of every ``p``×``p`` window (indexed by its top-left corner), via integral images."""
    d = img.astype(np.float64)
    s1 = np.pad(d, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    s2 = np.pad(d * d, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def win(s):
        return s[p:, p:] - s[:-p, p:] - s[p:, :-p] + s[:-p, :-p]
    n = p * p
    var = win(s2) / n - (win(s1) / n) ** 2
    return np.sqrt(np.maximum(var, 0.0))


def cell_bounds(shape: tuple[int, int], grid: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the ``grid``×``grid`` cells, row-major (cell ``r·grid + c``)."""
    ys = np.linspace(0, shape[0], grid + 1).round().astype(int)
    xs = np.linspace(0, shape[1], grid + 1).round().astype(int)
    return [(ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(grid) for c in range(grid)]


def val_cells(grid: int, photo_index: int, split_seed: int) -> set[int]:
    """The validation cells of one photo: one per row and per column (a seeded permutation)."""
    perm = np.random.default_rng([split_seed, photo_index]).permutation(grid)
    return {r * grid + int(perm[r]) for r in range(grid)}


def patch_positions(img: np.ndarray, cells: list[tuple[int, int, int, int]], p: int,
                    min_std: float) -> np.ndarray:
    """Top-left corners ``(K, 2)`` of the ``p``×``p`` windows lying entirely inside one of ``cells`` whose local
    standard deviation is at least ``min_std``."""
    ok = _local_std(img, p) >= min_std                 # (H - p + 1, W - p + 1)
    out = []
    for y0, y1, x0, x1 in cells:
        if y1 - y0 < p or x1 - x0 < p:
            continue
        ys, xs = np.nonzero(ok[y0:y1 - p + 1, x0:x1 - p + 1])
        out.append(np.stack([ys + y0, xs + x0], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _crops(img: np.ndarray, pos: np.ndarray, p: int) -> np.ndarray:
    win = np.lib.stride_tricks.sliding_window_view(img, (p, p))
    return win[pos[:, 0], pos[:, 1]].astype(np.float32)             # (K, p, p) copy


def _standardise(patches: np.ndarray) -> torch.Tensor:
    """Per-patch zero mean / unit variance → ``(K, 1, p, p)``; removes each photo's brightness and contrast."""
    m = patches.mean(axis=(1, 2), keepdims=True)
    s = patches.std(axis=(1, 2), keepdims=True)
    return torch.from_numpy((patches - m) / (s + 1e-6)).unsqueeze(1)


@functools.lru_cache(maxsize=2)
def photos(side: int) -> tuple[np.ndarray, ...]:
    """The :data:`PHOTOS` as grey float32 arrays, shorter side ``side`` px (cached)."""
    return tuple(_resize_short_side(_load_photo(n), side) for n in PHOTOS)


def split_positions(img: np.ndarray, index: int, grid: int, p: int, min_std: float,
                    split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of the training and the validation ``p``×``p`` windows of photo number ``index``: windows
    inside its training cells, and inside its validation cells (:func:`val_cells`). No window straddles two cells,
    so the pixels the two sets can cover are disjoint."""
    cells = cell_bounds(img.shape, grid)
    vc = val_cells(grid, index, split_seed)
    train = patch_positions(img, [c for i, c in enumerate(cells) if i not in vc], p, min_std)
    val = patch_positions(img, [c for i, c in enumerate(cells) if i in vc], p, min_std)
    return train, val


def photo_patches_task(res: int, photo_side: int, grid: int, min_std: float, val_per_class: int,
                       train_per_epoch: int, split_seed: int, batch: int) -> Task:
    """The ``photo-patches`` task (module docstring): positions are fixed here, crops are drawn per epoch."""
    imgs = photos(photo_side)
    train_pos, x_val, y_val = [], [], []
    rng = np.random.default_rng(split_seed)
    for k, img in enumerate(imgs):
        tr, va = split_positions(img, k, grid, res, min_std, split_seed)
        if len(tr) == 0 or len(va) < val_per_class:
            raise ValueError(f"photo {PHOTOS[k]}: too few {res}-px patches with std >= {min_std} "
                             f"({len(tr)} train, {len(va)} val positions)")
        train_pos.append(tr)
        x_val.append(_crops(img, va[rng.choice(len(va), val_per_class, replace=False)], res))
        y_val.append(np.full(val_per_class, k))
    n_cls = len(imgs)

    def stream(seed: int, bs: int) -> Batches:
        g = np.random.default_rng([seed, 7919])      # data order of a run: its seed only

        def epoch():
            for i in range(0, train_per_epoch, bs):
                n = min(bs, train_per_epoch - i)
                y = g.integers(n_cls, size=n)
                crops = np.empty((n, res, res), dtype=np.float32)
                for c in np.unique(y):
                    sel = np.nonzero(y == c)[0]
                    pos = train_pos[c][g.integers(len(train_pos[c]), size=len(sel))]
                    crops[sel] = _crops(imgs[c], pos, res)
                flip = g.random(n) < 0.5
                crops[flip] = crops[flip][:, :, ::-1]
                yield _standardise(crops), torch.from_numpy(y).long()
        return epoch

    info = {"photos": list(PHOTOS), "train_positions": [len(t) for t in train_pos], "photo_side": photo_side,
            "train_per_epoch": train_per_epoch}
    return Task("photo-patches", (1, res, res), n_cls, _standardise(np.concatenate(x_val)),
                torch.from_numpy(np.concatenate(y_val)).long(), math.ceil(train_per_epoch / batch), stream, info)


@functools.lru_cache(maxsize=4)     # once per worker process: building a task costs about a second
def _load_task_cached(key: tuple) -> Task:
    cfg = dict(key)
    if cfg["task"] == "digits":
        return digits_task(cfg["res"], cfg["val_frac"], cfg["split_seed"], cfg["batch"])
    return photo_patches_task(cfg["res"], cfg["photo_side"], cfg["grid"], cfg["min_std"], cfg["val_per_class"],
                              cfg["train_per_epoch"], cfg["split_seed"], cfg["batch"])


TASK_KEYS = ("task", "res", "val_frac", "split_seed", "batch", "photo_side", "grid", "min_std", "val_per_class",
             "train_per_epoch")


def load_task(cfg: dict) -> Task:
    """The task a study configuration names (cached per process)."""
    return _load_task_cached(tuple((k, cfg.get(k)) for k in TASK_KEYS))
