"""The run harness in-process, on a toy task: exact resume inside an epoch with loader workers, the GradScaler state
round trip, the checkpoint refusals, the LR rule and the compact-format readers (fast; the per-task end-to-end
guarantees are in test_task_reliability.py)."""
from __future__ import annotations

import argparse
import random

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from chex_core.engine import AmpConfig
from chex_tasks import export
from chex_tasks.harness import Layout, LRSchedule, Run, Task, UserError, make_train_loader
from chex_tasks.harness import checkpoint as ck
from chex_tasks.harness.runtime import Runtime, seed_rank
from chex_core.distributed import DistInfo


class Noisy(Dataset):
    """Random augmentation from the global torch and Python generators (the worker's, with workers)."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        x = torch.full((4,), float(i)) + torch.randn(4) + random.random()
        return x, torch.tensor(i % 2)


class Toy(Task):
    name = "TOY"
    layout = Layout()

    def __init__(self, workers: int):
        self.workers = workers

    def build_model(self, run):
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def flops_input_size(self, run):
        return (4,)

    def train_loader(self, run):
        return make_train_loader(Noisy(), batch_size=4, workers=self.workers, seed=run.args.seed)

    def steps(self, run, loader):
        return 2, len(loader), 1

    def param_groups(self, model):
        return [{"params": list(model.parameters()), "weight_decay": 1e-4}]

    def lr_schedule(self, run):
        return LRSchedule("cosine", total_steps=2 * run.steps_per_epoch, warmup_steps=2)

    def forward(self, run, model, batch):
        x, y = batch
        with run.amp.autocast():
            out = model(x)
        return {"loss": nn.functional.cross_entropy(out.float(), y)}, x.shape[0]


def _args(ws, **kw):
    base = dict(seed=3, chex_seed=3, grow_prune=False, chex_prune_downsample=False, compact_training=False,
                resume=None, keep_checkpoints=100, checkpoint_every=1, tensorboard=False, progress=False, lr=0.1,
                momentum=0.9, amp=False, T_max=1, channel_sparsity=0.0)
    base.update(kw)
    return argparse.Namespace(workspace=str(ws), **base)


def _run(ws, workers=0, amp=None, **kw) -> Run:
    args = _args(ws, **kw)
    seed_rank(args.seed, 0)
    run = Run(Toy(workers), args, Runtime(DistInfo(0, 0, 1, torch.device("cpu"), False), args.seed), ws, amp=amp)
    run.setup()
    run.train()
    return run


def _same(a, b) -> list[str]:
    keys = set(a) - {"args"}
    assert keys == set(b) - {"args"}
    return [k for k in keys if not _equal(a[k], b[k])]


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_is_bitwise_with_workers(tmp_path, workers):
    """Resume from a checkpoint written 2 batches into epoch 1 (the loader's workers were mid-stream, their
    augmentation RNG advanced): the end state equals the straight run's, RNG and data position included."""
    torch.set_num_threads(1)
    straight = _run(tmp_path / "a", workers)
    steps = straight.trainer.step_count
    assert steps == 12
    mid = ck.load_checkpoint(str(tmp_path / "a" / "checkpoint_000008.pth"))
    assert mid["position"] == {"epoch": 1, "micro": 2, "micro_per_epoch": 6} and len(mid["loader"]) == 1
    (tmp_path / "b").mkdir()
    torch.save(mid, tmp_path / "b" / "checkpoint_000008.pth")
    _run(tmp_path / "b", workers, resume="auto")
    final = [ck.load_checkpoint(str(tmp_path / d / "checkpoint_000012.pth")) for d in "ab"]
    assert _same(*final) == []
    # teeth: without the loader state the epoch restarts from its first batch (warned) and the result differs
    mid["loader"] = None
    (tmp_path / "c").mkdir()
    torch.save(mid, tmp_path / "c" / "checkpoint_000008.pth")
    with pytest.warns(UserWarning, match="restarting epoch 1 from its first batch"):
        _run(tmp_path / "c", workers, resume="auto")
    assert "model" in _same(final[0], ck.load_checkpoint(str(tmp_path / "c" / "checkpoint_000014.pth")))


def test_grad_scaler_state_round_trips(tmp_path):
    """fp16 autocast with a dynamic GradScaler on CPU: the scaler state (scale, growth tracker) is checkpointed and
    restored, and the resumed run ends bitwise equal to the straight one."""
    torch.set_num_threads(1)
    amp = AmpConfig(enabled=True, device_type="cpu", dtype=torch.float16)
    straight = _run(tmp_path / "a", amp=amp)
    assert straight.scaler.is_enabled()
    mid = ck.load_checkpoint(str(tmp_path / "a" / "checkpoint_000005.pth"))
    # the state moved away from a fresh scaler's (an overflow was skipped, the growth tracker counts)
    assert (mid["scaler"]["scale"], mid["scaler"]["_growth_tracker"]) != (65536.0, 0)
    (tmp_path / "b").mkdir()
    torch.save(mid, tmp_path / "b" / "checkpoint_000005.pth")
    resumed = _run(tmp_path / "b", amp=amp, resume="auto")
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    final = [ck.load_checkpoint(str(tmp_path / d / "checkpoint_000012.pth")) for d in "ab"]
    assert _same(*final) == []


@pytest.mark.parametrize("drop, message", [("scheduler", "lacks scheduler"), ("trainer", "lacks trainer"),
                                           ("explorer", "lacks explorer"), ("mru", "missing ['mru']"),
                                           ("physical", "--compact-training"), ("model", "no model state")])
def test_incomplete_checkpoints_are_refused_in_one_line(drop, message):
    ckpt = {"model": {"w": torch.zeros(1)}, "optimizer": {}, "scheduler": {}, "scaler": {}, "trainer": {},
            "explorer": {"mru": {}, "masks": {}}, "physical": None}
    if drop == "mru":
        del ckpt["explorer"]["mru"]
    elif drop == "physical":
        ckpt["physical"] = {"held": {}}
    else:
        ckpt[drop] = None
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as exc:
        ck.check_complete(ckpt, "x.pth", task="CLS", layout=Layout(), explorer=True, physical=False)
    assert "--resume x.pth" in str(exc.value) and "\n" not in str(exc.value)


def test_lr_schedule_matches_the_three_recipes():
    """NVIDIA (CLS, DET): (s+1)/W warmup, cosine/step decay; maskrcnn-benchmark (SEG): f*(1-a)+a warmup, steps."""
    cos = LRSchedule("cosine", total_steps=110, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)
    assert LRSchedule("linear", total_steps=100)(50) == pytest.approx(0.5)
    step = LRSchedule("step", total_steps=1000, milestones=[300, 600])
    assert step(299) == 1.0 and step(300) == pytest.approx(0.1) and step(650) == pytest.approx(0.01)
    det = LRSchedule("step", warmup_steps=300, milestones=[4300, 5400])
    assert det(0) == 1 / 300 and det(299) == 1.0 and det(4300) == pytest.approx(0.1)
    seg = LRSchedule("step", warmup_steps=500, warmup_start=1 / 3, warmup_offset=0, milestones=[210000, 250000])
    assert seg(0) == pytest.approx(1 / 3) and seg(250) == pytest.approx(2 / 3) and seg(500) == 1.0
    assert seg(250000) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown LR decay"):
        LRSchedule("poly")


def test_compact_reader_accepts_the_one_format_and_the_old_ones():
    sd, spec = {"w": torch.zeros(2)}, {"layer1.0.conv1": 3}
    new = export.compact_checkpoint(nn.Linear(1, 1), spec, task="DET", module="backbone", meta={"backbone": "r"})
    got = export.read_compact(new)
    assert got.width_spec == spec and got.module == "backbone" and set(got.state_dict) == {"weight", "bias"}
    assert export.read_compact({"state_dict": sd, "cfg": spec}) == (sd, spec, "")
    assert export.read_compact({"model": sd, "width_spec": spec}) == (sd, spec, "backbone")
    assert export.read_compact({"model": sd, "body_spec": spec}) == (sd, spec, "backbone.body")
    assert export.read_compact({"model": sd, "epoch": 3}) is None
