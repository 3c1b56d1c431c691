"""The DALI backends of CLS (``--data-backend dali-cpu`` / ``dali-gpu``, ``CLS/dali.py``).

The order and sharding logic is tested without DALI; the pipelines themselves run on CPU when the optional
``nvidia-dali`` extra is installed (``dali-cpu`` needs no GPU) and are skipped, with the reason, when it is not.
``dali-gpu`` needs a GPU: without one it must fail with one clear line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from CLS import dali as cls_dali
from chex_tasks.harness.data import ShardSampler
from CLS import data as cls_data

REPO = Path(__file__).resolve().parents[1]
NO_DALI = cls_dali.dali_unavailable_reason("dali-cpu")
needs_dali = pytest.mark.skipif(NO_DALI is not None, reason=f"DALI cannot run here: {NO_DALI}")


@pytest.mark.parametrize("n, world", [(10, 1), (11, 2), (13, 3), (7, 2)])
def test_train_order_is_distributed_samplers_and_depends_on_seed_and_epoch_only(n, world):
    for epoch in (0, 1, 5):
        shards = []
        for rank in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3, drop_last=True)
            ref.set_epoch(epoch)
            got = cls_dali.train_indices(n, epoch, 3, rank, world)
            assert got == list(ref)
            assert got == cls_dali.train_indices(n, epoch, 3, rank, world)     # replayable
            shards.append(set(got))
        assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])    # disjoint shards
        assert len({len(s) for s in shards}) == 1                                      # equal sizes
    assert cls_dali.train_indices(n, 0, 3, 0, world) != cls_dali.train_indices(n, 1, 3, 0, world)


def test_val_shards_cover_every_image_once_without_padding():
    shards = [cls_dali.val_indices(11, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert shards[0] == list(ShardSampler(11, 0, 3))


def test_backends_are_selectable():
    assert {"dali-cpu", "dali-gpu"} <= set(cls_data.BACKENDS)
    assert "dali-cpu" not in cls_data.BACKEND_ALIASES          # no silent fallback to the pytorch loader


def test_missing_dali_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)     # makes `from nvidia.dali import ...` fail
    with pytest.raises(cls_data.DataError, match=r"needs NVIDIA DALI: pip install"):
        cls_data.build_loaders("dali-cpu", str(tmp_path), batch_size=2, workers=1, image_size=32, need_train=True,
                               rank=0, world_size=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_dali_gpu_without_a_gpu_fails_clearly_through_the_cli(tmp_path, capsys):
    from CLS import main as cls_main

    _folder(tmp_path, classes=2, train=1, val=1)
    with pytest.raises(SystemExit) as e:
        cls_main.main([str(tmp_path), "--data-backend", "dali-gpu", "--arch", "resnet18", "--epochs", "1", "-b", "2",
                       "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "dali-gpu needs a CUDA GPU" in err.strip().splitlines()[-1]
    assert not (tmp_path / "ws" / "compact.pth").exists()


# --------------------------------------------------------------------------------------------------- with DALI
def _folder(root: Path, classes: int, train: int, val: int, size=(96, 72), noise: bool = False) -> Path:
    """Smooth, distinct images (channel gradients + a class-dependent block): pixel comparisons stay meaningful."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size[1], size[0]
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([xx / w * 255, yy / h * 255, np.full((h, w), 40.0 + 20 * c)], -1)
                img[h // 4: h // 2, (c * 7) % (w // 2): (c * 7) % (w // 2) + w // 3] = rng.integers(0, 255, 3)
                if noise:
                    img += rng.normal(0, 3, img.shape)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.JPEG", quality=95)
    return root


def _loaders(backend, root, **kw):
    args = dict(batch_size=4, workers=1, image_size=32, need_train=True, rank=0, world_size=1, seed=5)
    args.update(kw)
    return cls_data.build_loaders(backend, str(root), **args)


@needs_dali
def test_val_pipeline_matches_the_pytorch_transform(tmp_path):
    root = _folder(tmp_path, classes=3, train=1, val=2)
    a = _loaders("pytorch", root, batch_size=6, workers=0, need_train=False)
    b = _loaders("dali-cpu", root, batch_size=6, need_train=False)
    (xa, ya), = list(a.val)
    (xb, yb), = list(b.val)
    assert xb.dtype == torch.float32 and xb.shape == xa.shape == (6, 3, 32, 32) and torch.equal(ya, yb)

    def err(p, q):
        return float((p - q).abs().mean())
    # resize, centre crop, RGB order and normalisation as torchvision's; DALI rounds an odd crop margin up where
    # torchvision rounds to even, so allow a one-pixel shift of the crop
    best = min(err(xa[..., i:32 - j, k:32 - m], xb[..., j:32 - i, m:32 - k])
               for i in (0, 1) for j in (0, 1) for k in (0, 1) for m in (0, 1) if i * j == 0 and k * m == 0)
    assert best < 0.05, best
    assert err(xa, xb.flip(-1)) > 0.3 and err(xa, xb[:, [2, 1, 0]]) > 0.3       # the comparison has teeth


@needs_dali
def test_train_pipeline_crops_flips_normalises_and_replays_an_epoch(tmp_path):
    root = _folder(tmp_path, classes=8, train=1, val=1)       # one image per class: the label names the file
    loaders = _loaders("dali-cpu", root)
    train = loaders.train
    assert len(train) == 2

    def epoch(e):
        train.set_epoch(e)
        xs, ys = zip(*list(train))
        return torch.cat(xs), torch.cat(ys)

    x1, y1 = epoch(1)
    assert x1.shape == (8, 3, 32, 32)
    assert y1.tolist() == cls_dali.train_indices(8, 1, 5, 0, 1)      # the files in DistributedSampler's order
    lo = (0 - 255 * np.array(cls_data.IMAGENET_MEAN)) / (255 * np.array(cls_data.IMAGENET_STD))
    hi = (255 - 255 * np.array(cls_data.IMAGENET_MEAN)) / (255 * np.array(cls_data.IMAGENET_STD))
    per_channel = x1.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= torch.tensor(lo) - 1e-4).all()
    assert (per_channel.max(1).values <= torch.tensor(hi) + 1e-4).all()
    x1b, y1b = epoch(1)                                              # a resumed epoch: same order, same crops
    assert torch.equal(y1, y1b) and torch.equal(x1, x1b)
    x2, y2 = epoch(2)
    assert not torch.equal(y1, y2)
    # mid-epoch resume: a fresh loader given the state after batch 1 of epoch 1 yields exactly the rest of it
    train.set_epoch(1)
    it = iter(train)
    next(it)
    state = train.state_dict()
    assert state == {"epoch": 1, "served": 1}
    fresh = _loaders("dali-cpu", root).train
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert len(rest) == 1 and torch.equal(rest[0][0], x1[4:]) and torch.equal(rest[0][1], y1[4:])
    # red grows left → right in every source image: a flipped crop has it falling instead
    slope = x1[:, 0, :, -4:].mean((1, 2)) - x1[:, 0, :, :4].mean((1, 2))
    flips = torch.cat([slope, x2[:, 0, :, -4:].mean((1, 2)) - x2[:, 0, :, :4].mean((1, 2))])
    assert (flips > 0).any() and (flips < 0).any()


@needs_dali
def test_two_ranks_read_disjoint_equal_shards(tmp_path):
    root = _folder(tmp_path, classes=9, train=1, val=1)
    seen = []
    for rank in range(2):
        ld = _loaders("dali-cpu", root, batch_size=2, rank=rank, world_size=2)
        ld.train.set_epoch(3)
        seen.append(torch.cat([y for _, y in ld.train]).tolist())
        assert seen[-1] == cls_dali.train_indices(9, 3, 5, rank, 2)
        assert sorted(torch.cat([y for _, y in ld.val]).tolist()) == cls_dali.val_indices(9, rank, 2)
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 4


@needs_dali
def test_cls_trains_and_evaluates_with_dali_cpu(tmp_path, capsys):
    from CLS import main as cls_main

    root = _folder(tmp_path, classes=2, train=4, val=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cls_main.main([str(root), "--data-backend", "dali-cpu", "--arch", "resnet18", "--cifar-stem",
                            "--image-size", "32", "--epochs", "1", "-b", "4", "-j", "1", "--lr", "0.05",
                            "--warmup", "0", "--seed", "0", "--no-progress", "--no-tensorboard", "-p", "0",
                            "--keep-checkpoints", "1", "--workspace", str(tmp_path / "ws")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0 and (tmp_path / "ws" / "compact.pth").exists()
    assert "dali-cpu: 8 train / 4 val images" in capsys.readouterr().out     # CLS logs to stdout


@needs_dali
def test_empty_files_are_skipped_and_bounded(tmp_path):
    root = _folder(tmp_path, classes=2, train=2, val=1)
    (root / "train" / "c00" / "empty.JPEG").write_bytes(b"")
    ld = _loaders("dali-cpu", root, max_bad_images=1)
    assert len(ld.train.samples) == 4
    with pytest.raises(cls_data.DataError, match="empty image files"):
        _loaders("dali-cpu", root, max_bad_images=0)


def test_input_pipeline_benchmark_quick(tmp_path):
    from benchmarks import input_pipeline

    out = input_pipeline.main(["--quick", "--data", str(tmp_path / "jpegs"), "--out", str(tmp_path)])
    rows = {(r["backend"], r["split"]): r for r in out["rows"]}
    want = {"pytorch"} | ({"dali-cpu"} if NO_DALI is None else set())
    assert {b for b, _ in rows} == want and {s for _, s in rows} == {"train", "val"}
    for (b, s), r in rows.items():
        assert r["images_per_epoch"] == (8 if s == "train" else 2) and r["images_per_cpu_s"] > 0
    assert rows[("pytorch", "train")]["per_cpu_s_vs_pytorch"] == 1.0
    assert (tmp_path / "input_pipeline_cpu_quick.md").exists()
