"""``--target-flops`` is resolved at the resolution the task reports (CLS: ``--image-size``), before anything is
trained; an unreachable target, or an ``--init_channel_ratio`` above the sparsity the target implies, is one line and
exit status 2; and ``--init_channel_ratio`` is not checked against the default ``--channel_sparsity`` when a target
decides the sparsity (issue 14, item 7). DET's 300-px resolution is tested in tests/test_det_upstream.py."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("torchvision")

from chex_core import resnet_groups  # noqa: E402
from chex_core.budget import MacsModel, sparsity_for_macs  # noqa: E402
from chex_core.cli import add_chex_args, validate_chex_args  # noqa: E402


def _chex_args(*argv: str):
    parser = argparse.ArgumentParser(prog="x")
    add_chex_args(parser)   # default --channel_sparsity 0.2
    args = parser.parse_args(["--grow_prune", *argv])
    validate_chex_args(parser, args)
    return args


def test_init_ratio_is_checked_against_the_target_not_the_default_sparsity(capsys):
    assert _chex_args("--target-flops", "1G", "--init_channel_ratio", "0.3").init_channel_ratio == 0.3
    for argv, flag in ((["--init_channel_ratio", "0.3"], "--init_channel_ratio"),          # no target: vs S = 0.2
                       (["--target-flops", "1G", "--init_channel_ratio", "1.0"], "--init_channel_ratio"),
                       (["--target-flops", "1G", "--init_channel_ratio", "-0.1"], "--init_channel_ratio")):
        with pytest.raises(SystemExit) as exc:
            _chex_args(*argv)
        assert exc.value.code == 2 and flag in capsys.readouterr().err, argv


def _cls(argv: list[str]) -> int:
    from CLS import main as cls_main

    torch.set_num_threads(1)
    return cls_main.main(argv)


def _cls_argv(ws, *extra: str) -> list[str]:
    # --run-epochs 0: set the run up (model, explorer, args.json) and stop before the first step
    return ["--data-backend", "synthetic", "--synthetic-samples", "8", "--num-classes", "4", "--image-size", "32",
            "--arch", "resnet18", "-b", "4", "-j", "0", "--epochs", "2", "--run-epochs", "0", "--workspace", str(ws),
            "--grow_prune", "--delta_T", "1", "--T_max", "1", "--seed", "1", "--no-tensorboard", "-p", "0",
            "--training-only", *extra]


def test_cls_target_is_resolved_at_image_size_and_failures_are_one_line(tmp_path, capsys):
    from CLS.model import build_model

    model = build_model("resnet18", 4)
    groups = resnet_groups(model)
    at32, at224 = MacsModel(model, groups, (3, 32, 32)), MacsModel(model, groups, (3, 224, 224))
    target = at32.dense() // 2     # half the dense network at 32 px: about 1 % of it at 224 px, out of reach there
    with pytest.raises(ValueError, match="cannot be met"):
        sparsity_for_macs(at224, target)
    expected = sparsity_for_macs(at32, target).sparsity
    # --init_channel_ratio 0.3 is above the default --channel_sparsity 0.2 and below what the target implies
    assert expected > 0.3
    assert _cls(_cls_argv(tmp_path / "ws", "--target-flops", str(target), "--init_channel_ratio", "0.3")) == 0
    assert json.loads((tmp_path / "ws" / "args.json").read_text())["channel_sparsity"] == pytest.approx(expected)
    capsys.readouterr()
    for extra, words in ((["--target-flops", "1000"], "--target-flops"),
                         (["--target-flops", str(target), "--init_channel_ratio", "0.9"], "--init_channel_ratio")):
        with pytest.raises(SystemExit) as exc:
            _cls(_cls_argv(tmp_path / "ws2", *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and words in err[0] and "Traceback" not in err[0], err
