"""The resume and rank guarantees for every task (CLS, DET, SEG) through the run harness, as real processes on tiny
inputs.

- T1: a run resumed in a new process from a checkpoint around an exploration event (and, for CLS, after T_max and
  with two loader workers) ends bitwise equal to the straight run: model and buffers, optimizer, scheduler,
  scaler, trainer counters, explorer masks + MRU store, data position and every rank's RNG state;
- T2: that comparison has teeth: the same resume without the RNG states ends elsewhere;
- T7: an incomplete checkpoint (no MRU store, no explorer or scheduler state, a compact export) is refused in one line;
- T9: two gloo ranks hold bitwise the same model (BatchNorm buffers included), optimizer state, masks and MRU
  store after every exploration event;
- T12: ``torchrun --max-restarts=1`` with rank 1 killed mid-run ends equal to the uninterrupted two-rank run;
- T11: the two-rank checkpoint loads in one process with a warning and the model/CHEX state as saved.

Each task costs one straight run, its resumed runs (T1, and T2 without the RNG states), one uninterrupted two-rank
run (T9's log, T11's checkpoint and T12's reference) and one faulty two-rank run (T12, whose log is checked for T9
as well); T7 and T11 call the entry point in this process.
Faults and per-event state digests come from a small wrapper script written into ``tmp_path`` (test-only code never
ships). Checkpoints of the big models are deleted when a task's tests are done: they are hundreds of MB each.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_process_group, subprocess_env

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SEG_SMALL = ["--rpn-pre-nms-top-n-train", "100", "--rpn-post-nms-top-n-train", "50", "--rpn-batch-size-per-image",
             "32", "--box-batch-size-per-image", "32", "--box-detections-per-img", "10", "--rpn-pre-nms-top-n-test",
             "100", "--rpn-post-nms-top-n-test", "50", "--print-freq", "1"]


ENTRY = {"CLS": [str(REPO / "CLS" / "main.py")], "DET": [str(REPO / "DET" / "main.py")], "SEG": ["-m", "SEG.train"]}
MAIN = {"CLS": "CLS.main", "DET": "DET.main", "SEG": "SEG.train"}     # the same entry points, imported


def task_flags(task: str, data: Path, ws: Path) -> list[str]:
    """Every run checkpoints after every optimizer step and keeps every file."""
    if task == "CLS":    # 4 steps/epoch in 1 process, 3 epochs, events after epochs 1 and 2; mixup and 2 workers
        return ["--data-backend", "synthetic", "--synthetic-samples", "32",
                "--num-classes", "4", "--image-size", "16", "--arch", "resnet18", "--cifar-stem", "-b", "8", "-j", "2",
                "--lr", "0.05", "--mixup", "0.2", "--grow_prune", "--delta_T", "1", "--T_max", "2",
                "--channel_sparsity", "0.5", "--init_channel_ratio", "0.25", "--seed", "1", "--no-tensorboard",
                "-p", "0", "--training-only", "--epochs", "3", "--checkpoint-every", "1", "--keep-checkpoints", "99",
                "--workspace", str(ws)]
    if task == "DET":    # 1 step/epoch, 3 epochs, events at steps 1 and 2
        return ["--backbone", "resnet18", "--random-backbone", "--bs", "2", "--data", str(data),
                "--multistep", "10", "--warmup", "2", "--grow_prune", "--channel_sparsity", "0.5",
                "--init_channel_ratio", "0.2", "--delta_T", "1", "--T_max", "2", "--max-iters-per-epoch", "1",
                "--num-workers", "0", "--eval-on-epochs", "99", "--epochs", "3", "--seed", "1", "--log-interval", "1",
                "--no-tensorboard", "--checkpoint-every", "1", "--keep-checkpoints", "99", "--save", str(ws)]
    # SEG: 3 iterations, events at 1 and 2; delta0 0.2 < S (upstream starts dense): an MRU store from the start
    return ["--data-path", str(data), "--output-dir", str(ws), "--max-iter", "3", "--steps", "100",
            "--warmup-iters", "1", "--batch-size", "2", "--workers", "0", "--min-size", "64", "--max-size", "64",
            "--lr", "0.01", "--checkpoint-period", "1", "--keep-checkpoints", "99", "--no-final-eval", "--norm", "bn",
            "--head-norm", "none", "--grow_prune", "--init_channel_ratio", "0.2", "--delta_T", "1", "--T_max", "2",
            "--chex-criterion", "l1", "--no-tensorboard", "--no-resume", *SEG_SMALL]


def task_args(task: str, data: Path, ws: Path) -> list[str]:
    return ENTRY[task] + task_flags(task, data, ws)


FINAL = {"CLS": 12, "DET": 3, "SEG": 3}          # optimizer steps of the single-process run
FINAL_TWO = {"CLS": 6, "DET": 3, "SEG": 3}      # ... and of the two-rank run (CLS splits its batches)
# the checkpoints T1 resumes from: between two events (and for CLS mid-epoch after T_max, loader workers running)
RESUME_AT = {"CLS": (5, 10), "DET": (1,), "SEG": (1,)}

WRAPPER = textwrap.dedent('''
    """Runs a task entry point with a rank crash injected and per-event state digests printed (test-only)."""
    import hashlib, os, runpy, sys
    sys.path.insert(0, os.environ["CHEX_REPO"])
    import torch
    from chex_tasks.harness import run as harness

    RANK = int(os.environ.get("RANK", "0"))
    FAULT = int(os.environ.get("CHEX_FAULT_AT_STEP", "0"))   # rank 1 dies after this step, first attempt only
    _after, _setup = harness.Run.after_step, harness.Run.setup

    def digest(tensors):
        h = hashlib.sha1()
        for t in tensors:
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def print_digests(run, report):
        # right after the harness's post-event work, before a checkpoint save could broadcast the buffers again
        ex, opt = run.explorer, run.optimizer
        print(f"CHECKSUM step {report.step} rank {RANK} model {digest(run.model.state_dict().values())} momentum "
              f"{digest(s['momentum_buffer'] for s in opt.state.values())} masks {digest(ex.masks.values())} "
              f"mru {digest(t for e in ex.mru.values() for t in e.values())}", flush=True)

    def after_step(self, result, epoch, rate):
        if result.stepped and FAULT and RANK == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" \\
                and self.trainer.step_count == FAULT:
            print(f"FAULT: rank {RANK} exits at step {FAULT}", flush=True)
            os._exit(1)
        _after(self, result, epoch, rate)

    def setup(self):
        _setup(self)
        on_event = self.task.on_event
        def on_event_then_digests(run, report):
            on_event(run, report)
            print_digests(run, report)
        self.task.on_event = on_event_then_digests

    harness.Run.after_step, harness.Run.setup = after_step, setup
    entry, sys.argv = sys.argv[1], sys.argv[1:]
    if entry == "-m":
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(entry, run_name="__main__")
''')


def _launch(cmd: list[str], timeout: int, **env) -> subprocess.CompletedProcess:
    return run_process_group(cmd, cwd=REPO, env=subprocess_env(**env), timeout=timeout)


def _single(wrapper: Path, argv: list[str], **env):
    return _launch([sys.executable, str(wrapper), *argv], timeout=300, **env)


def _torchrun(wrapper: Path, argv: list[str], **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--tee", "3", str(wrapper), *argv]
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


def assert_same_run(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> None:
    """Every piece of training state; not the flags (paths differ) nor the CLS raport (timings)."""
    keys = (set(a) | set(b)) - {"args", "raport", *ignore}
    diffs = [d for k in sorted(keys) for d in _diff(a.get(k), b.get(k), k)]
    assert not diffs, f"{len(diffs)} differences, e.g. {diffs[:6]}"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from chex_tasks.coco import make_tiny_coco

    root = tmp_path_factory.mktemp("coco")
    return {"DET": make_tiny_coco(root / "det", n_train=8, n_val=2, image_size=64, seed=0),
            "SEG": make_tiny_coco(root / "seg", year="2014", n_train=6, n_val=2, image_size=64, seed=3)}


KEEP = {name: (*RESUME_AT[name], FINAL[name]) for name in FINAL}      # the straight run's files the tests read


@pytest.fixture(scope="module", params=["CLS", "DET", "SEG"])
def task(request, coco, tmp_path_factory):
    """The task, its data, a wrapper script and a folder for its runs."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    wrapper = tmp / "wrapper.py"
    wrapper.write_text(WRAPPER)
    yield name, coco.get(name), wrapper, tmp
    for path in tmp.rglob("*.pt*"):          # checkpoints and compact files: up to ~400 MB each for SEG
        path.unlink()


@pytest.fixture(scope="module")
def straight(task) -> Path:
    """The task's straight single-process run; the files the tests read are kept."""
    name, data, wrapper, tmp = task
    run = _single(wrapper, task_args(name, data, tmp / "straight"))
    assert run.returncode == 0, run.stdout[-3000:]
    for path in (tmp / "straight").glob("checkpoint_*.pth"):
        if int(path.stem.split("_")[1]) not in KEEP[name]:
            path.unlink()
    return tmp / "straight"


def _resumed(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--no-resume"] + ["--resume", "auto"]


def test_t1_resume_in_a_new_process_is_bitwise(task, straight, tmp_path):
    name, data, wrapper, _ = task
    reference = _load(straight / f"checkpoint_{FINAL[name]:06d}.pth")
    assert reference["explorer"]["event_count"] == 2
    for k in RESUME_AT[name]:
        ws = tmp_path / f"resume{k}"
        ws.mkdir()
        os.link(straight / f"checkpoint_{k:06d}.pth", ws / f"checkpoint_{k:06d}.pth")
        run = _single(wrapper, _resumed(task_args(name, data, ws)))
        assert run.returncode == 0, run.stdout[-3000:]
        assert f"resuming from {ws / f'checkpoint_{k:06d}.pth'}" in run.stdout
        assert_same_run(_load(ws / f"checkpoint_{FINAL[name]:06d}.pth"), reference)
        for path in ws.glob("*.pt*"):
            path.unlink()


def test_t2_resume_without_the_rng_states_ends_elsewhere(task, straight, tmp_path):
    """T2: T1's comparison has teeth: the same resume with the RNG states dropped says so and ends in another
    training state (augmentation, mixup and sampling draws differ; the RNG states themselves are not compared)."""
    name, data, wrapper, _ = task
    k = RESUME_AT[name][0]
    ckpt = _load(straight / f"checkpoint_{k:06d}.pth")
    del ckpt["rng"]
    ws = tmp_path / "no_rng"
    ws.mkdir()
    torch.save(ckpt, ws / f"checkpoint_{k:06d}.pth")
    run = _single(wrapper, _resumed(task_args(name, data, ws)))
    assert run.returncode == 0, run.stdout[-3000:]
    assert "RNG states for 0 process(es)" in run.stdout
    final = f"checkpoint_{FINAL[name]:06d}.pth"
    with pytest.raises(AssertionError, match="differences"):
        assert_same_run(_load(ws / final), _load(straight / final), ignore=("rng",))
    for path in ws.glob("*.pt*"):
        path.unlink()


REFUSED = {"mru": "explorer state is missing ['mru']", "explorer": "lacks explorer state",
           "scheduler": "lacks scheduler state", "compact": "not a complete {} training checkpoint"}


@pytest.mark.parametrize("drop", sorted(REFUSED))
def test_t7_incomplete_checkpoint_is_refused_in_one_line(task, straight, drop, tmp_path, capsys):
    """T7: a checkpoint without the MRU store, the explorer state or the scheduler state under --grow_prune, or the
    compact export given to --resume, is one error line naming --resume and exit status 2, and nothing is written
    (the entry point, in this process)."""
    name, data, _, _ = task
    ws = tmp_path / "ws"
    ws.mkdir()
    if drop == "compact":
        path = next(straight.glob("*compact.pt*"))
    else:
        k = RESUME_AT[name][0]
        ckpt = _load(straight / f"checkpoint_{k:06d}.pth")
        if drop == "mru":
            del ckpt["explorer"]["mru"]
        elif drop == "explorer":
            ckpt["explorer"] = None
        else:
            del ckpt[drop]
        path = ws / f"checkpoint_{k:06d}.pth"
        torch.save(ckpt, path)
    before = sorted(ws.iterdir())
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(MAIN[name]).main(task_flags(name, data, ws) + ["--resume", str(path)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume" in last and REFUSED[drop].format(name) in last, last
    assert sorted(ws.iterdir()) == before
    for path in ws.glob("*.pt*"):
        path.unlink()


def _two_rank_args(name: str, data: Path, ws: Path) -> list[str]:
    return task_args(name, data, ws) + ["--keep-checkpoints", "1"]      # the newest is all T11/T12 read


@pytest.fixture(scope="module")
def two_ranks(task):
    """The uninterrupted two-rank run (torchrun, --max-restarts 1, no fault): T9's log, T11's checkpoint, T12's
    reference."""
    name, data, wrapper, tmp = task
    run = _torchrun(wrapper, _two_rank_args(name, data, tmp / "two"))
    assert run.returncode == 0, run.stdout[-3000:]
    return tmp / "two", run.stdout


def _assert_ranks_agree_after_every_event(log: str) -> None:
    """Both ranks printed the same digests (model with buffers, momentum, masks, MRU) after each of the 2 events;
    a step printed twice (before a crash and after the restart) must agree with itself too."""
    seen: dict[int, dict[int, set]] = {}
    for line in log.splitlines():
        if "CHECKSUM step" in line:
            words = line.split("CHECKSUM ", 1)[1].split()
            seen.setdefault(int(words[1]), {}).setdefault(int(words[3]), set()).add(" ".join(words[4:]))
    assert len(seen) == 2, seen
    for step, ranks in seen.items():
        assert set(ranks) == {0, 1} and len(set.union(*ranks.values())) == 1, (step, ranks)


def test_t9_two_ranks_agree_after_every_event(two_ranks):
    _assert_ranks_agree_after_every_event(two_ranks[1])


def test_t12_torchrun_restart_after_a_rank_dies(task, two_ranks, tmp_path):
    name, data, wrapper, _ = task
    ref, _ = two_ranks
    fault = FINAL_TWO[name] - 1
    run = _torchrun(wrapper, _resumed(_two_rank_args(name, data, tmp_path / "faulty")), CHEX_FAULT_AT_STEP=fault)
    assert f"FAULT: rank 1 exits at step {fault}" in run.stdout
    assert run.returncode == 0, run.stdout[-4000:]
    assert "resuming from" in run.stdout
    final = f"checkpoint_{FINAL_TWO[name]:06d}.pth"
    assert_same_run(_load(tmp_path / "faulty" / final), _load(ref / final))
    _assert_ranks_agree_after_every_event(run.stdout)            # T9 across the restart, too
    for path in (tmp_path / "faulty").glob("*.pt*"):
        path.unlink()


def test_t11_two_rank_checkpoint_loads_in_one_process(task, two_ranks, tmp_path, monkeypatch, capsys):
    """The entry point, in this process, stopped once setup has restored the two-rank checkpoint."""
    from chex_core.checkpoint import strip_prefix
    from chex_tasks.harness import Run
    from chex_tasks.harness.checkpoint import model_state

    name, data, _, _ = task
    ref, _ = two_ranks
    saved_path = ref / f"checkpoint_{FINAL_TWO[name]:06d}.pth"
    saved = _load(saved_path)
    assert len(saved["rng"]) == 2
    restored: list[Run] = []
    monkeypatch.setattr(Run, "train", lambda run: restored.append(run))
    argv = _resumed(task_flags(name, data, tmp_path / "one"))[:-1] + [str(saved_path)]
    assert importlib.import_module(MAIN[name]).main(argv) == 0
    assert "RNG states for 2 process(es), this run has 1" in capsys.readouterr().out
    run, = restored
    assert not _diff(strip_prefix(run.model.state_dict()), model_state(saved)), "model"
    for key, part in (("optimizer", run.optimizer), ("scheduler", run.scheduler), ("trainer", run.trainer)):
        assert not _diff(part.state_dict(), saved[key]), key
    loaded = run.explorer.state_dict()
    for key in ("masks", "mru", "event_count", "last_event_step", "groups"):
        assert not _diff(loaded[key], saved["explorer"][key]), f"explorer/{key}"
