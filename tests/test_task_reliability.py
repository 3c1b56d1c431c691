"""T1, T9, T11 and T12 for every task (CLS, DET, SEG) through the run harness, as real processes on tiny inputs.

- T1: a run resumed in a new process from a checkpoint around an exploration event (and, for CLS, after T_max and
  with two loader workers) ends bitwise equal to the straight run: model and buffers, optimizer, scheduler,
  scaler, trainer counters, explorer masks + MRU store, data position and every rank's RNG state;
- T9: two gloo ranks hold bitwise the same model (BatchNorm buffers included), optimizer state, masks and MRU
  store after every exploration event;
- T12: ``torchrun --max-restarts=1`` with rank 1 killed mid-run ends equal to the uninterrupted two-rank run;
- T11: the two-rank checkpoint loads in one process with a warning and the model/CHEX state as saved.

Faults and state dumps come from a small wrapper script written into ``tmp_path`` (test-only code never ships).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SEG_SMALL = ["--rpn-pre-nms-top-n-train", "100", "--rpn-post-nms-top-n-train", "50", "--rpn-batch-size-per-image",
             "32", "--box-batch-size-per-image", "32", "--box-detections-per-img", "10", "--rpn-pre-nms-top-n-test",
             "100", "--rpn-post-nms-top-n-test", "50", "--print-freq", "1"]


def task_args(task: str, data: Path, ws: Path) -> list[str]:
    """Every run checkpoints after every optimizer step and keeps every file."""
    if task == "CLS":    # 4 steps/epoch in 1 process, 3 epochs, events after epochs 1 and 2; mixup and 2 workers
        return [str(REPO / "CLS" / "main.py"), "--data-backend", "synthetic", "--synthetic-samples", "32",
                "--num-classes", "4", "--image-size", "16", "--arch", "resnet18", "--cifar-stem", "-b", "8", "-j", "2",
                "--lr", "0.05", "--mixup", "0.2", "--grow_prune", "--delta_T", "1", "--T_max", "2",
                "--channel_sparsity", "0.5", "--init_channel_ratio", "0.25", "--seed", "1", "--no-tensorboard",
                "-p", "0", "--training-only", "--epochs", "3", "--checkpoint-every", "1", "--keep-checkpoints", "99",
                "--workspace", str(ws)]
    if task == "DET":    # 1 step/epoch, 3 epochs, events at steps 1 and 2
        return [str(REPO / "DET" / "main.py"), "--backbone", "resnet18", "--bs", "2", "--data", str(data),
                "--multistep", "10", "--warmup", "2", "--grow_prune", "--channel_sparsity", "0.5",
                "--init_channel_ratio", "0.2", "--delta_T", "1", "--T_max", "2", "--max-iters-per-epoch", "1",
                "--num-workers", "0", "--eval-on-epochs", "99", "--epochs", "3", "--seed", "1", "--log-interval", "1",
                "--no-tensorboard", "--checkpoint-every", "1", "--keep-checkpoints", "99", "--save", str(ws)]
    return ["-m", "SEG.train", "--data-path", str(data), "--output-dir", str(ws), "--max-iter", "3", "--steps", "100",
            "--warmup-iters", "1", "--batch-size", "2", "--workers", "0", "--min-size", "64", "--max-size", "64",
            "--lr", "0.01", "--checkpoint-period", "1", "--keep-checkpoints", "99", "--no-final-eval", "--norm", "bn",
            "--head-norm", "none", "--grow_prune", "--delta_T", "1", "--T_max", "2", "--chex-criterion", "l1",
            "--no-tensorboard", "--no-resume", *SEG_SMALL]


FINAL = {"CLS": 12, "DET": 3, "SEG": 3}          # optimizer steps of the single-process run
FINAL_TWO = {"CLS": 6, "DET": 3, "SEG": 3}      # ... and of the two-rank run (CLS splits its batches)
# the checkpoints T1 resumes from: between two events (and for CLS mid-epoch after T_max, loader workers running)
RESUME_AT = {"CLS": (5, 10), "DET": (1,), "SEG": (1,)}

WRAPPER = textwrap.dedent('''
    """Runs a task entry point with faults injected and state printed/dumped (test-only)."""
    import hashlib, os, runpy, sys
    sys.path.insert(0, os.environ["CHEX_REPO"])
    import torch
    from chex_tasks.harness import run as harness

    RANK = int(os.environ.get("RANK", "0"))
    FAULT = int(os.environ.get("CHEX_FAULT_AT_STEP", "0"))   # rank 1 dies after this step, first attempt only
    DUMP = os.environ.get("CHEX_DUMP_AFTER_RESTORE")          # write the restored state, then stop
    _after, _setup = harness.Run.after_step, harness.Run.setup

    def digest(tensors):
        h = hashlib.sha1()
        for t in tensors:
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def after_step(self, result, epoch, rate):
        if result.stepped and FAULT and RANK == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" \\
                and self.trainer.step_count == FAULT:
            print(f"FAULT: rank {RANK} exits at step {FAULT}", flush=True)
            os._exit(1)
        _after(self, result, epoch, rate)
        if result.event is not None:
            ex, opt = self.explorer, self.optimizer
            print(f"CHECKSUM step {self.trainer.step_count} rank {RANK} model {digest(self.model.state_dict().values())}"
                  f" momentum {digest(s['momentum_buffer'] for s in opt.state.values())} masks "
                  f"{digest(ex.masks.values())} mru {digest(t for e in ex.mru.values() for t in e.values())}",
                  flush=True)

    def setup(self):
        _setup(self)
        if DUMP:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "explorer": self.explorer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "trainer": self.trainer.state_dict()}, f"{DUMP}.rank{RANK}.pth")
            sys.stdout.flush()
            os._exit(0)

    harness.Run.after_step, harness.Run.setup = after_step, setup
    entry, sys.argv = sys.argv[1], sys.argv[1:]
    if entry == "-m":
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(entry, run_name="__main__")
''')


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CHEX_REPO=str(REPO), CI="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], timeout: int, **env) -> subprocess.CompletedProcess:
    """Run in its own session; on timeout kill the whole group (launcher and workers) and fail."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:4]} did not finish within {timeout} s; last output:\n{out[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _single(wrapper: Path, argv: list[str], **env):
    return _launch([sys.executable, str(wrapper), *argv], timeout=300, **env)


def _torchrun(wrapper: Path, argv: list[str], **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--tee", "3", str(wrapper), *argv]
    return _launch(cmd, timeout=400, **env)


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _diff(a, b, path="") -> list[str]:
    if torch.is_tensor(a) or torch.is_tensor(b):
        ok = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in _diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def assert_same_run(a: dict, b: dict) -> None:
    """Every piece of training state; not the flags (paths differ) nor the CLS raport (timings)."""
    keys = (set(a) | set(b)) - {"args", "raport"}
    diffs = [d for k in sorted(keys) for d in _diff(a.get(k), b.get(k), k)]
    assert not diffs, f"{len(diffs)} differences, e.g. {diffs[:6]}"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from chex_tasks.coco import make_tiny_coco

    root = tmp_path_factory.mktemp("coco")
    return {"DET": make_tiny_coco(root / "det", n_train=8, n_val=2, image_size=64, seed=0),
            "SEG": make_tiny_coco(root / "seg", year="2014", n_train=6, n_val=2, image_size=64, seed=3)}


@pytest.fixture(scope="module", params=["CLS", "DET", "SEG"])
def task(request, coco, tmp_path_factory):
    """The task, its data, a wrapper script and its straight single-process run (every checkpoint kept)."""
    tmp = tmp_path_factory.mktemp(request.param)
    wrapper = tmp / "wrapper.py"
    wrapper.write_text(WRAPPER)
    data = coco.get(request.param)
    run = _single(wrapper, task_args(request.param, data, tmp / "straight"))
    assert run.returncode == 0, run.stdout[-3000:]
    return request.param, data, wrapper, tmp


def _resumed(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--no-resume"] + ["--resume", "auto"]


def test_t1_resume_in_a_new_process_is_bitwise(task, tmp_path):
    name, data, wrapper, tmp = task
    straight = tmp / "straight"
    reference = _load(straight / f"checkpoint_{FINAL[name]:06d}.pth")
    assert reference["explorer"]["event_count"] == 2
    for k in RESUME_AT[name]:
        ws = tmp_path / f"resume{k}"
        ws.mkdir()
        (ws / f"checkpoint_{k:06d}.pth").write_bytes((straight / f"checkpoint_{k:06d}.pth").read_bytes())
        run = _single(wrapper, _resumed(task_args(name, data, ws)))
        assert run.returncode == 0, run.stdout[-3000:]
        assert f"resuming from {ws / f'checkpoint_{k:06d}.pth'}" in run.stdout
        assert_same_run(_load(ws / f"checkpoint_{FINAL[name]:06d}.pth"), reference)


@pytest.fixture(scope="module")
def two_ranks(task):
    """T9 reference: the uninterrupted two-rank run (torchrun, --max-restarts 1, no fault)."""
    name, data, wrapper, tmp = task
    run = _torchrun(wrapper, task_args(name, data, tmp / "two"))
    assert run.returncode == 0, run.stdout[-3000:]
    return tmp / "two", run.stdout


def _checksums(log: str) -> dict[tuple[int, int], str]:
    out = {}
    for line in log.splitlines():
        if "CHECKSUM step" in line:
            words = line.split("CHECKSUM ", 1)[1].split()
            out[(int(words[1]), int(words[3]))] = " ".join(words[4:])
    return out


def test_t9_two_ranks_agree_after_every_event(two_ranks):
    _, log = two_ranks
    sums = _checksums(log)
    steps = sorted({s for s, _ in sums})
    assert len(steps) == 2, sums
    for s in steps:
        assert sums[(s, 0)] == sums[(s, 1)], (s, sums)


def test_t12_torchrun_restart_after_a_rank_dies(task, two_ranks, tmp_path):
    name, data, wrapper, _ = task
    ref, _ = two_ranks
    argv = [a for a in task_args(name, data, tmp_path / "faulty") if a != "--no-resume"] + ["--resume", "auto"]
    fault = FINAL_TWO[name] - 1
    run = _torchrun(wrapper, argv, CHEX_FAULT_AT_STEP=fault)
    assert f"FAULT: rank 1 exits at step {fault}" in run.stdout
    assert run.returncode == 0, run.stdout[-4000:]
    assert "resuming from" in run.stdout
    final = f"checkpoint_{FINAL_TWO[name]:06d}.pth"
    assert_same_run(_load(tmp_path / "faulty" / final), _load(ref / final))


def test_t11_two_rank_checkpoint_loads_in_one_process(task, two_ranks, tmp_path):
    name, data, wrapper, _ = task
    ref, _ = two_ranks
    saved_path = sorted(ref.glob("checkpoint_*.pth"))[-1]
    saved = _load(saved_path)
    assert len(saved["rng"]) == 2
    argv = _resumed(task_args(name, data, tmp_path / "one"))[:-1] + [str(saved_path)]
    run = _single(wrapper, argv, CHEX_DUMP_AFTER_RESTORE=tmp_path / "to1")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "RNG states for 2 process(es), this run has 1" in run.stdout
    loaded = _load(tmp_path / "to1.rank0.pth")
    from chex_core.checkpoint import strip_prefix
    from chex_tasks.harness.checkpoint import model_state

    assert not _diff(strip_prefix(loaded["model"]), model_state(saved)), "model"
    for key in ("optimizer", "scheduler", "trainer"):
        assert not _diff(loaded[key], saved[key]), key
    for key in ("masks", "mru", "event_count", "last_event_step", "groups"):
        assert not _diff(loaded["explorer"][key], saved["explorer"][key]), f"explorer/{key}"
