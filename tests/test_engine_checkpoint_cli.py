"""Train step (AMP scale, accumulation, non-finite loss), crash-safe checkpoints, and the CHEX flags."""
import argparse
import os

import pytest
import torch
from torch import nn

from chex_core import checkpoint as ckpt
from chex_core.cli import add_chex_args, explorer_from_args, validate_chex_args
from chex_core.engine import AmpConfig, NonFiniteLossError, TrainStep
from conftest import tiny_basic


def _lin(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


@pytest.mark.numerics
def test_gradient_accumulation_equals_big_batch():
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    a, b = _lin(), _lin()
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    TrainStep(oa)(nn.functional.mse_loss(a(x), y))
    sb = TrainStep(ob, accum_steps=2)
    r1 = sb(nn.functional.mse_loss(b(x[:4]), y[:4]))
    r2 = sb(nn.functional.mse_loss(b(x[4:]), y[4:]))
    assert not r1.stepped and r2.stepped and sb.step_count == 1
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_non_finite_loss_raises_with_the_loss_dict():
    m = _lin()
    step = TrainStep(torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(NonFiniteLossError, match="loss_box"):
        step({"loss_cls": m(torch.randn(2, 4)).sum(), "loss_box": torch.tensor(float("nan"))})


def test_static_loss_scale_skips_overflow_and_keeps_scale():
    m = _lin()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    amp = AmpConfig(enabled=True, device_type="cpu", static_loss_scale=128.0, dtype=torch.float16)
    scaler = amp.make_scaler()
    assert scaler.is_enabled() and scaler.get_scale() == 128.0
    step = TrainStep(opt, scaler=scaler, static_loss_scale=128.0)
    before = [p.detach().clone() for p in m.parameters()]
    r = step(m(torch.randn(2, 4)).sum() * 1e38)          # overflows when scaled
    assert r.skipped and step.skipped_steps == 1 and scaler.get_scale() == 128.0
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    r = step(m(torch.randn(2, 4)).sum())
    assert not r.skipped and scaler.get_scale() == 128.0
    assert not all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_explorer_hook_runs_every_step():
    model = tiny_basic()
    parser = argparse.ArgumentParser()
    add_chex_args(parser)
    args = parser.parse_args("--grow_prune --channel_sparsity 0.5 --init_channel_ratio 0.2 --delta_T 1 --T_max 2"
                             .split())
    from chex_core import resnet_groups
    ex = explorer_from_args(args, model, resnet_groups(model), steps_per_unit=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ex.start(opt)
    step = TrainStep(opt, explorer=ex)
    events = []
    for _ in range(5):
        r = step(nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,))))
        if r.event is not None:
            events.append(r.event.step)
    assert events == [2, 4]


@pytest.mark.parametrize("argv, flag", [
    ("--channel_sparsity 1.5", "--channel_sparsity"), ("--channel_sparsity 0.3 --init_channel_ratio 0.5",
                                                        "--init_channel_ratio"),
    ("--delta_T 0", "--delta_T"), ("--delta_T 5 --T_max 3", "--T_max"), ("--chex-min-channels 0", "min-channels"),
])
def test_bad_chex_flags_exit_2_naming_the_flag(argv, flag, capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_chex_args(parser)
    args = parser.parse_args(argv.split())
    with pytest.raises(SystemExit) as e:
        validate_chex_args(parser, args)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_checkpoint_atomic_write_survives_a_crash_mid_save(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    ckpt.save_checkpoint({"w": torch.ones(3), "epoch": 1}, str(path))

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint({"w": torch.zeros(3), "epoch": 2}, str(path))
    monkeypatch.undo()
    back = ckpt.load_checkpoint(str(path))
    assert back["epoch"] == 1 and torch.equal(back["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pth"]            # no temp file left


def test_retention_best_never_nan_and_latest_skips_torn_files(tmp_path, caplog):
    mgr = ckpt.CheckpointManager(str(tmp_path), keep=2)
    for n, metric in enumerate([0.1, 0.5, float("nan"), 0.3, float("inf")], start=1):
        mgr.save({"n": n, "metric": metric}, n, metric)
    assert [n for n, _ in mgr.list()] == [4, 5]
    assert ckpt.load_checkpoint(mgr.best_path)["n"] == 2
    # a newer torn file and a stray temp file: latest() picks the newest complete one and says why
    (tmp_path / "checkpoint_000006.pth").write_bytes(b"garbage")
    (tmp_path / ".tmp-checkpoint_000007.pth.x").write_bytes(b"partial")
    assert mgr.latest().endswith("checkpoint_000005.pth")
    assert "skipping" in caplog.text
    mgr.clean_temp()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(str(bad))
    assert ckpt.strip_prefix({"module._orig_mod.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_consecutive_overflow_steps_abort_and_a_good_step_resets_the_count():
    """T14: AMP overflow steps are skipped and counted; ``max_consecutive_skips`` in a row abort, not more, not
    fewer, and a finite step in between starts the count again."""
    m = _lin()
    amp = AmpConfig(enabled=True, device_type="cpu", static_loss_scale=128.0, dtype=torch.float16)
    step = TrainStep(torch.optim.SGD(m.parameters(), lr=0.1), scaler=amp.make_scaler(), static_loss_scale=128.0,
                     max_consecutive_skips=3)

    def overflow():
        return step(m(torch.randn(2, 4)).sum() * 1e38)        # finite loss, infinite scaled gradients

    assert overflow().skipped and overflow().skipped
    assert not step(m(torch.randn(2, 4)).sum()).skipped       # resets the run of skips
    assert overflow().skipped and overflow().skipped
    with pytest.raises(NonFiniteLossError, match="3 consecutive AMP steps overflowed"):
        overflow()
    assert step.skipped_steps == 5 and step.step_count == 5


@pytest.mark.parametrize("amp", [False, True])
def test_an_injected_inf_loss_stops_before_the_step(amp):
    m = _lin()
    before = [p.detach().clone() for p in m.parameters()]
    cfg = AmpConfig(enabled=amp, device_type="cpu", static_loss_scale=128.0, dtype=torch.float16)
    step = TrainStep(torch.optim.SGD(m.parameters(), lr=0.1), scaler=cfg.make_scaler(),
                     static_loss_scale=128.0 if amp else None)
    with pytest.raises(NonFiniteLossError, match=r"step 1: \{'loss': inf\}"):
        step(m(torch.randn(2, 4)).sum() + torch.tensor(float("inf")))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)) and step.step_count == 0
