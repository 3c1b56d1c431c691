"""Compact export equals the masked model; width specs rebuild it; the FLOPs counters agree."""
import io

import pytest
import torch
import torchvision
from torch import nn

from chex_core import (ChannelExplorer, ExplorationSchedule, apply_width_spec, compact_model, count_macs,
                       count_params, flop_counter_macs, resnet_groups)
from conftest import tiny_bottleneck


def random_masks(groups, keep=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in groups:
        k = max(1, int(grp.size * keep))
        m = torch.zeros(grp.size, dtype=torch.bool)
        m[torch.randperm(grp.size, generator=g)[:k]] = True
        masks[grp.name] = m
    return masks


# Compact vs masked forward in float64: both sides sum the same terms in other orders (a narrower conv skips exact
# zeros, other shapes pick other kernels), so they differ by rounding only: 1.1e-16 per op over <= 4608-term sums and
# ~100 layers bounds the difference by ~1e-10 of the activation scale (observed <= 1e-14, logits ~ 5), while a wrong
# channel or BN slice changes the logits by > 1e-3. fp32 kernels differ by ~1e-6 here, depending on the CPU.
F64_TOL = dict(atol=1e-9, rtol=1e-9)


def masked_copy(model, groups, masks):
    ex = ChannelExplorer(model, groups, ExplorationSchedule(1, 1, 0.5, 0.0))
    ex.masks = masks
    ex._build_cache()
    ex.apply_masks()
    return model


def randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_compact_equals_masked_torchvision(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    randomise_bn(model)
    groups = resnet_groups(model)
    masks = random_masks(groups)
    masked_copy(model, groups, masks)
    small, spec = compact_model(model, groups, masks)
    model.eval(), small.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small.double()(x.double()), model.double()(x.double()), **F64_TOL)
    small.float()
    assert count_params(small, zero_aware=False) < count_params(model, zero_aware=False)
    # the width spec rebuilds the compact architecture and its state_dict loads strictly (weights_only)
    buf = io.BytesIO()
    torch.save({"state_dict": small.state_dict(), "cfg": spec}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    rebuilt = apply_width_spec(getattr(torchvision.models, arch)(num_classes=10), ck["cfg"])
    rebuilt.load_state_dict(ck["state_dict"], strict=True)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), small(x))


def test_macs_conventions_agree_and_match_the_paper():
    model = torchvision.models.resnet50()
    dense = flop_counter_macs(model)
    assert dense == pytest.approx(4.089e9, rel=1e-3)               # the paper's "4.1 GFLOPs"
    assert count_macs(model, zero_aware=False) == dense
    groups = resnet_groups(model)
    masks = random_masks(groups, keep=0.3)
    masked_copy(model, groups, masks)
    small, _ = compact_model(model, groups, masks)
    zero_aware = count_macs(model)
    assert flop_counter_macs(small) == count_macs(small, zero_aware=False)
    assert zero_aware == pytest.approx(flop_counter_macs(small), rel=1e-6)
    assert zero_aware < 0.5 * dense


@pytest.mark.numerics
def test_downsample_masks_stay_full_width_and_compact_still_equals_masked():
    model = tiny_bottleneck()
    groups = resnet_groups(model, include_downsample=True)
    masks = random_masks(groups, keep=0.5, seed=1)
    masked_copy(model, groups, masks)
    small, spec = compact_model(model, groups, masks)
    assert not any("downsample" in k for k in spec)
    assert small.layer2[0].downsample[0].out_channels == model.layer2[0].downsample[0].out_channels
    model.eval(), small.eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(small.double()(x), model.double()(x), **F64_TOL)
    # the zero-aware count credits the masked shortcut; the compact model cannot realise it
    assert count_macs(model) < flop_counter_macs(small)


def test_groupnorm_and_bad_specs_are_rejected():
    model = tiny_bottleneck()
    model.layer1[0].bn1 = nn.GroupNorm(2, 8)
    groups = resnet_groups(model)
    with pytest.raises(ValueError, match="GroupNorm"):
        compact_model(model, groups, random_masks(groups))
    with pytest.raises(ValueError, match="does not have"):
        apply_width_spec(tiny_bottleneck(), {"layer9.conv1": 3})
    with pytest.raises(ValueError, match="must be in"):
        apply_width_spec(tiny_bottleneck(), {"layer1.0.conv1": 0})
