"""GPU-only checks (marker ``gpu``; skipped with the reason where torch sees no CUDA device). They cover what only
exists on CUDA: fp16 autocast with a dynamic GradScaler in the shared TrainStep, the explorer and compact training
on CUDA tensors (every rebuilt tensor stays on the GPU), and compact == masked with cuDNN kernels. Every other test
runs with CUDA hidden (conftest.py), so on a GPU machine the rest of the suite still checks the CPU semantics."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from chex_core import ChannelExplorer, ExplorationSchedule, compact_model, resnet_groups
from chex_core.engine import AmpConfig, TrainStep
from chex_core.physical import PhysicalTraining

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_basic, tiny_bottleneck  # noqa: E402
from test_compact_flops import F64_TOL as FORWARD_F64_TOL  # noqa: E402
from test_compact_flops import masked_copy, random_masks, randomise_bn  # noqa: E402
from test_physical import F64_TOL, SCHEDULE, batches, sgd, train  # noqa: E402

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _pruned_are_zero(model: nn.Module, explorer: ChannelExplorer) -> bool:
    for g in explorer.groups:
        off = ~explorer.masks[g.name].to(CUDA)
        for t in (model.get_submodule(g.producer).weight, model.get_submodule(g.norm).weight,
                  model.get_submodule(g.norm).bias):
            if torch.count_nonzero(t.detach()[off]) != 0:
                return False
    return True


def test_amp_fp16_trainstep_with_grad_scaler_on_cuda():
    """fp16 autocast + dynamic GradScaler: steps run in fp16, events fire on schedule, pruned channels stay exactly
    zero, and an overflowing step is skipped (parameters unchanged) while the scale backs off by half."""
    model = tiny_basic().to(CUDA)
    amp = AmpConfig(enabled=True, device_type="cuda")
    assert amp.autocast_dtype == torch.float16 and amp.uses_scaler
    scaler = amp.make_scaler()
    assert scaler.is_enabled()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    explorer = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(1, 2, 0.5, 0.2, steps_per_unit=2),
                               seed=0)
    explorer.start(opt)
    step = TrainStep(opt, scaler=scaler, explorer=explorer)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g).to(CUDA)
    y = torch.randint(0, 10, (16,), generator=g).to(CUDA)
    events, losses = [], []
    for _ in range(6):
        with amp.autocast():
            logits = model(x)
        assert logits.dtype == torch.float16
        result = step(nn.functional.cross_entropy(logits.float(), y))
        assert result.stepped and not result.skipped
        losses.append(result.losses["loss"])
        if result.event is not None:
            events.append(result.event.step)
    assert events == [2, 4] and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert _pruned_are_zero(model, explorer)

    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    with amp.autocast():
        logits = model(x)
    # finite as a loss (the all-reduced check passes), infinite once multiplied by the scale: an fp16 overflow
    result = step(nn.functional.cross_entropy(logits.float(), y) * 1e37)
    assert result.skipped and step.skipped_steps == 1
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_compact_training_follows_masked_trajectory_on_cuda(arch):
    """The CPU equivalence test (test_physical.py) on CUDA, float64: same masks, same parameters, every tensor of the
    rebuilt model and optimizer on the GPU."""
    maker = tiny_basic if arch == "basic" else tiny_bottleneck
    data = [(x.to(CUDA), y.to(CUDA)) for x, y in batches(10, dtype=torch.float64)]
    runs = []
    for compact in (False, True):
        model = maker().to(CUDA, torch.float64)
        explorer = ChannelExplorer(model, resnet_groups(model), ExplorationSchedule(**SCHEDULE), seed=3,
                                   min_channels=2)
        opt = sgd(model)
        explorer.start(opt)
        phys = PhysicalTraining(model, explorer, opt) if compact else None
        if phys is not None:
            phys.start()
        train(model, explorer, opt, phys, data)
        runs.append((model, explorer, phys))
    (m_model, m_ex, _), (c_model, c_ex, phys) = runs
    assert phys.rebuilds == 4
    for k in m_ex.masks:
        assert torch.equal(m_ex.masks[k], c_ex.masks[k]), k
    assert all(t.device.type == "cuda" for t in c_model.state_dict().values())
    assert all(t.device.type == "cuda" for s in phys.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
               and t.dim() > 0)
    full = phys.full_state_dict()
    for k, v in m_model.state_dict().items():
        if "running" not in k:
            torch.testing.assert_close(full[k], v, **F64_TOL, msg=k)


def test_compact_equals_masked_on_cuda():
    """cuDNN forward of the compact model == masked model (float64), and both == the CPU float64 result."""
    model = tiny_bottleneck()
    randomise_bn(model)
    groups = resnet_groups(model, include_downsample=True)
    masks = random_masks(groups, keep=0.5, seed=1)
    masked_copy(model, groups, masks)
    small, _ = compact_model(model, groups, masks)
    model.eval().double(), small.eval().double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        cpu = model(x)
        masked_gpu = model.to(CUDA)(x.to(CUDA))
        compact_gpu = small.to(CUDA)(x.to(CUDA))
    torch.testing.assert_close(compact_gpu, masked_gpu, **FORWARD_F64_TOL)
    torch.testing.assert_close(masked_gpu.cpu(), cpu, **FORWARD_F64_TOL)
