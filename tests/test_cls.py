"""CLS end-to-end tests: the upstream training command on two gloo processes, the upstream evaluation command on a
released-format checkpoint, compact-file evaluation, resume, bad input, and the small helpers.

Everything runs on CPU with tiny generated data (a 4-class ImageFolder of 40×48 images, or 32-px synthetic tensors).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import zero_every_second_channel

REPO = Path(__file__).resolve().parent.parent
CLS_DIR = REPO / "CLS"
N_CLASSES = 4


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("CI", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def make_image_folder(root: Path, n_train: int = 8, n_val: int = 3) -> Path:
    """``root/{train,val}/classK/*.{png,jpg}``: per-class mean colour, so the classes are learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(N_CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((40, 48, 3)) * 60 + c * 50).astype(np.uint8)
                Image.fromarray(arr).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


def last_json(stdout: str) -> dict:
    """The JSON summary line ``--evaluate`` prints last."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1])


# The upstream README training command, verbatim except: the data path, --epochs 250 → 2, -b 128 → 4,
# --optimizer-batch-size 1024 → 16 (so 2 processes × 4 images accumulate 2 micro-batches), --lr scaled with the
# batch by the linear rule (1.024 × 16/1024; the full LR diverges on 16 images), --delta_T 2 → 1 and --T_max 180 → 2
# so exploration events happen (after epochs 0 and 1: the event of epoch T_max fires after the last step of epoch
# T_max - 1), and --image-size 32 to keep ResNet-50 cheap on CPU.
UPSTREAM_TRAIN = ("--data-backend pytorch --raport-file raport.json -j8 -p 100 --lr 0.016 --optimizer-batch-size 16 "
                  "--warmup 8 --arch resnet50 -c fanin --label-smoothing 0.1 --lr-schedule cosine --mom 0.875 "
                  "--wd 3.0517578125e-05 -b 4 --amp --static-loss-scale 128 --epochs 2 --mixup 0.2 --grow_prune "
                  "--delta_T 1 --T_max 2 --init_channel_ratio 0.3 --channel_sparsity 0.7 --image-size 32").split()


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory):
    """Run the upstream training command through CLS/multiproc.py with 2 gloo processes (once per module)."""
    tmp = tmp_path_factory.mktemp("cls_train")
    data = make_image_folder(tmp / "imagenet")
    cmd = [sys.executable, str(CLS_DIR / "multiproc.py"), "--nproc_per_node", "2", str(CLS_DIR / "main.py"),
           str(data), *UPSTREAM_TRAIN]
    proc = _run(cmd, cwd=tmp)  # default --workspace ./logs, relative to the working directory as upstream
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, data, proc


@pytest.mark.slow
def test_upstream_training_command_two_processes(upstream_run):
    tmp, _, proc = upstream_run
    logs = tmp / "logs"
    raport = json.loads((logs / "raport.json").read_text())
    assert [e["epoch"] for e in raport["epochs"]] == [0, 1]
    assert raport["args"]["optimizer_batch_size"] == 16 and raport["args"]["momentum"] == 0.875
    # events at the start of epochs 1 and 2 (= T_max) → density drops to 1 - S = 0.3, FLOPs far below dense
    assert raport["epochs"][0]["density"] > raport["epochs"][-1]["density"]
    assert abs(raport["epochs"][-1]["density"] - 0.3) < 0.02
    final = raport["final"]
    assert final["macs"] < 0.5 * final["dense_macs"]
    # no downsample masking: the compact model realises every zero (±1 MAC of float rounding in the zero fraction)
    assert final["compact_macs"] == pytest.approx(final["macs"], rel=1e-6)

    ckpt = torch.load(logs / "checkpoint_000004.pth", weights_only=True)  # named by optimizer steps
    assert {"epoch", "arch", "state_dict", "best_prec1", "optimizer", "explorer", "scheduler", "scaler", "args",
            "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet50"
    assert all(k.startswith("module.") for k in ckpt["state_dict"])  # DDP prefix, as upstream
    ex = ckpt["explorer"]
    assert ex["event_count"] == 2 and ex["last_event_step"] == 4  # 2 optimizer steps per epoch
    kept = sum(int(m.sum()) for m in ex["masks"].values())
    total = sum(m.numel() for m in ex["masks"].values())
    assert abs(kept / total - 0.3) < 0.02
    # masked channels are exactly zero in the saved weights (producer rows and BN gamma)
    name, mask = next(iter(ex["masks"].items()))
    w = ckpt["state_dict"][f"module.{name}.weight"]
    assert torch.count_nonzero(w[~mask]) == 0 and torch.count_nonzero(w[mask]) > 0
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert (logs / "args.json").is_file() and (logs / "compact.pth").is_file()
    assert any((logs / "tb").iterdir())


@pytest.mark.slow
def test_compact_file_evaluates_like_dense_checkpoint(upstream_run, capsys):
    tmp, data, _ = upstream_run
    results = {}
    torch.set_num_threads(1)
    for name in ("checkpoint_000004.pth", "compact.pth"):
        assert _main(["--data-backend", "pytorch", "--arch", "resnet50", "--evaluate", "--epochs", "1", "-b", "100",
                      str(data), "--pretrained-weights", str(tmp / "logs" / name), "-j", "0"]) == 0
        results[name] = last_json(capsys.readouterr().out)
    dense, small = results["checkpoint_000004.pth"], results["compact.pth"]
    assert dense["image_size"] == 32  # taken from the file
    assert small["top1"] == dense["top1"] and small["top5"] == dense["top5"]
    assert small["loss"] == pytest.approx(dense["loss"], rel=1e-4)  # same logits, not just the same argmax
    assert small["macs"] == pytest.approx(dense["macs"], rel=1e-6)
    assert small["macs"] == pytest.approx(dense["compact_macs"], rel=1e-6)
    assert small["compact_params"] == dense["compact_params"] < dense["dense_params"]


def _released_checkpoint(path: Path, arch: str = "resnet50", prefix: str = "module.") -> tuple[dict, torch.nn.Module]:
    """A file in the upstream released layout: dense tensors, half of every prunable group zeroed (conv rows,
    BN γ/β, consumer input columns), keys epoch/arch/state_dict/best_prec1/optimizer."""
    from CLS.model import build_model

    torch.manual_seed(0)
    model = build_model(arch, N_CLASSES, bn_gamma=0.5)
    zero_every_second_channel(model)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    ckpt = {"epoch": 250, "arch": (arch, "fanin", N_CLASSES, None), "state_dict": sd, "best_prec1": 77.4,
            "optimizer": {"state": {}, "param_groups": []}}
    torch.save(ckpt, path)
    return ckpt, model


@pytest.mark.slow
def test_upstream_evaluation_command_on_released_format(tmp_path):
    from chex_core import count_macs

    data = make_image_folder(tmp_path / "imagenet", n_train=1, n_val=1)
    _, model = _released_checkpoint(tmp_path / "ckpt.pth.tar")
    # upstream: python ./main.py --data-backend pytorch --arch resnet50 --evaluate --epochs 1 -b 100 /data/imagenet
    #           --pretrained-weights ckpt.pth.tar   (run from CLS/)
    proc = _run([sys.executable, "./main.py", "--data-backend", "pytorch", "--arch", "resnet50", "--evaluate",
                 "--epochs", "1", "-b", "100", str(data), "--pretrained-weights", str(tmp_path / "ckpt.pth.tar")],
                cwd=CLS_DIR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = last_json(proc.stdout)
    assert "top-1" in proc.stdout and "top-5" in proc.stdout
    assert rep["image_size"] == 224
    correct = rep["top1"] * N_CLASSES / 100            # one validation image per class: whole images only
    assert correct == pytest.approx(round(correct), abs=1e-6) and round(correct) <= N_CLASSES, rep["top1"]
    assert rep["dense_macs"] == pytest.approx(4.089e9, rel=0.01)  # ResNet-50 at 224: the paper's 4.1G
    assert rep["macs"] == count_macs(model, (3, 224, 224))
    assert rep["compact_macs"] == pytest.approx(rep["macs"], rel=1e-6)
    assert 30.0 < rep["macs_reduction_pct"] < 80.0
    assert rep["kept_channels"] * 2 == rep["prunable_channels"]
    assert not list(CLS_DIR.glob("logs")), "evaluation must not write anything"


def _main(argv: list[str]) -> int:
    from CLS import main as cls_main

    return cls_main.main(argv)


def test_resume_auto_continues_exploration(tmp_path):
    """Two invocations (--run-epochs 1, then --resume auto) end in the same state as the schedule requires."""
    ws = tmp_path / "ws"
    common = ["--data-backend", "synthetic", "--synthetic-samples", "32", "--num-classes", "4", "--image-size", "32",
              "--arch", "resnet18", "-b", "8", "-j", "0", "--epochs", "2", "--lr", "0.05", "--workspace", str(ws),
              "--grow_prune", "--delta_T", "1", "--T_max", "2", "--channel_sparsity", "0.5",
              "--init_channel_ratio", "0.25", "--seed", "1", "--no-tensorboard", "-p", "0", "--training-only",
              "--keep-checkpoints", "1"]
    torch.set_num_threads(1)
    assert _main(common + ["--run-epochs", "1"]) == 0
    first = torch.load(ws / "checkpoint_000004.pth", weights_only=True)
    assert not (ws / "model_best.pth").exists()  # --training-only: no validation metric, so no best copy
    assert first["explorer"]["event_count"] == 1 and not (ws / "compact.pth").exists()
    assert _main(common + ["--resume", "auto"]) == 0
    second = torch.load(ws / "checkpoint_000008.pth", weights_only=True)
    assert second["epoch"] == 2 and second["explorer"]["event_count"] == 2
    assert second["trainer"]["step_count"] == 8  # 4 steps per epoch, counted across the restart
    raport = json.loads((ws / "experiment_raport.json").read_text())
    assert [e["epoch"] for e in raport["epochs"]] == [0, 1]
    assert (ws / "compact.pth").is_file()


def test_residual_flag_reaches_a_budget_internal_groups_cannot_and_exports_it(tmp_path):
    """--chex-residual end to end: a --target-flops below what block-internal pruning can reach (ResNet-18 with
    every internal layer at one channel keeps 8.3 % of the MACs) is met, and compact.pth, rebuilt from its cfg,
    computes what the masked model computes."""
    from chex_core import count_macs
    from chex_tasks.export import read_compact
    from CLS import model as cls_model

    ws = tmp_path / "ws"
    argv = ["--data-backend", "synthetic", "--synthetic-samples", "16", "--num-classes", "4", "--image-size", "32",
            "--arch", "resnet18", "-b", "8", "-j", "0", "--epochs", "2", "--lr", "0.05", "--workspace", str(ws),
            "--grow_prune", "--delta_T", "1", "--T_max", "2", "--target-flops", "0.05", "--init_channel_ratio",
            "0.02", "--seed", "1", "--no-tensorboard", "-p", "0", "--training-only", "--chex-residual"]
    torch.set_num_threads(1)
    assert _main(argv) == 0
    masked = cls_model.build_model("resnet18", 4)
    last = max(ws.glob("checkpoint_*.pth"))                 # named by optimizer step: the end of training
    masked.load_state_dict(torch.load(last, weights_only=True)["state_dict"])
    compact = read_compact(torch.load(ws / "compact.pth", weights_only=True))
    assert {"layer1.residual", "layer4.residual"} <= set(compact.width_spec)
    small = cls_model.load_weights(cls_model.build_model("resnet18", 4), compact.state_dict, source="compact.pth",
                                   arch="resnet18", cfg=compact.width_spec)
    assert small.fc.in_features == compact.width_spec["layer4.residual"] < 512
    dense_macs = cls_model.dense_macs_of("resnet18", 4, False, 224)
    assert count_macs(small, (3, 224, 224), zero_aware=False) <= 0.05 * dense_macs
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(small.double().eval()(x), masked.double().eval()(x), rtol=0, atol=1e-10)


def test_digits_backend_is_real_and_fixed():
    from CLS.data import build_loaders

    a = build_loaders("digits", None, batch_size=64, workers=0, image_size=None, need_train=True, rank=0,
                      world_size=1)
    b = build_loaders("digits", None, batch_size=64, workers=0, image_size=16, need_train=False, rank=1,
                      world_size=2)
    assert a.num_classes == 10 and a.image_size == 32
    assert len(a.train.dataset) + len(a.val.dataset) == 1797
    x, y = next(iter(a.val))
    assert x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1])  # grayscale repeated to 3 channels
    assert list(b.val.sampler) == list(range(1, len(a.val.dataset), 2))  # rank 1 of 2: exact shard, no padding
    again = build_loaders("digits", None, batch_size=64, workers=0, image_size=None, need_train=False, rank=0,
                          world_size=1)
    assert torch.equal(again.val.dataset.labels, a.val.dataset.labels)  # the split is fixed


def test_unreadable_images_are_skipped_then_fatal(tmp_path, caplog):
    from CLS.data import DataError, build_loaders

    data = make_image_folder(tmp_path / "imagenet", n_train=2, n_val=2)
    bad = data / "val" / "class0" / "img0.jpg"
    bad.write_bytes(b"truncated")
    kw = dict(batch_size=8, workers=0, image_size=32, need_train=False, rank=0, world_size=1)
    images, labels = next(iter(build_loaders("pytorch", str(data), max_bad_images=1, **kw).val))
    assert images.shape == (8, 3, 32, 32)  # the bad file was replaced by the next readable one
    assert str(bad) in caplog.text
    with pytest.raises(DataError, match="more than 0 unreadable images"):
        next(iter(build_loaders("pytorch", str(data), max_bad_images=0, **kw).val))


def test_multiproc_adds_standalone_on_one_node():
    from CLS.multiproc import launcher_argv

    assert launcher_argv(["--nproc_per_node", "8", "./main.py", "/data"])[0] == "--standalone"
    multi = ["--nnodes", "2", "--node_rank", "0", "--rdzv_endpoint", "h:1", "--nproc_per_node", "8", "./main.py"]
    assert launcher_argv(multi) == multi
    # a script flag that looks like a launcher flag is not a launcher flag
    assert launcher_argv(["--nproc_per_node", "2", "main.py", "--master_port", "1"])[0] == "--standalone"


def test_progress_helpers(tmp_path):
    import argparse

    from chex_tasks.progress import TensorBoardWriter, progress, save_args

    items = [1, 2, 3]
    assert progress(items, is_main=False) is items  # other ranks: untouched
    assert progress(items, is_main=True, enabled=False) is items
    w = TensorBoardWriter(tmp_path / "tb", is_main=False)
    w.scalar("x", 1.0, 0)
    assert not w.active and not (tmp_path / "tb").exists()
    path = save_args(argparse.Namespace(a=1, p=Path("/x"), l=[1, 2]), tmp_path)
    assert json.loads(path.read_text()) == {"a": 1, "l": [1, 2], "p": "/x"}


# ------------------------------------------------------------------------------------------------ bad input
def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Warning" not in ln
           and not ln.startswith("  ")]
    assert len(err) == 1, err
    assert err[0].startswith("CLS/main.py: error: ")
    return err[0]


def _expect_exit2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        _main(argv)
    assert exc.value.code == 2
    return _one_error_line(capsys)


def test_bad_data_dirs(tmp_path, capsys):
    base = ["--arch", "resnet18", "-j", "0", "--workspace", str(tmp_path / "ws")]
    assert "does not exist" in _expect_exit2([str(tmp_path / "nope"), *base], capsys)
    (tmp_path / "empty").mkdir()
    assert "no 'train/' folder" in _expect_exit2([str(tmp_path / "empty"), *base], capsys)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    (flat / "train" / "a.jpg").write_bytes(b"x")
    assert "no class sub-folders" in _expect_exit2([str(flat), *base], capsys)
    assert "positional DIR" in _expect_exit2(base, capsys)
    noimg = tmp_path / "noimg"
    for split in ("train", "val"):
        (noimg / split / "c0").mkdir(parents=True)
    line = _expect_exit2([str(noimg), *base, "--evaluate"], capsys)
    assert "noimg" in line
    assert not (tmp_path / "ws").exists()


def test_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _main(["--data-backend", "digits", "--arch", "resnet999"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    line = _expect_exit2(["--data-backend", "digits", "-b", "7", "--optimizer-batch-size", "20", "--workspace",
                          str(tmp_path)], capsys)
    assert "--optimizer-batch-size" in line
    assert "--channel_sparsity" in _expect_exit2(["--data-backend", "digits", "--channel_sparsity", "1.5"], capsys)


def test_bad_checkpoints(tmp_path, capsys):
    from CLS.model import build_model

    ev = ["--data-backend", "synthetic", "--synthetic-samples", "8", "--num-classes", "4", "--image-size", "32",
          "--evaluate", "-j", "0", "--arch", "resnet50"]
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in _expect_exit2([*ev, "--pretrained-weights", str(garbage)], capsys)
    assert "file not found" in _expect_exit2([*ev, "--pretrained-weights", str(tmp_path / "none.pth")], capsys)
    # a plain resnet18 state dict given to --arch resnet50
    torch.save(build_model("resnet18", 4).state_dict(), tmp_path / "r18.pth")
    line = _expect_exit2([*ev, "--pretrained-weights", str(tmp_path / "r18.pth")], capsys)
    assert "does not fit --arch resnet50" in line and "missing keys" in line
    # missing keys in an otherwise right file
    sd = build_model("resnet50", 4).state_dict()
    del sd["fc.weight"]
    torch.save({"state_dict": sd}, tmp_path / "partial.pth")
    assert "1 missing keys, e.g. fc.weight" in _expect_exit2([*ev, "--pretrained-weights",
                                                               str(tmp_path / "partial.pth")], capsys)
    # the positive cases: a plain torchvision-style state dict, with and without the DDP prefix, loads and evaluates
    plain = build_model("resnet18", 4).state_dict()
    torch.save(plain, tmp_path / "plain.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in plain.items()}}, tmp_path / "ddp.pth")
    ev18 = [a if a != "resnet50" else "resnet18" for a in ev]
    for name in ("plain.pth", "ddp.pth"):
        assert _main([*ev18, "--pretrained-weights", str(tmp_path / name)]) == 0
        rep = last_json(capsys.readouterr().out)
        assert rep["macs_reduction_pct"] == pytest.approx(0.0, abs=1e-3)  # dense: nothing to remove
        assert rep["kept_channels"] == rep["prunable_channels"]
    # recorded arch differs
    torch.save({"arch": "resnet18", "state_dict": build_model("resnet18", 4).state_dict()}, tmp_path / "a.pth")
    assert "saved for resnet18" in _expect_exit2([*ev, "--pretrained-weights", str(tmp_path / "a.pth")], capsys)


def test_bad_resume_overwrites_nothing(tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    sentinel = ws / "checkpoint_000001.pth"
    sentinel.write_bytes(b"torn file")
    before = sorted(p.name for p in ws.iterdir())
    line = _expect_exit2(["--data-backend", "synthetic", "--synthetic-samples", "8", "--num-classes", "4",
                          "--image-size", "32", "-j", "0", "--arch", "resnet18", "--workspace", str(ws),
                          "--resume", str(sentinel)], capsys)
    assert "--resume" in line and "cannot read checkpoint" in line
    assert sorted(p.name for p in ws.iterdir()) == before and sentinel.read_bytes() == b"torn file"


def test_cli_one_line_error_from_the_shell(tmp_path):
    """The real process: exit status 2 and exactly one stderr line, run from CLS/ as upstream."""
    proc = _run([sys.executable, "./main.py", "--data-backend", "pytorch", "--arch", "resnet50", "--evaluate",
                 str(tmp_path / "missing")], cwd=CLS_DIR, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_help_documents_upstream_flags():
    proc = _run([sys.executable, "./main.py", "--help"], cwd=CLS_DIR, timeout=120)
    assert proc.returncode == 0
    for flag in ("--optimizer-batch-size", "--raport-file", "--static-loss-scale", "--mixup", "--grow_prune",
                 "--delta_T", "--T_max", "--channel_sparsity", "--init_channel_ratio", "--pretrained-weights",
                 "--chex-criterion", "--cifar-stem", "--image-size", "--resume", "--mom", "--wd"):
        assert flag in proc.stdout, flag
