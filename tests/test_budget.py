"""FLOPs-target budgets and channel rounding."""
import argparse

import pytest
import torch
import torchvision

from chex_core import ChannelExplorer, ExplorationSchedule, compact_model, count_macs, flop_counter_macs, resnet_groups
from chex_core.budget import MacsModel, parse_flops, sparsity_for_macs
from chex_core.cli import add_chex_args, explorer_from_args, validate_chex_args
from conftest import tiny_bottleneck


def test_parse_flops():
    assert parse_flops("2G", 4_000) == 2_000_000_000
    assert parse_flops("500M", 1) == 500_000_000
    assert parse_flops("2e9", 1) == 2_000_000_000
    assert parse_flops("0.25", 4_000) == 1_000
    for bad in ("abc", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_flops(bad, 100)


def test_macs_model_matches_counters_on_masked_and_compact_models():
    model = tiny_bottleneck()
    groups = resnet_groups(model, include_downsample=True)
    mm = MacsModel(model, groups, (3, 32, 32))
    assert mm.dense() == count_macs(model, (3, 32, 32), zero_aware=False)
    ex = ChannelExplorer(model, groups, ExplorationSchedule(1, 2, 0.6, 0.3))
    ex.start()
    assert mm.macs(ex.widths()) == count_macs(model, (3, 32, 32))
    inner = [g for g in groups if g.kind == "inner"]
    small, _ = compact_model(model, inner, ex.masks)
    assert flop_counter_macs(small, (3, 32, 32)) == MacsModel(model, inner, (3, 32, 32)).macs(ex.widths())


def _explore_to_end(model, ex, n_events):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ex.start(opt)
    for step in range(1, n_events + 1):
        loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ex.after_step(step, opt)


@pytest.mark.parametrize("target_fraction", [0.3, 0.55])
def test_target_flops_lands_within_2_percent(target_fraction):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    groups = resnet_groups(model)
    parser = argparse.ArgumentParser()
    add_chex_args(parser)
    args = parser.parse_args(["--grow_prune", "--target-flops", str(target_fraction), "--init_channel_ratio", "0.1",
                              "--delta_T", "1", "--T_max", "3"])
    validate_chex_args(parser, args)
    ex = explorer_from_args(args, model, groups, steps_per_unit=1, input_size=(3, 32, 32))
    dense = count_macs(model, (3, 32, 32), zero_aware=False)
    _explore_to_end(model, ex, 3)
    final = count_macs(model, (3, 32, 32))
    assert final <= target_fraction * dense
    assert final == pytest.approx(target_fraction * dense, rel=0.02)


def test_infeasible_target_is_a_clear_error():
    model = torchvision.models.resnet18()
    mm = MacsModel(model, resnet_groups(model), (3, 224, 224))
    with pytest.raises(ValueError, match="cannot be met"):
        sparsity_for_macs(mm, int(0.05 * mm.dense()))
    with pytest.raises(ValueError, match="not below"):
        sparsity_for_macs(mm, mm.dense() + 1)
    parser = argparse.ArgumentParser(prog="x")
    add_chex_args(parser)
    args = parser.parse_args(["--grow_prune", "--target-flops", "0.05"])
    with pytest.raises(SystemExit):
        explorer_from_args(args, model, resnet_groups(model), 1, parser=parser)


def test_round_to_keeps_widths_multiples():
    model = tiny_bottleneck()
    groups = resnet_groups(model)
    ex = ChannelExplorer(model, groups, ExplorationSchedule(1, 3, 0.6, 0.3), round_to=4)
    _explore_to_end(model, ex, 3)
    for g in groups:
        w = ex.widths()[g.name]
        assert w % 4 == 0 or w == g.size
