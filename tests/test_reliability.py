"""Reliability guarantees checked end to end that are not per task: NaN on one rank (CLS), crash-safe saving, and a
bad-input suite across CLS/DET/SEG. The resume and rank guarantees (T1/T2/T7/T9/T11/T12) for every task are in
test_task_reliability.py; chex_core-level guarantees are covered elsewhere (see the README table).

The multi-process test uses ``torchrun`` with a c10d rendezvous on a free port and gloo, running CLS/main.py (CPU,
1 thread, synthetic data, ResNet-18 with the 3x3 stem at 16 px); the fault is injected by a small wrapper script
written into ``tmp_path`` (test-only code never ships in CLS/).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_process_group, subprocess_env

REPO = Path(__file__).resolve().parents[1]

# 32 images of 16 px, batch 8: 4 optimizer steps per epoch in one process, 2 per rank with two ranks; mixup.
CLS_ARGS = ["--data-backend", "synthetic", "--synthetic-samples", "32", "--num-classes", "4", "--image-size", "16",
            "--arch", "resnet18", "--cifar-stem", "-b", "8", "-j", "0", "--lr", "0.05", "--mixup", "0.2",
            "--grow_prune", "--delta_T", "2", "--T_max", "4", "--channel_sparsity", "0.5",
            "--init_channel_ratio", "0.25", "--seed", "1", "--no-tensorboard", "-p", "0"]

WRAPPER = textwrap.dedent('''
    """Runs CLS/main.py with a NaN loss injected on rank 1 (test-only)."""
    import os, sys
    sys.path.insert(0, os.environ["CHEX_REPO"])
    from chex_core import engine
    from CLS import main as cls_main

    RANK = int(os.environ.get("RANK", "0"))
    NAN = int(os.environ.get("CHEX_NAN_AT_STEP", "0"))      # rank 1's loss is NaN at optimizer step NAN
    _call = engine.TrainStep.__call__

    def call(self, losses):
        if NAN and RANK == 1 and self.step_count + 1 == NAN:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return _call(self, losses)

    engine.TrainStep.__call__ = call
    sys.exit(cls_main.main(sys.argv[1:]))
''')


# --------------------------------------------------------------------------------------------------- helpers


def _torchrun(wrapper: Path, args: list[str], restarts: int = 0, timeout: int = 120, **env):
    """``torchrun`` with 2 local gloo workers, c10d rendezvous on a free port. The launcher runs in its own session
    and the whole group is SIGKILLed on timeout, so a hung worker can neither hang CI nor outlive the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", str(restarts),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--tee", "3", str(wrapper),
           *args]
    return run_process_group(cmd, cwd=REPO, env=subprocess_env(**env), timeout=timeout, what="torchrun")


def _wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "cls_fault_wrapper.py"
    path.write_text(WRAPPER)
    return path


# --------------------------------------------------------------------------------------------------- T4(b)
_SAVER = textwrap.dedent('''
    import sys, torch
    from chex_core.checkpoint import save_checkpoint
    path = sys.argv[1]
    big = torch.zeros(24 * 1024 * 1024 // 4)  # 24 MB per save
    for version in range(1, 10000):
        big.fill_(version)
        save_checkpoint({"version": version, "weights": big}, path)
        print(version, flush=True)
''')


def _kill_mid_save(folder: Path, target: Path) -> bool:
    """Start the saver loop, wait for one complete save and for the next one's temp file, SIGKILL it. True if the
    kill landed mid-save (a temp file was left behind)."""
    from chex_core.checkpoint import TMP_PREFIX

    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "1", "the first save did not complete"
        deadline = time.monotonic() + 60
        while not list(folder.glob(TMP_PREFIX + "*")):  # the next save is in progress
            assert time.monotonic() < deadline and proc.poll() is None, "no save in progress observed"
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return bool(list(folder.glob(TMP_PREFIX + "*")))


# --------------------------------------------------------------------------------------------------- T6
def test_missing_resume_path_is_one_line_and_exit_2(tmp_path):
    """T6: ``--resume PATH`` naming no file is a user error from the real CLI: exit 2, one stderr line naming
    ``--resume`` and the path, nothing written."""
    ws = tmp_path / "ws"
    missing = tmp_path / "no" / "such" / "checkpoint.pth"
    proc = subprocess.run([sys.executable, str(REPO / "CLS" / "main.py"), *CLS_ARGS, "--epochs", "1",
                           "--workspace", str(ws), "--resume", str(missing)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and str(missing) in lines[0], proc.stderr
    assert not ws.exists() or not any(ws.iterdir())


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """T4(b): SIGKILL while ``save_checkpoint`` is writing: the final name still holds a complete earlier version,
    the half-written temp file is in the target folder under a temp name, resume discovery ignores it and the next
    manager save cleans it up."""
    from chex_core.checkpoint import TMP_PREFIX, CheckpointManager, load_checkpoint

    folder = tmp_path / "ckpts"
    folder.mkdir()
    target = folder / "checkpoint_000001.pth"
    # the window between one save's rename and the next one's temp file is tiny, but retry if the kill hit it
    assert any(_kill_mid_save(folder, target) for _ in range(5)), "no kill landed mid-save in 5 tries"
    leftovers = list(folder.glob(TMP_PREFIX + "*"))
    assert all(p.parent == folder and p.name.startswith(TMP_PREFIX + target.name) for p in leftovers)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)) == [target.name]
    ckpt = load_checkpoint(str(target))  # weights_only load of a complete file
    assert ckpt["version"] >= 1 and torch.equal(ckpt["weights"], torch.full_like(ckpt["weights"], ckpt["version"]))
    manager = CheckpointManager(str(folder), keep=2)
    assert manager.latest() == str(target)
    manager.save({"version": -1}, 2)
    assert not list(folder.glob(TMP_PREFIX + "*"))
    assert load_checkpoint(str(target))["version"] == ckpt["version"]


# --------------------------------------------------------------------------------------------------- distributed
DIST_ARGS = [*CLS_ARGS, "--epochs", "4", "--delta_T", "1", "--T_max", "3", "--keep-checkpoints", "1",
             "--resume", "auto", "--training-only"]


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(tmp_path):
    """T14 distributed: rank 1's loss turns NaN at step 3; the check runs on the all-reduced loss, so both ranks stop
    at step 3 with the same clear message, the job fails (no hang: guarded by the timeout) and no checkpoint past
    epoch 1 is written."""
    run = _torchrun(_wrapper(tmp_path), [*DIST_ARGS, "--workspace", str(tmp_path / "ws")], CHEX_NAN_AT_STEP=3,
                    timeout=120)
    assert run.returncode != 0
    for rank in (0, 1):
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith(f"[default{rank}]:")
                 and "non-finite training loss at optimizer step 3:" in ln]
        assert lines, run.stdout[-3000:]
    assert "Traceback" not in run.stdout.split("non-finite training loss")[0]
    assert sorted(p.name for p in (tmp_path / "ws").glob("checkpoint_*")) == ["checkpoint_000002.pth"]


# --------------------------------------------------------------------------------------------------- T19 / T21
def _write_images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    rgb = Image.new("RGB", (20, 20), (200, 30, 60))
    files = {}
    for i in range(3):
        files[f"good{i}"] = folder / f"good{i}.JPEG"
        rgb.save(files[f"good{i}"])
    files["gray"] = folder / "gray.JPEG"
    Image.new("L", (20, 20), 90).save(files["gray"])
    files["cmyk"] = folder / "cmyk.JPEG"
    Image.new("CMYK", (20, 20), (0, 200, 100, 20)).save(files["cmyk"])
    files["png"] = folder / "really_png.JPEG"
    rgb.save(files["png"], format="PNG")
    files["empty"] = folder / "empty.JPEG"
    files["empty"].write_bytes(b"")
    files["truncated"] = folder / "truncated.JPEG"
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noisy.save(files["truncated"], quality=95)
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])  # header intact: opens fine, fails at decode
    return files


def test_bad_images_are_decoded_or_skipped_then_fatal(tmp_path, caplog):
    """T19: grayscale, CMYK and PNG-named-.JPEG images decode to 3-channel RGB; a zero-byte file and a JPEG truncated
    after its header are skipped with their path logged, up to --max-bad-images, then a DataError; the dataset and
    sampler lengths never change."""
    from PIL import Image

    from CLS.data import DataError, build_loaders

    root = tmp_path / "imagenet"
    files = _write_images(root / "val" / "c0")
    shutil.copytree(root / "val", root / "train")
    with Image.open(files["truncated"]) as im:  # the truncated file really fails at decode, not at open
        with pytest.raises(OSError):
            im.load()
    kw = dict(batch_size=4, workers=0, image_size=16, need_train=False, rank=0, world_size=1)
    loaders = build_loaders("pytorch", str(root), max_bad_images=2, **kw)
    ds = loaders.val.dataset
    n = len(ds)
    assert n == 8 and len(loaders.val.sampler) == 8
    paths = [p for p, _ in ds.inner.samples]
    for name in ("gray", "cmyk", "png"):
        image, label = ds[paths.index(str(files[name]))]
        assert image.shape == (3, 16, 16) and label == 0, name
    assert ds.bad == 0
    caplog.set_level(logging.WARNING)
    seen = sum(images.shape[0] for images, _ in loaders.val)  # two bad files replaced by readable neighbours
    assert seen == n and ds.bad == 2 and len(ds) == n and len(loaders.val.sampler) == n
    for name in ("empty", "truncated"):
        assert str(files[name]) in caplog.text
    strict = build_loaders("pytorch", str(root), max_bad_images=1, **kw)
    with pytest.raises(DataError, match="more than 1 unreadable images"):
        for _ in strict.val:
            pass


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_order_changes_per_epoch_and_survives_resume(world_size):
    """T21: the training order differs between epochs and is a function of (seed, epoch) only, so loaders rebuilt
    in a new process (a resume) and set to epoch e reproduce the straight run's epoch-e order."""
    from CLS.data import build_loaders

    def build():
        return build_loaders("synthetic", None, batch_size=4, workers=0, image_size=8, need_train=True,
                             rank=world_size - 1, world_size=world_size, num_classes=4, synthetic_samples=32, seed=7)

    def order(loaders):
        return [int(i) for i in loaders.train.sampler]

    straight = build()
    orders = []
    for epoch in range(3):
        straight.train.set_epoch(epoch)
        orders.append(order(straight))
    assert orders[0] != orders[1] != orders[2]
    resumed = build()
    resumed.train.set_epoch(2)
    assert order(resumed) == orders[2]
    again = build()
    again.train.set_epoch(0)
    assert order(again) == orders[0]


# --------------------------------------------------------------------------------------------------- bad flags
def _coco_stub(tmp_path: Path) -> Path:
    """An existing folder, so that the data-path check passes and the flag under test is the one rejected."""
    root = tmp_path / "coco"
    root.mkdir(exist_ok=True)
    return root


BAD_CLS = [
    (["--channel_sparsity", "1.5"], "--channel_sparsity"),
    (["--channel_sparsity", "-0.1"], "--channel_sparsity"),
    (["--init_channel_ratio", "0.9", "--channel_sparsity", "0.5"], "--init_channel_ratio"),
    (["--delta_T", "4", "--T_max", "2"], "--T_max"),
    (["--epochs", "-3"], "--epochs"),
    (["--arch", "resnet7"], "--arch"),
    (["--data-backend", "pytorch", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--label-smoothing", "1.0"], "--label-smoothing"),
    (["--lr", "-1"], "--lr"),
]


@pytest.mark.parametrize("extra,flag", BAD_CLS, ids=[f"{f}:{' '.join(e)}" for e, f in BAD_CLS])
def test_cls_bad_flags(tmp_path, capsys, extra, flag):
    """Bad flags: exit 2, the last stderr line names the flag, nothing is written to --workspace."""
    from CLS.main import main

    ws = tmp_path / "ws"
    base = ["--data-backend", "synthetic", "--grow_prune", "-j", "0", "--workspace", str(ws)]
    with pytest.raises(SystemExit) as exc:
        main(base + extra)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in last and "error" in last, last
    assert not ws.exists()


def _det_cases(tmp):
    data = str(_coco_stub(tmp))
    return [(["--data", data, "--grow_prune", "--channel_sparsity", "1.2"], "--channel_sparsity"),
            (["--data", data, "--grow_prune", "--delta_T", "5", "--T_max", "2"], "--T_max"),
            (["--data", data, "--epochs", "-1"], "--epochs"),
            (["--data", data, "--backbone", "resnet7"], "--backbone"),
            (["--data", str(tmp / "nowhere")], "--data")]


def _seg_cases(tmp):
    data = str(_coco_stub(tmp))
    return [(["--data-path", data, "--grow_prune", "--channel_sparsity", "1.2"], "--channel_sparsity"),
            (["--data-path", data, "--grow_prune", "--init_channel_ratio", "0.9", "--channel_sparsity", "0.5"],
             "--init_channel_ratio"),
            (["--data-path", data, "--grow_prune", "--delta_T", "500", "--T_max", "100"], "--T_max"),
            (["--data-path", data, "--max-iter", "-5"], "--max-iter"),
            (["--data-path", str(tmp / "nowhere")], "--data-path")]


@pytest.mark.parametrize("task", ["DET", "SEG"])
def test_det_seg_bad_flags(tmp_path, capsys, task):
    """The same guarantee for DET and SEG (their output flags point into tmp_path, which must stay empty)."""
    if task == "DET":
        from DET.main import main
        cases, out = _det_cases(tmp_path), ["--save", str(tmp_path / "out")]
    else:
        from SEG.train import main
        cases, out = _seg_cases(tmp_path), ["--output-dir", str(tmp_path / "out")]
    failures = []
    for argv, flag in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv + out)
        err = capsys.readouterr().err.strip().splitlines()
        if exc.value.code != 2 or not err or flag not in err[-1] or (tmp_path / "out").exists():
            failures.append((argv, exc.value.code, err[-1:] if err else err))
    assert not failures, failures
