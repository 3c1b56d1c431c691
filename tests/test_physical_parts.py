"""The parts chex_core's explorer, compact export and compact training share: the channel layout, the masking helper,
and the one function that touches torch's private LR-scheduler attributes (pinned to the tested torch version)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from chex_core import ChannelExplorer, ExplorationSchedule, group_layout, model_layout, resnet_groups
from chex_core.groups import ChannelGroup
from chex_core.layout import tensor_dims
from chex_core.masking import fill_regrown_second_moments, mask_multipliers
from chex_core.physical import TESTED_TORCH, PhysicalTraining, expand_state_dict, repoint_scheduler
from conftest import tiny_basic, tiny_bottleneck


# --------------------------------------------------------------------------------------------------- layout
def test_layout_lists_every_tensor_of_a_group_by_role():
    model = tiny_bottleneck()
    g = next(g for g in resnet_groups(model) if g.name == "layer1.0.conv1")
    lay = group_layout(g)
    assert [(s.module, s.tensor, s.dim, s.key) for s in lay.slices] == [
        ("layer1.0.conv1", "weight", 0, "producer.weight"), ("layer1.0.conv1", "bias", 0, "producer.bias"),
        ("layer1.0.bn1", "weight", 0, "norm.weight"), ("layer1.0.bn1", "bias", 0, "norm.bias"),
        ("layer1.0.bn1", "running_mean", 0, "norm.running_mean"), ("layer1.0.bn1", "running_var", 0,
                                                                    "norm.running_var"),
        ("layer1.0.conv2", "weight", 1, "consumer0.weight")]
    mods = dict(model.named_modules())
    # a conv without bias has no bias slot on the live model
    assert [s.key for s, _ in lay.resolve(mods)] == [s.key for s in lay.slices if s.key != "producer.bias"]
    assert [s.key for s, _ in lay.parameters(mods)] == ["producer.weight", "norm.weight", "norm.bias",
                                                        "consumer0.weight"]
    dims = tensor_dims(model_layout(resnet_groups(model, include_downsample=True)))
    assert dims[("layer1.0.conv2", "weight")] == {0: "layer1.0.conv2", 1: "layer1.0.conv1"}
    assert ("layer1.0.downsample.0", "weight") not in dims           # full width in a compact model
    assert ("layer1.0.downsample.0", "weight") in tensor_dims(
        model_layout(resnet_groups(model, include_downsample=True)), narrowable_only=False)
    clash = ChannelGroup("x", "layer1.0.conv1", "layer1.0.bn1", ("layer1.0.conv2",), 8)
    with pytest.raises(ValueError, match="two channel groups"):
        tensor_dims(model_layout([g, ChannelGroup("y", "layer1.0.conv1", "layer1.0.bn1", (), 8), clash]))


def test_mask_multipliers_refuse_a_narrowed_model():
    model = tiny_bottleneck()
    ex = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(1, 3, 0.5, 0.3, steps_per_unit=3),
                         min_channels=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ex.start(opt)
    phys = PhysicalTraining(model, ex, opt)
    phys.start()                                    # narrowed; the explorer's cache was released
    with pytest.raises(ValueError, match="masks can only be applied to the dense model"):
        ex.apply_masks(phys.optimizer)
    with pytest.raises(ValueError, match="dense model"):
        mask_multipliers(dict(model.named_modules()), ex.layouts, ex.masks)


def test_fill_regrown_second_moments_touches_only_regrown_entries():
    p = nn.Parameter(torch.zeros(4, 3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(4, 3)
    opt.step()
    v = opt.state[p]["exp_avg_sq"]
    v.copy_(torch.arange(12.0).view(4, 3))
    was = torch.tensor([True, True, False, False]).view(4, 1).expand(4, 3)
    now = torch.tensor([True, False, True, False]).view(4, 1).expand(4, 3)
    assert fill_regrown_second_moments(opt, [(p, was, now)]) == 3
    assert v.tolist() == [[0, 1, 2], [3, 4, 5], [1, 1, 1], [9, 10, 11]]          # row 2 ← mean of row 0
    assert opt.state[p]["exp_avg"].count_nonzero() == 12                     # first moment left alone
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sgd.step()
    assert fill_regrown_second_moments(sgd, [(p, was, now)]) == 0            # nothing second-moment-like


@pytest.mark.numerics
def test_compact_and_masked_adam_give_regrown_channels_the_same_state():
    """Through an event, compact training transplants Adam's state exactly as masked training masks and fills it."""
    def run(compact: bool):
        model = tiny_bottleneck().double()            # float64: the two paths differ only by summation order
        ex = ChannelExplorer(model, resnet_groups(model, include_downsample=True),
                             ExplorationSchedule(1, 3, 0.5, 0.3, steps_per_unit=2), seed=3, min_channels=2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ex.start(opt)
        phys = PhysicalTraining(model, ex, opt) if compact else None
        if phys is not None:
            phys.start()
        g = torch.Generator().manual_seed(0)
        for step in range(1, 4):                                    # the event is after step 2
            o, net = (phys.optimizer, phys.train_model) if phys else (opt, model)
            x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (4,), generator=g)
            o.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            o.step()
            (phys or ex).after_step(step, o)
        o = phys.optimizer if phys else opt
        names = {id(p): n for n, p in model.named_parameters()}
        state = {names[id(p)]: s["exp_avg_sq"] for p, s in o.state.items()}
        return (expand_state_dict(state, ex.groups, phys.held) if phys else state), ex

    masked, ex = run(False)
    compact, _ = run(True)
    assert ex.event_count == 1
    for k, v in masked.items():
        torch.testing.assert_close(compact[k], v, rtol=1e-9, atol=1e-18, msg=k)


# --------------------------------------------------------------------------------------------------- scheduler
def _torch_major_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


SCHEDULER_HELP = (
    "chex_core/physical/scheduler.py::repoint_scheduler mirrors private LRScheduler internals of torch {tested} "
    "(scheduler.optimizer; optimizer.step._wrapped_by_lr_sched and optimizer._opt_called set by "
    "LRScheduler.__init__'s patch_track_step_called and read by LRScheduler.step's warnings; SequentialLR / "
    "ChainedScheduler._schedulers). This is torch {running}: read torch/optim/lr_scheduler.py, adapt "
    "repoint_scheduler if any of these changed, then set TESTED_TORCH there to the new version.")


def test_scheduler_patch_matches_torch_internals():
    help_text = SCHEDULER_HELP.format(tested=TESTED_TORCH, running=_torch_major_minor())
    assert _torch_major_minor() == TESTED_TORCH, help_text
    p = nn.Parameter(torch.zeros(2))
    old = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(old, lambda s: 0.5 ** s)
    # the markers torch's own scheduler puts on its optimizer are the ones repoint_scheduler reproduces
    assert getattr(old.step, "_wrapped_by_lr_sched", False) is True, help_text
    assert not getattr(old, "_opt_called", False), help_text
    p.grad = torch.ones(2)
    old.step()
    assert getattr(old, "_opt_called", False) is True, help_text
    sched.step()
    new = torch.optim.SGD([p], lr=old.param_groups[0]["lr"])
    repoint_scheduler(sched, new)
    assert getattr(new.step, "_wrapped_by_lr_sched", False) is True and new._opt_called, help_text
    sched.step()                                        # the next LR lands on the new optimizer only
    assert new.param_groups[0]["lr"] == 0.25 and old.param_groups[0]["lr"] == 0.5, help_text
    # re-pointed right after creation: no "overridden" / "order" warning at the first steps
    fresh_old = torch.optim.SGD([p], lr=1.0)
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_old, lambda s: 1.0)
    fresh_new = torch.optim.SGD([p], lr=1.0)
    repoint_scheduler(fresh, fresh_new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh_new.step()
        fresh.step()
    # composite schedulers: every child follows
    base = torch.optim.SGD([p], lr=1.0)
    seq = torch.optim.lr_scheduler.SequentialLR(
        base, [torch.optim.lr_scheduler.ConstantLR(base, 0.5, 2), torch.optim.lr_scheduler.ExponentialLR(base, 0.9)],
        milestones=[2])
    other = torch.optim.SGD([p], lr=1.0)
    repoint_scheduler(seq, other)
    assert seq.optimizer is other and all(s.optimizer is other for s in seq._schedulers), help_text
    with pytest.raises(ValueError, match="base LRs"):
        repoint_scheduler(sched, torch.optim.SGD([{"params": [p]}, {"params": [nn.Parameter(torch.zeros(1))]}]))


def test_layout_users_agree_on_a_basic_block():
    """Masks, MRU store and compact export read one layout: the masked multiplier of a BasicBlock conv2 is its
    input-side mask only (its output is the residual stream)."""
    model = tiny_basic()
    ex = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(1, 3, 0.5, 0.3))
    ex.start()
    pairs = {id(p): m for p, m in mask_multipliers(dict(model.named_modules()), ex.layouts, ex.masks)}
    m = pairs[id(model.layer1[0].conv2.weight)]
    assert torch.equal(m[0, :, 0, 0].bool(), ex.masks["layer1.0.conv1"]) and torch.equal(m[:, 0, 0, 0], torch.ones(8))
    assert set(ex.mru["layer1.0.conv1"]) == {"index", "producer.weight", "norm.weight", "norm.bias",
                                             "norm.running_mean", "norm.running_var", "consumer0.weight"}
