"""Physically compact CHEX training (chex_core.physical, issue 9): equivalence with masked training, optimizer /
scheduler / DDP / checkpoint / torch.compile behaviour across shape-changing rebuilds (T10, T16, T22)."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from chex_core import ChannelExplorer, ExplorationSchedule, apply_width_spec, resnet_groups
from chex_core.engine import TrainStep
from chex_core.physical import (PhysicalTraining, channel_layout, configure_compile, ddp_wrapper,
                                expand_state_dict, rebuild_optimizer, repoint_scheduler)

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_basic, tiny_bottleneck  # noqa: E402


MAKERS = {"basic": tiny_basic, "bottleneck": tiny_bottleneck}
# events after steps 3, 6 and 9 (ΔT = 1 unit of 3 steps, T_max = 3 units)
SCHEDULE = dict(interval=1, t_max=3, sparsity=0.5, delta0=0.3, steps_per_unit=3)


def sgd(model: nn.Module, lr: float = 0.01, adam: bool = False) -> torch.optim.Optimizer:
    """Two groups as in CLS: conv/fc with weight decay, BN γ/β without."""
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in bn], "weight_decay": 5e-4},
              {"params": [p for p in model.parameters() if id(p) in bn], "weight_decay": 0.0}]
    if adam:
        return torch.optim.Adam(groups, lr=1e-3)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def batches(n: int, seed: int = 7, bs: int = 16, px: int = 32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, px, px, generator=g).to(dtype), torch.randint(0, 10, (bs,), generator=g))
            for _ in range(n)]


def setup(arch: str, compact: bool, *, downsample=False, mode="explore", adam=False, residual=False,
          dtype=torch.float32, **kw):
    model = MAKERS[arch]().to(dtype)
    groups = resnet_groups(model, include_downsample=downsample, residual=residual)
    ex = ChannelExplorer(model, groups, ExplorationSchedule(**SCHEDULE), seed=3, min_channels=2)
    opt = sgd(model, adam=adam)
    ex.start(opt)
    phys = None
    if compact:
        phys = PhysicalTraining(model, ex, opt, mode=mode, **kw)
        phys.start()
    return model, ex, opt, phys


def train(model, ex, opt, phys, data, first_step: int = 1):
    for step, (x, y) in enumerate(data, start=first_step):
        o = phys.optimizer if phys is not None else opt
        net = phys.train_model if phys is not None else model
        loss = nn.functional.cross_entropy(net(x), y)
        o.zero_grad()
        loss.backward()
        o.step()
        (phys or ex).after_step(step, o)


def momentum_by_name(model, opt, key="momentum_buffer"):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: s[key] for p, s in opt.state.items() if key in s}


# --------------------------------------------------------------------------------------------------- equivalence
# Compact and masked runs compute the same sums in other orders (other shapes, so other kernels and blockings). In fp32
# (rounding 6e-8) the two runs end up to 4e-3 apart after these 10 steps, or pick other channels, depending on which
# CPU kernels run: an amplification of up to ~1e5. So the equivalence is checked in float64: rounding 1.1e-16 times
# that amplification bounds the drift by ~1e-11 (observed: <= 5e-16 with AVX-512, AVX2 and baseline x86-64 kernels).
# F64_TOL sits 10x above that bound and far below what a real fault moves: a dropped momentum entry or a misplaced
# channel changes weights by ~lr*|grad| ~ 1e-4, an fp32 round trip of the weights by ~1e-9. With residual groups the
# tiny bottleneck's few-channel streams amplify rounding the most, which float64 absorbs the same way.
F64_TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.mark.numerics
@pytest.mark.parametrize("arch,downsample,residual", [("basic", False, False), ("bottleneck", False, False),
                                                       ("bottleneck", True, False), ("basic", False, True),
                                                       ("bottleneck", False, True)])
def test_compact_follows_masked_trajectory(arch, downsample, residual):
    """Same seed and data: after 10 steps spanning 3 events, the compact run mapped back to full size equals the
    masked run (float64, F64_TOL), with identical masks, MRU store and momentum; and the compact model is smaller.
    With residual groups the whole stream (stem, block outputs, shortcuts, classifier input) narrows too."""
    data = batches(10, dtype=torch.float64)
    m_model, m_ex, m_opt, _ = setup(arch, False, downsample=downsample, residual=residual, dtype=torch.float64)
    train(m_model, m_ex, m_opt, None, data)
    c_model, c_ex, _, phys = setup(arch, True, downsample=downsample, residual=residual, dtype=torch.float64)
    train(c_model, c_ex, None, phys, data)

    assert m_ex.event_count == c_ex.event_count == 3 and phys.rebuilds == 4      # start + 3 events
    for k in m_ex.masks:
        assert torch.equal(m_ex.masks[k], c_ex.masks[k]), k
    full = phys.full_state_dict()
    ref = m_model.state_dict()
    assert full.keys() == ref.keys()
    active = {n: m_ex.masks[g.name] for g in m_ex.groups if g.kind != "downsample" for n in g.norms}
    for k, v in ref.items():
        if k.endswith(("running_mean", "running_var")) and k.rpartition(".")[0] in active:
            keep = active[k.rpartition(".")[0]]
            # pruned channels' running stats are not on the compact model (their MRU copies are compared below)
            torch.testing.assert_close(full[k][keep], v[keep], **F64_TOL, msg=k)
        else:
            torch.testing.assert_close(full[k], v, **F64_TOL, msg=k)
    for g, e in m_ex.mru.items():
        for kk, vv in e.items():
            torch.testing.assert_close(c_ex.mru[g][kk], vv, **F64_TOL, msg=f"{g} {kk}")
    m_mom = momentum_by_name(m_model, m_opt)
    c_mom = expand_state_dict(momentum_by_name(c_model, phys.optimizer), c_ex.groups, phys.held)
    for k, v in m_mom.items():
        torch.testing.assert_close(c_mom[k], v, **F64_TOL, msg=k)
    n_dense = sum(p.numel() for p in m_model.parameters())
    n_compact = sum(p.numel() for p in c_model.parameters())
    assert n_compact < 0.85 * n_dense
    for g in c_ex.groups:                    # the live model holds exactly the active channels
        if g.kind != "downsample":
            width = int(c_ex.masks[g.name].sum())
            assert all(c_model.get_submodule(p).weight.shape[0] == width for p in g.producers)
            assert all(c_model.get_submodule(n).running_mean.shape[0] == width for n in g.norms)
            assert all(c_model.get_submodule(c).weight.shape[1] == width for c in g.consumers)
    if residual:
        assert c_model.fc.in_features == int(c_ex.masks["layer4.residual"].sum()) < m_model.fc.in_features


@pytest.mark.numerics
def test_frozen_mode_compacts_once_after_t_max():
    data = batches(11, dtype=torch.float64)
    m_model, m_ex, m_opt, _ = setup("basic", False, dtype=torch.float64)
    train(m_model, m_ex, m_opt, None, data)
    c_model, c_ex, _, phys = setup("basic", True, mode="frozen", dtype=torch.float64)
    assert not phys.compact
    train(c_model, c_ex, None, phys, data[:8])
    assert not phys.compact and phys.rebuilds == 0
    train(c_model, c_ex, None, phys, data[8:], first_step=9)        # step 9 is the last event
    assert phys.compact and phys.rebuilds == 1
    full = phys.full_state_dict()
    for k, v in m_model.state_dict().items():
        if "running" not in k:
            torch.testing.assert_close(full[k], v, **F64_TOL, msg=k)


# --------------------------------------------------------------------------------------------------- optimizer (T16)
@pytest.mark.parametrize("adam", [False, True])
def test_optimizer_state_transplanted_by_index(adam):
    """At a rebuild every state tensor is the index_select of the old one for channels active before and after,
    zero for regrown channels; hyper-parameters and group membership (the no-wd BN group) are unchanged."""
    data = batches(3)
    model, ex, _, phys = setup("bottleneck", True, adam=adam)
    train(model, ex, None, phys, data[:2])
    old_opt = phys.optimizer
    x, y = data[2]
    nn.functional.cross_entropy(phys.train_model(x), y).backward()
    old_opt.step()
    old_held = {k: v.clone() for k, v in phys.held.items()}
    keys = ("exp_avg", "exp_avg_sq") if adam else ("momentum_buffer",)
    old_state = {k: expand_state_dict(momentum_by_name(model, old_opt, k), ex.groups, old_held) for k in keys}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in old_opt.param_groups]
    assert phys.after_step(3, old_opt) is not None                   # step 3: an event → rebuild
    new_opt = phys.optimizer
    assert new_opt is not old_opt and type(new_opt) is type(old_opt)
    assert [{k: v for k, v in g.items() if k != "params"} for g in new_opt.param_groups] == hyper
    # exactly the model's parameters, no stale ones; the BN group holds exactly the BN parameters
    assert {id(p) for g in new_opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)}
    assert {id(p) for p in new_opt.param_groups[1]["params"]} == bn
    size = {g.name: g.size for g in ex.groups}

    def active(held, name):
        m = torch.zeros(size[name], dtype=torch.bool)
        m[held[name]] = True
        return m

    layout = channel_layout(ex.groups)
    n_regrown = sum(int((active(phys.held, g) & ~active(old_held, g)).sum()) for g in phys.held)
    for key in keys:
        new = expand_state_dict(momentum_by_name(model, new_opt, key), ex.groups, phys.held)
        for name, old in old_state[key].items():
            expected = old.clone()
            was = now = torch.ones(old.shape, dtype=torch.bool)
            for dim, g in layout.get(tuple(name.rsplit(".", 1)), {}).items():
                shape = [1] * old.dim()
                shape[dim] = -1
                expected = expected * active(phys.held, g).to(old.dtype).view(shape)
                was, now = was & active(old_held, g).view(shape), now & active(phys.held, g).view(shape)
            # kept channels: the old values (index_select); regrown: zero (they were zero in the old expansion),
            # except Adam's second moment, which starts at the mean of the entries that stay live; pruned now: gone
            if key == "exp_avg_sq" and (now & ~was).any():
                expected[now & ~was] = expected[now & was].mean()
            assert torch.equal(new[name], expected), name
    assert n_regrown > 0
    if adam:
        assert all(float(new_opt.state[p]["step"]) == 3.0 for p in model.parameters())


def test_param_group_policy_and_errors():
    model, ex, _, _ = setup("basic", False)
    opt = sgd(model)

    def policy(m):                              # the CLS policy: conv/fc, then BN
        bn = {id(p) for mm in m.modules() if isinstance(mm, nn.BatchNorm2d) for p in mm.parameters(recurse=False)}
        return [[p for p in m.parameters() if id(p) not in bn], [p for p in m.parameters() if id(p) in bn]]

    phys = PhysicalTraining(model, ex, opt, param_groups=policy)
    phys.start()
    assert phys.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert len(phys.optimizer.param_groups[1]["params"]) == sum(
        1 for m in model.modules() if isinstance(m, nn.BatchNorm2d)) * 2
    with pytest.raises(ValueError, match="groups"):
        rebuild_optimizer(phys.optimizer, {}, model=model, param_groups=lambda m: [list(m.parameters())])
    with pytest.raises(ValueError, match="exactly"):
        rebuild_optimizer(phys.optimizer, {}, model=model,
                          param_groups=lambda m: [list(m.parameters())[:3], list(m.parameters())[3:5]])
    with pytest.raises(ValueError, match="unwrapped model"):
        PhysicalTraining(tiny_basic(), ex, opt)
    with pytest.raises(ValueError, match="mode"):
        PhysicalTraining(model, ex, opt, mode="sometimes")
    fresh = tiny_basic()
    fresh_ex = ChannelExplorer(fresh, resnet_groups(fresh), ExplorationSchedule(**SCHEDULE))
    with pytest.raises(RuntimeError, match="explorer.start"):
        PhysicalTraining(fresh, fresh_ex, sgd(fresh)).start()
    with pytest.raises(RuntimeError, match="not PhysicalTraining.optimizer"):
        phys.after_step(1, opt)                 # a loop still holding the pre-rebuild optimizer


def test_rebuild_keeps_channels_last():
    model = tiny_bottleneck().to(memory_format=torch.channels_last)
    ex = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(**SCHEDULE), min_channels=2)
    opt = sgd(model)
    ex.start(opt)
    phys = PhysicalTraining(model, ex, opt)
    phys.start()
    conv2 = model.layer1[0].conv2.weight
    assert conv2.shape[0] < 8 and conv2.shape[1] < 8                 # narrowed on both dims
    assert conv2.is_contiguous(memory_format=torch.channels_last)
    train(model, ex, None, phys, batches(3, bs=4, px=16))           # an event: widen → explore → narrow
    assert model.layer1[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_backbone_inside_a_larger_network():
    """DET/SEG shape: the explorer works on a backbone, the optimizer and the wrapper cover the whole network."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_basic()
            self.head = nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.backbone(x))

    net = Net()
    ex = ChannelExplorer(net.backbone, resnet_groups(net.backbone), ExplorationSchedule(**SCHEDULE), min_channels=2)
    opt = sgd(net)
    ex.start(opt)
    wrapped = []
    phys = PhysicalTraining(net.backbone, ex, opt, root=net, wrap=lambda m: wrapped.append(m) or m)
    phys.start()
    g = torch.Generator().manual_seed(0)
    for step in range(1, 5):                                          # event after step 3
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)
        nn.functional.cross_entropy(phys.train_model(x), y).backward()
        phys.optimizer.step()
        phys.optimizer.zero_grad()
        phys.after_step(step, phys.optimizer)
    assert phys.rebuilds == 2 and all(m is net for m in wrapped)
    assert {id(p) for gr in phys.optimizer.param_groups for p in gr["params"]} == {id(p) for p in net.parameters()}
    with pytest.raises(ValueError, match="sub-module"):
        PhysicalTraining(net.backbone, ex, opt, root=tiny_basic())


# ------------------------------------------------------------------------------------------- scheduler, TrainStep
def test_trainstep_and_lr_scheduler_follow_rebuilds():
    model = tiny_basic()
    ex = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(**SCHEDULE), seed=3, min_channels=2)
    opt = sgd(model, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ex.start(opt)
    trainer = TrainStep(opt, scaler=scaler, lr_scheduler=sched)
    phys = PhysicalTraining(model, ex, opt, lr_scheduler=sched, trainer=trainer)
    trainer.explorer = phys
    phys.start()
    assert sched.optimizer is phys.optimizer is trainer.optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "optimizer.step() overridden / order" warnings after re-pointing
        for x, y in batches(7, bs=8, px=16):
            result = trainer({"loss": nn.functional.cross_entropy(phys.train_model(x), y)})
            assert result.stepped
    assert phys.rebuilds == 3 and trainer.step_count == 7
    assert sched.optimizer is phys.optimizer is trainer.optimizer
    for g in phys.optimizer.param_groups:       # the schedule kept running on the new optimizers
        assert g["lr"] == pytest.approx(0.1 / (1 + 7))
    with pytest.raises(ValueError, match="base LRs"):
        repoint_scheduler(sched, torch.optim.SGD(model.parameters(), lr=0.1))


# --------------------------------------------------------------------------------------------------- checkpoints
def test_resume_from_checkpoint_taken_on_rebuilt_model(tmp_path):
    """Straight 9 steps vs 4 steps → save → rebuild from a fresh dense model → 5 more steps: bitwise equal."""
    data = batches(9, bs=8, px=16)
    model, ex, _, phys = setup("bottleneck", True)
    train(model, ex, None, phys, data)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, ex, _, phys = setup("bottleneck", True)
    train(model, ex, None, phys, data[:4])
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict(), "optimizer": phys.optimizer.state_dict(),
                "explorer": ex.state_dict(), "physical": phys.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)

    fresh = tiny_bottleneck(seed=123)                # different init: everything must come from the checkpoint
    fresh_ex = ChannelExplorer(fresh, resnet_groups(fresh), ExplorationSchedule(**SCHEDULE), seed=3, min_channels=2)
    fresh_phys = PhysicalTraining(fresh, fresh_ex, sgd(fresh))
    fresh_phys.load_state_dict(ckpt["physical"], explorer_state=ckpt["explorer"], model_state=ckpt["state_dict"],
                               optimizer_state=ckpt["optimizer"])
    assert fresh_phys.width_spec() == ckpt["physical"]["width_spec"]
    train(fresh, fresh_ex, None, fresh_phys, data[4:], first_step=5)
    for k, v in straight.items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # the width spec also rebuilds the architecture for a strict load (export / evaluation path)
    arch = apply_width_spec(tiny_bottleneck(), ckpt["physical"]["width_spec"])
    arch.load_state_dict(ckpt["state_dict"], strict=True)

    masked_ex = ChannelExplorer(tiny_bottleneck(), resnet_groups(tiny_bottleneck()), ExplorationSchedule(**SCHEDULE))
    with pytest.raises(ValueError, match="compact-training"):
        PhysicalTraining(masked_ex.model, masked_ex, sgd(masked_ex.model)).load_state_dict(
            {"masks": {}}, explorer_state=ckpt["explorer"])


# ------------------------------------------------------------------------------------------- torch.compile (T22)
def test_compile_recompiles_bounded_by_events_and_never_falls_back_silently():
    """Counting backend (eager semantics; Inductor is too slow to compile on the CPU CI): one compile at start and
    one per event; with the recompile limit below that, training fails loudly instead of running eager."""
    import torch._dynamo
    import torch._dynamo.config as dcfg

    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(tuple(tuple(t.shape) for t in example_inputs if torch.is_tensor(t))[:1])
        return gm.forward

    saved = (dcfg.recompile_limit, dcfg.accumulated_recompile_limit, dcfg.fail_on_recompile_limit_hit)
    try:
        torch._dynamo.reset()
        data = batches(7, bs=4, px=16)
        limit = configure_compile(n_events=2)
        assert limit >= 4 and dcfg.fail_on_recompile_limit_hit
        model, ex, _, phys = setup("basic", True, wrap=lambda m: torch.compile(m, backend=counting_backend))
        train(model, ex, None, phys, data)       # events after steps 3 and 6
        assert phys.rebuilds == 3
        assert 2 <= len(compiles) <= ex.event_count + 1      # recompiled for the new shapes, once per rebuild
        # a limit below the number of rebuilds is an error, not a silent eager fallback
        torch._dynamo.reset()
        dcfg.recompile_limit = 1
        compiles.clear()
        model, ex, _, phys = setup("basic", True, wrap=lambda m: torch.compile(m, backend=counting_backend))
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            train(model, ex, None, phys, data)
    finally:
        dcfg.recompile_limit, dcfg.accumulated_recompile_limit, dcfg.fail_on_recompile_limit_hit = saved
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------- DDP (T10)
def _ddp_worker(rank, world, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_bottleneck(seed=0)
        ex = ChannelExplorer(model, resnet_groups(model, include_downsample=True),
                             ExplorationSchedule(1, 2, 0.5, 0.3, steps_per_unit=2), seed=11, min_channels=2)
        opt = sgd(model, lr=0.05)
        ex.start(opt)
        phys = PhysicalTraining(model, ex, opt, wrap=ddp_wrapper())
        phys.start()
        g = torch.Generator().manual_seed(1000 + rank)          # different data per rank on purpose
        records = []
        for step in range(1, 6):                                 # events after steps 2 and 4
            x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = nn.functional.cross_entropy(phys.train_model(x), y)
            phys.optimizer.zero_grad()
            loss.backward()
            phys.optimizer.step()
            changed = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
            report = phys.after_step(step, phys.optimizer)
            ddp_params = {id(p) for p in phys.train_model.parameters()}
            records.append({
                "step": step, "event": report is not None, "rebuilds": phys.rebuilds,
                "params": [p.detach().clone() for p in model.parameters()],
                "opt_is_model": {id(p) for gr in phys.optimizer.param_groups for p in gr["params"]}
                == {id(p) for p in model.parameters()} == ddp_params,
                "producer_changed": min(changed[f"{gr.producer}.weight"] for gr in ex.groups),
                "widths": phys.width_spec()})
        out = [None] * world
        dist.all_gather_object(out, records)
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "ddp.pt"))
        dist.barrier()   # tearing gloo down while the other rank is mid-collective aborts the process
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_rewrap_keeps_ranks_identical(tmp_path):
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    import time
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    a, b = torch.load(tmp_path / "ddp.pt", weights_only=False)
    assert [r["step"] for r in a if r["event"]] == [2, 4]
    assert a[-1]["rebuilds"] == 3
    for ra, rb in zip(a, b):
        assert ra["widths"] == rb["widths"]
        for pa, pb in zip(ra["params"], rb["params"]):
            assert torch.equal(pa, pb), f"ranks differ after step {ra['step']}"
        assert ra["opt_is_model"] and rb["opt_is_model"]
        assert ra["producer_changed"] > 0          # every pruned layer still trains after a rebuild (F4)
    assert a[2]["widths"] != a[0]["widths"] or a[4]["widths"] != a[2]["widths"]


# --------------------------------------------------------------------------------------------------- benchmark smoke
def test_training_cost_benchmark_quick(capsys):
    from benchmarks import training_cost

    # l1 CSS: QR on resnet18 is the slow part of an event and is not what this smoke test is about
    res = training_cost.main(["--quick", "--sparsities", "0.7", "--criterion", "l1"])
    rows = {r["config"]: r for r in res["measured"]}
    assert set(rows) == {"dense", "masked S=0.7", "compact S=0.7", "compact k=0.7"}
    assert rows["compact S=0.7"]["macs_vs_dense"] < 0.5 and rows["masked S=0.7"]["macs_vs_dense"] < 0.5
    assert rows["compact S=0.7"]["macs_vs_dense"] < rows["compact k=0.7"]["macs_vs_dense"] < 1.0
    for clock, per_s in res["projection"].items():
        p = per_s["S=0.7"]
        assert p["events"] == 3 and 0.3 < p["mean_density"] < 0.6 and 0 < p["compact_vs_dense"]
        assert p["train_macs_vs_dense"] < 0.7
    assert "projected whole run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        training_cost.main(["--quick", "--sparsities", "1.5"])
    assert err.value.code == 2
