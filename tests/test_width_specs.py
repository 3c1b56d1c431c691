"""Width specs (``benchmarks/width_specs.py``): reading them from checkpoints and files, and the committed widths from
CHEX training that the CPU and GPU speed tables time."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from benchmarks import compact_speed, width_specs
from chex_core import compact_model, resnet_groups
from chex_core.checkpoint import save_checkpoint


def _masked_resnet18(seed: int = 0):
    """A resnet18 with some inner channels zeroed as an upstream release has them (γ = β = 0)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    groups = [g for g in resnet_groups(model) if g.kind == "inner"]
    masks, want = {}, {}
    for i, g in enumerate(groups):
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[torch.randperm(g.size)[: (i + 1) * 5]] = False
        norm = model.get_submodule(g.norm)
        with torch.no_grad():
            norm.weight[~keep] = 0
            norm.bias[~keep] = 0
        masks[g.name], want[g.producer] = keep, int(keep.sum())
    return model, groups, masks, want


def test_spec_from_upstream_style_compact_and_cfg_checkpoints(tmp_path):
    model, groups, masks, want = _masked_resnet18()
    # an upstream-style training checkpoint: dense shapes, DDP prefix, zeroed channels
    save_checkpoint({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 250},
                    str(tmp_path / "upstream.pth.tar"))
    assert width_specs.spec_from_checkpoint(tmp_path / "upstream.pth.tar", "resnet18") == want
    # a compact state dict: the shapes are the widths
    small, spec = compact_model(model, groups, masks)
    assert spec == want
    save_checkpoint({"state_dict": small.state_dict()}, str(tmp_path / "small.pth"))
    assert width_specs.spec_from_checkpoint(tmp_path / "small.pth", "resnet18") == want
    # CLS's compact.pth carries the spec as cfg
    save_checkpoint({"state_dict": small.state_dict(), "cfg": spec}, str(tmp_path / "compact.pth"))
    assert width_specs.spec_from_checkpoint(tmp_path / "compact.pth", "resnet18") == want
    with pytest.raises(width_specs.WidthSpecError, match="resnet50"):
        width_specs.spec_from_checkpoint(tmp_path / "upstream.pth.tar", "resnet50")


def test_from_checkpoint_cli_writes_a_file_compact_speed_reads(tmp_path, capsys):
    model, _, _, want = _masked_resnet18()
    save_checkpoint({"state_dict": model.state_dict()}, str(tmp_path / "a.pth"))
    out = tmp_path / "w.json"
    assert width_specs.main(["from-checkpoint", f"chex-1G={tmp_path / 'a.pth'}", "--arch", "resnet18",
                             "--out", str(out)]) == 0
    data = width_specs.load_specs(out)
    assert data["arch"] == "resnet18" and data["specs"]["chex-1G"]["width_spec"] == want
    assert data["specs"]["chex-1G"]["macs_224"] == width_specs.macs_224("resnet18", want)
    args = compact_speed.parse_args(["--arch", "resnet18", "--budgets", "1", "--widths-from", str(out)])
    assert args.reused["chex-1G"]["width_spec"] == want
    with pytest.raises(SystemExit) as e:
        width_specs.main(["from-checkpoint", "no-equals-sign", "--out", str(out)])
    assert e.value.code == 2 and "NAME=PATH" in capsys.readouterr().err


def test_load_specs_rejects_widths_that_do_not_fit(tmp_path):
    sizes = width_specs.group_sizes("resnet18")
    bad = dict(sizes, **{"layer1.0.conv1": 0})
    for spec, msg in ((bad, "out of range"), ({"layer9.conv1": 3}, "does not match")):
        p = tmp_path / "w.json"
        p.write_text(json.dumps({"format": width_specs.FORMAT, "arch": "resnet18", "specs": {"x": {"width_spec": spec}}}))
        with pytest.raises(width_specs.WidthSpecError, match=msg):
            width_specs.load_specs(p)
    p.write_text("{}")
    with pytest.raises(width_specs.WidthSpecError, match="neither"):
        width_specs.load_specs(p)


def test_rounded_widths_are_multiples_capped_at_full_width():
    sizes = {"a": 64, "b": 60}
    assert width_specs.rounded({"a": 1, "b": 57}, sizes, 8) == {"a": 8, "b": 60}


def test_train_runs_cls_with_a_flops_target_per_budget(tmp_path):
    args = width_specs.build_parser().parse_args(["train", "--epochs", "30", "--workdir", str(tmp_path)])
    cmd = width_specs.cls_command(args, "chex-0.8G", tmp_path / "ws")
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("-")}
    assert flag["--target-flops"] == "0.8G" and flag["--data-backend"] == "digits" and "--grow_prune" in cmd
    assert flag["--T_max"] == "22" and flag["--epochs"] == "30" and flag["--resume"] == "auto"
    assert "--chex-residual" not in cmd
    res = width_specs.build_parser().parse_args(["train", "--residual", "--workdir", str(tmp_path)])
    cmd = width_specs.cls_command(res, "chex-3G", tmp_path / "ws")
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("-")}
    # --chex-residual: 3G implies S = 0.148 once the streams count, so δ0 must sit below it
    assert "--chex-residual" in cmd and float(flag["--init_channel_ratio"]) < 0.148
    assert width_specs.spec_name("chex-3G", True) == "chex-res-3G"


def test_residual_specs_load_and_name_their_streams(tmp_path):
    """Specs of --chex-residual runs name the residual streams besides every inner group; nothing else is allowed."""
    sizes = width_specs.group_sizes("resnet18", residual=True)
    spec = {k: max(1, n // 2) for k, n in sizes.items()}
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"format": width_specs.FORMAT, "arch": "resnet18", "specs": {"chex-res-1G": {
        "width_spec": spec}}}))
    assert width_specs.load_specs(p)["specs"]["chex-res-1G"]["width_spec"] == spec
    assert width_specs.keep_residual("resnet18", spec)["layer4.residual"] == 0.5
    assert width_specs.macs_224("resnet18", spec) < width_specs.macs_224(
        "resnet18", {k: w for k, w in spec.items() if not k.endswith(".residual")})
    p.write_text(json.dumps({"format": width_specs.FORMAT, "arch": "resnet18", "specs": {"x": {
        "width_spec": {**spec, "layer9.residual": 3}}}}))
    with pytest.raises(width_specs.WidthSpecError, match="does not match"):
        width_specs.load_specs(p)


def test_committed_widths_come_from_chex_training_and_meet_their_budgets():
    data = width_specs.load_specs(width_specs.DEFAULT_FILE)
    assert data["arch"] == "resnet50"
    assert {"chex-3G", "chex-2G", "chex-1G", "chex-0.8G"} <= set(data["specs"])
    prov = data["provenance"]
    assert "CLS/main.py" in prov["what"] and prov["machine"]["cpu_count"]
    for name, entry in data["specs"].items():
        budget = float(entry["target"].rstrip("G")) * 1e9
        macs = width_specs.macs_224("resnet50", entry["width_spec"])
        # --target-flops met the budget with the 10-class digits head; the file quotes the 1000-class ImageNet head
        # (whose input is layer4's stream: narrowed in the chex-res-* specs of --chex-residual runs)
        head = entry["width_spec"].get("layer4.residual", 2048) * (1000 - 10)
        assert macs == entry["macs_224"] and 0.97 * budget <= macs - head <= budget, (name, macs)
        assert "--target-flops" in entry["command"] and entry["epochs"] >= 10
