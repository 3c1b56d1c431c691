"""DET behaves as NVIDIA's SSD (the code CHEX's DET forks) when driven by upstream's command line (issue 14, phase B):

- every flag of the fork's ``make_parser`` is accepted with its meaning (the list is written out here from the fork's
  ``DET/main.py``), including ``--no-cuda``, ``--backbone-path`` and ``--json-summary``;
- the backbone starts from torchvision's ImageNet weights by default (here a file the test puts in the torch hub
  cache), and when they cannot be had the run stops at start with one line naming the remedies;
- ``--json-summary`` writes dllogger's ``DLLL`` JSON lines with upstream's records;
- ``--target-flops`` is resolved at 300 x 300 (SSD's input, where DET quotes FLOPs), an unreachable one is one line;
- SSD300 runs channels_last (NVIDIA's SSD trains that way).
"""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

import torchvision  # noqa: E402

from chex_core import resnet_groups  # noqa: E402
from chex_core.budget import MacsModel, sparsity_for_macs  # noqa: E402
from chex_tasks.coco import make_tiny_coco  # noqa: E402
from DET import main as det_main  # noqa: E402
from DET.model import SSD300, ResNetBackbone, imagenet_weights_cache_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("det_up"), n_train=4, n_val=2, image_size=64, seed=1)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no network (a download attempt fails as it does offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path


def _cache_imagenet_resnet18() -> dict[str, torch.Tensor]:
    """A stand-in for torchvision's ImageNet resnet18 file, where the hub cache keeps it (layers up to layer3 only:
    the SSD backbone drops layer4 and fc, and the file stays small)."""
    torch.manual_seed(7)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.startswith(("layer4.", "fc."))}
    cached = Path(imagenet_weights_cache_file("resnet18"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cached)
    return state


# The fork's make_parser (zejiangh/Filter-GaP DET/main.py): flag, a value, and the attribute it must set here.
FORK_FLAGS = [
    (["--data", "DATA"], "data", "DATA"), (["-d", "DATA"], "data", "DATA"),
    (["--epochs", "7"], "epochs", 7), (["-e", "7"], "epochs", 7),
    (["--batch-size", "6"], "bs", 6), (["--bs", "6"], "bs", 6),
    (["--eval-batch-size", "5"], "eval_batch_size", 5), (["--ebs", "5"], "eval_batch_size", 5),
    (["--no-cuda"], "no_cuda", True),
    (["--seed", "3"], "seed", 3), (["-s", "3"], "seed", 3),
    (["--save", "out"], "save", "out"),
    (["--mode", "benchmark-inference"], "mode", "benchmark-inference"),
    (["--evaluation", "1", "4"], "eval_on_epochs", [1, 4]),
    (["--multistep", "3", "5"], "multistep", [3, 5]),
    (["--learning-rate", "0.01"], "learning_rate", 0.01), (["--lr", "0.01"], "learning_rate", 0.01),
    (["--momentum", "0.8"], "momentum", 0.8), (["-m", "0.8"], "momentum", 0.8),
    (["--weight-decay", "0.001"], "weight_decay", 0.001), (["--wd", "0.001"], "weight_decay", 0.001),
    (["--warmup", "300"], "warmup", 300),
    (["--benchmark-iterations", "9"], "benchmark_iterations", 9),
    (["--benchmark-warmup", "4"], "benchmark_warmup", 4),
    (["--backbone", "resnet18"], "backbone", "resnet18"),
    (["--backbone-path", "BACKBONE"], "backbone_path", "BACKBONE"),
    (["--num-workers", "2"], "num_workers", 2),
    (["--amp"], "amp", True),
    (["--json-summary", "summary.json"], "json_summary", "summary.json"),
    (["--local_rank", "1"], "local_rank", 1),
    (["--grow_prune"], "grow_prune", True),
    (["--channel_sparsity", "0.4"], "channel_sparsity", 0.4),
    (["--init_channel_ratio", "0.1"], "init_channel_ratio", 0.1),
    (["--delta_T", "3"], "delta_T", 3),
    (["--T_max", "9"], "T_max", 9),
]


def test_every_flag_of_the_fork_parser_keeps_its_meaning(coco, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("DATA").mkdir()
    Path("BACKBONE").write_bytes(b"")
    for argv, dest, value in FORK_FLAGS:
        args = det_main.parse_args(argv if "DATA" in argv else argv + ["--data", str(coco)])
        assert getattr(args, dest) == value, (argv, getattr(args, dest))
    # the pre-upstream spelling still works and means the same file
    assert det_main.parse_args(["--data", str(coco), "--pretrained-backbone", "BACKBONE"]).backbone_path == "BACKBONE"
    # --no-cuda: the CPU even where CUDA is available; without it the harness picks (CUDA when available)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert det_main.runtime_device(det_main.parse_args(["--data", str(coco), "--no-cuda"])) == "cpu"
    assert det_main.runtime_device(det_main.parse_args(["--data", str(coco)])) is None


def test_json_summary_after_evaluation_and_benchmark_modes(coco, tmp_path, monkeypatch):
    """The mode's result is the summary record, as upstream's evaluate / BenchLogger log it (the runs are stubbed:
    what is under test is what main writes)."""
    ckpt = tmp_path / "ckpt.pth"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(det_main, "run_evaluation", lambda args, rt, coder: {"AP": 0.25, "AP50": 0.5})
    monkeypatch.setattr(det_main, "run_benchmark", lambda args, rt, coder, optimizer_for: 123.5)
    for mode, record in (("evaluation", {"mAP": 0.25}), ("benchmark-inference", {"avg_img/sec": 123.5})):
        out = tmp_path / f"{mode}.json"
        assert det_main.main(["--data", str(coco), "--mode", mode, "--checkpoint", str(ckpt),
                              "--json-summary", str(out)]) == 0
        records = [json.loads(line[5:]) for line in out.read_text().splitlines()]
        assert [r["step"] for r in records] == ["PARAMETER", []] and records[1]["data"] == record
        assert records[0]["data"]["mode"] == mode


def test_ssd300_runs_channels_last():
    torch.manual_seed(0)
    model = SSD300("resnet18", num_classes=3).eval()
    images = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        locs, confs = model(images)
        model = model.to(memory_format=torch.channels_last)
        locs_cl, confs_cl = model(images.to(memory_format=torch.channels_last))
    assert locs.shape == (1, 4, 8732) and confs.shape == (1, 3, 8732)
    torch.testing.assert_close(locs_cl, locs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(confs_cl, confs, rtol=1e-4, atol=1e-4)


def _train_argv(coco: Path, ws: Path, *extra: str) -> list[str]:
    return ["--backbone", "resnet18", "--data", str(coco), "--bs", "2", "--epochs", "1", "--max-iters-per-epoch", "1",
            "--num-workers", "0", "--multistep", "10", "--seed", "1", "--no-tensorboard", "--save", str(ws), *extra]


def test_offline_without_imagenet_weights_is_one_line_at_start(coco, hub, capsys):
    with pytest.raises(SystemExit) as exc:
        det_main.main(_train_argv(coco, hub / "ws"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no network" in err[0], err
    assert "--backbone-path" in err[0] and "--random-backbone" in err[0]
    assert not list((hub / "ws").glob("checkpoint_*.pth")), "nothing was trained"


def test_upstream_defaults_imagenet_backbone_summary_and_target_at_300px(coco, hub, capsys, monkeypatch):
    """The upstream training command (plus tiny-run flags): ImageNet weights from the hub cache, --json-summary
    records as dllogger writes them, and --target-flops resolved at 300 px."""
    from DET import task as det_task

    reference = _cache_imagenet_resnet18()
    backbone = ResNetBackbone("resnet18")
    groups = resnet_groups(backbone)
    at = {size: MacsModel(backbone, groups, (3, size, size)) for size in (224, 300)}
    target = at[300].dense() // 2            # half the dense backbone at 300 px, as an absolute number
    expected = {size: sparsity_for_macs(at[size], target).sparsity for size in (224, 300)}
    assert expected[300] > expected[224] + 0.2   # at 224 px the same number is ~90 % of the dense backbone
    seen = {}
    build = det_task.DetTask.build_model

    def build_and_keep(self, run):   # the model as the harness got it, before any training step
        model = build(self, run)
        seen.update({k: v.clone() for k, v in model.backbone.state_dict().items()})
        return model

    ws, summary = hub / "ws", hub / "summary.json"
    argv = _train_argv(coco, ws, "--no-cuda", "--json-summary", str(summary), "--eval-on-epochs", "0", "--grow_prune",
                       "--target-flops", str(target), "--init_channel_ratio", "0.1", "--delta_T", "1", "--T_max", "1")
    monkeypatch.setattr(det_task.DetTask, "build_model", build_and_keep)
    assert det_main.main(argv) == 0
    for key, value in reference.items():
        assert torch.equal(seen[key], value), key
    assert "backbone initialised from torchvision resnet18 IMAGENET1K_V1" in capsys.readouterr().out
    assert json.loads((ws / "args.json").read_text())["channel_sparsity"] == pytest.approx(expected[300])

    lines = summary.read_text().splitlines()
    assert all(line.startswith("DLLL {") for line in lines), lines
    records = [json.loads(line[5:]) for line in lines]
    assert all(r["type"] == "LOG" and {"timestamp", "datetime", "elapsedtime"} <= set(r) for r in records)
    steps = [(r["step"], sorted(r["data"])) for r in records]
    assert steps == [("PARAMETER", sorted(records[0]["data"])), ([0], ["loss", "time"]), ([0], ["mAP"]),
                     ([], ["total time"]), ([], ["mAP"])], steps
    params = records[0]["data"]
    assert params["no cuda"] is True and params["backbone"] == "resnet18" and params["batch size"] == 2
    assert {"dataset path", "lr decay epochs", "backbone path", "precision"} <= set(params)
    assert records[2]["data"]["mAP"] == records[4]["data"]["mAP"] and 0 <= records[2]["data"]["mAP"] <= 1


def test_unreachable_target_is_one_line_exit_2(coco, hub, capsys):
    with pytest.raises(SystemExit) as exc:
        det_main.main(_train_argv(coco, hub / "ws", "--random-backbone", "--grow_prune", "--target-flops", "1M"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--target-flops" in err[0] and "Traceback" not in err[0], err
