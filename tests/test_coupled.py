"""Coupled residual channel groups (``resnet_groups(..., residual=True)``, ``--chex-residual``; issue 18): the
residual stream of every stage is one group with several producers, norms and consumers, and every guarantee of
internal groups holds for it — dead channels stay exactly zero everywhere they live, compact == masked, budgets are
exact, a resume continues bit for bit. (Two ranks: tests/test_distributed_explorer.py; compact training:
tests/test_physical.py; the three tasks: the end of this file.)"""
from __future__ import annotations

import argparse
import io
import os
import sys

import pytest
import torch
import torchvision
from torch import nn

from chex_core import (ChannelExplorer, ExplorationSchedule, apply_width_spec, compact_model, count_macs,
                       resnet_groups)
from chex_core.budget import MacsModel, _counts, keep_counts_for_macs, sparsity_for_macs
from chex_core.cli import add_chex_args, validate_chex_args
from chex_core.layout import group_layout

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_basic, tiny_bottleneck  # noqa: E402


MAKERS = {"basic": tiny_basic, "bottleneck": tiny_bottleneck}
PX = (3, 16, 16)


def explorer(model, sparsity=0.5, delta0=0.3, t_max=3, seed=3, **kw):
    """Events after steps 2, 4, 6 (ΔT = 1 unit of 2 steps, T_max = 3 units); the last one regrows nothing."""
    groups = resnet_groups(model, residual=True)
    return ChannelExplorer(model, groups, ExplorationSchedule(1, t_max, sparsity, delta0, steps_per_unit=2),
                           seed=seed, min_channels=2, **kw)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def steps(model, ex, opt, first, last, seed=0):
    g = torch.Generator().manual_seed(seed)
    for step in range(1, last + 1):
        x, y = torch.randn(8, *PX, generator=g), torch.randint(0, 10, (8,), generator=g)
        if step < first:
            continue
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ex.after_step(step, opt)


# ------------------------------------------------------------------------------------------------------ structure
def test_residual_groups_of_torchvision_resnets():
    """One group per residual stream, producers/norms/consumers as documented (docs/algorithm.md §2.1)."""
    r18 = {g.name: g for g in resnet_groups(torchvision.models.resnet18(), residual=True)}
    assert [n for n, g in r18.items() if g.kind == "residual"] == [f"layer{i}.residual" for i in range(1, 5)]
    l1 = r18["layer1.residual"]                  # no downsample in layer1: the stem writes the same stream
    assert l1.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2") and l1.norms == ("bn1", "layer1.0.bn2",
                                                                                          "layer1.1.bn2")
    assert l1.consumers == ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0")
    assert r18["layer2.residual"].producers == ("layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2")
    assert r18["layer4.residual"].consumers[-1] == "fc"
    r50 = {g.name: g for g in resnet_groups(torchvision.models.resnet50(), residual=True)}
    assert r50["conv1"].kind == "residual" and r50["conv1"].producers == ("conv1",)      # the stem is its own group
    assert r50["conv1"].consumers == ("layer1.0.conv1", "layer1.0.downsample.0")
    assert r50["layer3.residual"].producers == ("layer3.0.downsample.0", *(f"layer3.{i}.conv3" for i in range(6)))
    assert r50["layer3.residual"].size == 1024 and len(r50) == 32 + 5
    # errors: one clear line each
    with pytest.raises(ValueError, match="include_downsample cannot be combined"):
        resnet_groups(tiny_basic(), include_downsample=True, residual=True)
    trunk = tiny_basic()
    trunk.fc = nn.Identity()
    with pytest.raises(ValueError, match="stage_consumers"):
        resnet_groups(trunk, residual=True)
    with pytest.raises(ValueError, match="not a module"):
        resnet_groups(trunk, residual=True, stage_consumers={"layer4": ["head"]})


def test_flag_conflict_is_one_line_exit_2(capsys):
    parser = argparse.ArgumentParser()
    add_chex_args(parser)
    args = parser.parse_args(["--chex-residual", "--chex-prune-downsample"])
    with pytest.raises(SystemExit) as exc:
        validate_chex_args(parser, args)
    assert exc.value.code == 2 and "cannot be combined with --chex-residual" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ masking
def _dead_slices(ex, opt):
    """Every (name, values) of a pruned channel in every slot of every residual group: parameters, their momentum,
    and each stage's output activation (the stream itself)."""
    for lay in ex.layouts:
        if not lay.name.endswith(".residual") and lay.name != "conv1":
            continue
        dead = (~ex.masks[lay.name]).nonzero().flatten()
        for s, p in lay.parameters(ex._mods):
            yield f"{s.module}.{s.tensor}", p.detach().index_select(s.dim, dead)
            yield f"{s.module}.{s.tensor} momentum", opt.state[p]["momentum_buffer"].index_select(s.dim, dead)


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_dead_residual_channels_stay_zero_in_every_slot_and_in_the_stream(arch):
    model = MAKERS[arch]()
    ex, opt = explorer(model), sgd(model)
    ex.start(opt)
    steps(model, ex, opt, 1, 5)            # two events, then a plain step with momentum and weight decay
    slots = list(_dead_slices(ex, opt))
    assert {name.split(".")[0] for name, _ in slots} >= {"conv1", "bn1", "layer1", "layer4", "fc"}
    for name, values in slots:
        assert values.count_nonzero() == 0, name
    outputs = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        model.get_submodule(stage).register_forward_hook(lambda m, i, o, s=stage: outputs.__setitem__(s, o))
    model(torch.randn(4, *PX))              # train mode: batch statistics, the harder case
    for stage, out in outputs.items():
        dead = ~ex.masks[f"{stage}.residual"]
        assert out[:, dead].count_nonzero() == 0 and out[:, ~dead].count_nonzero() > 0, stage


# ------------------------------------------------------------------------------------------------------ decisions
def test_importance_is_the_mean_gamma_and_css_reads_every_producer():
    """The global ranking sees one importance per stream channel, the mean |γ| over the stream's norms (docs/
    algorithm.md §2.1); CSS reads the producers side by side, each at unit Frobenius norm; an internal group reads its
    producer's weight itself, as before."""
    model = tiny_basic()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
    ex = explorer(model)
    ex.start()
    imps = dict(zip(ex.masks, ex.importances()))
    g = next(g for g in ex.groups if g.name == "layer2.residual")
    gammas = torch.stack([model.get_submodule(n).weight.detach().abs() for n in g.norms])
    torch.testing.assert_close(imps[g.name], gammas.mean(0) * ex.masks[g.name], rtol=0, atol=0)
    assert torch.equal(imps["layer1.0.conv1"], model.layer1[0].bn1.weight.detach() * ex.masks["layer1.0.conv1"])
    assert ex.channel_weight("layer1.0.conv1").data_ptr() == model.layer1[0].conv1.weight.data_ptr()
    x = ex.channel_weight(g.name)
    blocks = [model.get_submodule(p).weight.detach().flatten(1) for p in g.producers]
    assert x.shape == (16, sum(b.shape[1] for b in blocks))
    torch.testing.assert_close(x, torch.cat([b.double() / b.double().norm() for b in blocks], dim=1))


def test_zeroed_stream_channels_are_found_in_a_masked_checkpoint():
    """CLS reports and scripts/export_compact.py compact a masked dense model by its zeros: a stream channel counts
    as pruned only when γ and β are zero in every norm of the stream."""
    from CLS import model as cls_model

    model = tiny_basic()
    ex = explorer(model)
    ex.start()
    found = cls_model.masks_from_zeros(model, ex.groups)
    for name, mask in ex.masks.items():
        assert torch.equal(found[name].cpu(), mask), name
    stream = next(g for g in ex.groups if g.name == "layer2.residual")
    with torch.no_grad():                    # one live norm is enough to keep a stream channel
        dead = int((~ex.masks[stream.name]).nonzero()[0])
        model.get_submodule(stream.norms[-1]).bias[dead] = 0.1
    assert bool(cls_model.masks_from_zeros(model, ex.groups)["layer2.residual"][dead])


# ------------------------------------------------------------------------------------------------------ compact
@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_compact_equals_masked_in_float64_and_rebuilds_from_its_spec(arch):
    model = MAKERS[arch]()
    ex, opt = explorer(model), sgd(model)
    ex.start(opt)
    steps(model, ex, opt, 1, 4)
    model = model.double().eval()
    small, spec = compact_model(model, ex.groups, ex.masks)
    small.eval()
    assert {k for k in spec if k.endswith(".residual")} == {f"layer{i}.residual" for i in range(1, 5)}
    x = torch.randn(3, *PX, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(small(x), ref, rtol=0, atol=1e-12)
        fresh = apply_width_spec(MAKERS[arch](seed=5), spec).double()      # the spec alone rebuilds the shape
        fresh.load_state_dict(small.state_dict(), strict=True)
        torch.testing.assert_close(fresh.eval()(x), ref, rtol=0, atol=1e-12)
    assert small.fc.in_features == spec["layer4.residual"] == int(ex.masks["layer4.residual"].sum())
    widths = ex.widths()
    macs = MacsModel(model, ex.groups, PX).macs(widths)
    assert macs == count_macs(model, PX) == count_macs(small, PX, zero_aware=False)


# ------------------------------------------------------------------------------------------------------ budgets
def test_residual_groups_reach_budgets_internal_groups_cannot():
    model = tiny_basic()
    inner = MacsModel(model, resnet_groups(model), PX)
    coupled = MacsModel(model, resnet_groups(model, residual=True), PX)
    target = int(0.1 * coupled.dense())
    assert inner.floor() > target > coupled.floor()
    with pytest.raises(ValueError, match="--chex-residual explores the residual stream"):
        sparsity_for_macs(inner, target)
    assert sparsity_for_macs(coupled, target).achieved <= target


def test_reach_table_of_choose_sparsity():
    """scripts/choose_sparsity.py --reach (the README's reach table): internal-only ResNet-18 cannot go below 8.3 %
    of its dense MACs; with residual groups every keep share reaches far less, and the floor is ~0.1 %."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import choose_sparsity

    r = choose_sparsity.reach("resnet18")
    assert r["internal"]["floor"] == pytest.approx(0.0830, abs=5e-4)
    assert r["internal"]["keep"][0.5] == pytest.approx(0.538, abs=1e-3)
    assert all(r["residual"]["keep"][k] < r["internal"]["keep"][k] / 2 for k in choose_sparsity.KEEP_SHARES)
    assert r["residual"]["floor"] < 0.002


@pytest.mark.parametrize("round_to", [1, 4])
def test_budget_is_exact_with_and_without_round_to(round_to):
    """Channel budget: exactly N − ⌊N·S⌋ channels kept (round_to 1), widths multiples of round_to otherwise.
    FLOPs budget: the largest MACs ≤ the target along the global ranking, equal to count_macs of the result."""
    model = tiny_bottleneck()
    ex = explorer(model, round_to=round_to)
    ex.start(sgd(model))
    keep, active = ex._budgets(0.0)
    sizes = [g.size for g in ex.groups]
    if round_to == 1:
        assert sum(keep) == sum(sizes) - int(sum(sizes) * 0.5)
    else:
        assert all(k % round_to == 0 or k == s for k, s in zip(keep, sizes))
    mm = MacsModel(model, ex.groups, PX)
    target = int(0.2 * mm.dense())
    imps, names = ex.importances(), [g.name for g in ex.groups]
    counts, sparsity = keep_counts_for_macs("global", imps, names, mm, target, 2, round_to)
    n_total = sum(sizes)
    n_drop = round(sparsity * n_total)
    assert mm.macs(dict(zip(names, counts))) <= target
    assert mm.macs(dict(zip(names, _counts("global", imps, n_drop - 1, n_total, 2, round_to)))) > target
    # and the explorer lands there at its last event (δ = 0), measured on the masked and the compact model
    model2 = tiny_bottleneck()
    ex2 = explorer(model2, round_to=round_to, target_macs=target, macs_model=MacsModel(model2, resnet_groups(
        model2, residual=True), PX))
    opt2 = sgd(model2)
    ex2.start(opt2)
    steps(model2, ex2, opt2, 1, 6)
    widths = ex2.widths()
    small, _ = compact_model(model2, ex2.groups, ex2.masks)
    assert count_macs(model2, PX) == count_macs(small, PX, zero_aware=False) == ex2.macs_model.macs(widths) <= target
    assert all(w % round_to == 0 or w == g.size for g, w in zip(ex2.groups, widths.values()))


# ------------------------------------------------------------------------------------------------------ resume
def _run(stop=None):
    model = tiny_bottleneck(0)
    ex = explorer(model, seed=7)
    opt = sgd(model)
    ex.start(opt)
    if stop is None:
        steps(model, ex, opt, 1, 8)
        return model, ex
    steps(model, ex, opt, 1, stop)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ex": ex.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = tiny_bottleneck(100)                   # another init: everything must come from the checkpoint
    ex2, opt2 = explorer(model2, seed=7), sgd(model2)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    ex2.load_state_dict(ck["ex"], opt2)
    steps(model2, ex2, opt2, stop + 1, 8)
    return model2, ex2


def test_resume_mid_run_is_bitwise():
    (ma, ea), (mb, eb) = _run(), _run(stop=3)       # events at 2, 4, 6: resume between two of them
    sa, sb = ma.state_dict(), mb.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k in ea.masks:
        assert torch.equal(ea.masks[k], eb.masks[k]), k
    for g, e in ea.mru.items():
        assert e.keys() == eb.mru[g].keys()
        for kk, v in e.items():
            assert torch.equal(v, eb.mru[g][kk]), (g, kk)
    assert "producer2.weight" in ea.mru["layer1.residual"]       # every producer's pruned filters are remembered


def test_internal_only_state_is_unchanged_and_refused_by_a_residual_run():
    """Explorer checkpoints of internal-only runs keep their format (same group names and MRU keys), so old ones
    load; loading one into a --chex-residual run is one error naming the flag."""
    model = tiny_basic()
    old = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(1, 3, 0.5, 0.3))
    old.start()
    state = old.state_dict()
    assert [n for n, _ in state["groups"]] == [g.producer for g in resnet_groups(model)]
    assert set(state["mru"]["layer1.0.conv1"]) == {"index", "producer.weight", "norm.weight", "norm.bias",
                                                  "norm.running_mean", "norm.running_var", "consumer0.weight"}
    assert group_layout(resnet_groups(model, residual=True)[-1]).slices[2].key == "producer1.weight"
    with pytest.raises(ValueError, match="--chex-residual"):
        explorer(tiny_basic()).load_state_dict(state)
