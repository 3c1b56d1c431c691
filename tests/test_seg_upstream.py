"""SEG's upstream command line (issue 14, phase B): the evaluation split flag and what the metrics file records, the
conventions flag and fine-tuning from a released file, and flag mistakes that are one line with exit status 2 even
through ``scripts/train.sh`` / ``scripts/eval.sh`` (no torchrun traceback).

No Mask R-CNN is trained here: the training wiring is checked on the task the entry point hands to the harness, and
the evaluation on a randomly initialised 64-px model (the metrics file's contents, not its AP, are under test)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from chex_tasks.coco import make_tiny_coco, subset_annotations  # noqa: E402
from chex_tasks.harness import UserError  # noqa: E402
from SEG import train as seg_train  # noqa: E402
from SEG.conventions import legacy_cell_anchors  # noqa: E402
from SEG.data import MINIVAL_ANN, VALMINUSMINIVAL_ANN, ConcatInstances  # noqa: E402
from SEG.evaluate import model_from_args, run_evaluation, splits_from_args  # noqa: E402
from SEG.model import to_upstream_names  # noqa: E402
from SEG.task import SegTask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]
SMALL = ["--rpn-pre-nms-top-n-train", "100", "--rpn-post-nms-top-n-train", "50", "--rpn-batch-size-per-image", "32",
         "--box-batch-size-per-image", "32", "--box-detections-per-img", "10", "--rpn-pre-nms-top-n-test", "100",
         "--rpn-post-nms-top-n-test", "50", "--min-size", "64", "--max-size", "64", "--workers", "0",
         "--norm", "bn", "--head-norm", "none"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """"bare": COCO2014 as upstream's README lists it (train2014, val2014); "minival": plus the two annotation files
    of coco_annotations_minival.tgz, carved out of val2014 (images 1-2 minival, 3-5 valminusminival)."""
    base = tmp_path_factory.mktemp("seg_up")
    bare = make_tiny_coco(base / "bare", year="2014", n_train=4, n_val=5, image_size=48, seed=5)
    full = base / "minival"
    shutil.copytree(bare, full)
    subset_annotations(full / "annotations" / "instances_val2014.json", full / "annotations" / MINIVAL_ANN, {1, 2})
    subset_annotations(full / "annotations" / "instances_val2014.json", full / "annotations" / VALMINUSMINIVAL_ANN, {3, 4, 5})
    return {"bare": bare, "minival": full}


def _args(root: Path, out: Path, *extra: str):
    return seg_train.parse_args(["--data-path", str(root), "--output-dir", str(out), *SMALL, *extra])


def test_metrics_file_records_the_evaluated_set_and_the_overlap_warning(roots, tmp_path):
    torch.manual_seed(0)
    model = model_from_args(_args(roots["bare"], tmp_path), 4)
    for name, expected_set, images in (("bare", "coco_2014_val", 5), ("minival", "coco_2014_minival", 2)):
        out = tmp_path / name
        args = _args(roots[name], out)      # --eval-split auto
        run_evaluation(model, args, torch.device("cpu"))
        metrics = json.loads((out / "eval_metrics.json").read_text())
        assert metrics["eval_set"]["name"] == expected_set and metrics["eval_set"]["images"] == images, name
        assert metrics["eval_set"]["annotations"].endswith(MINIVAL_ANN if images == 2 else "instances_val2014.json")
        if expected_set == "coco_2014_val":   # all of val2014 holds the released model's training images: said so
            (warning,) = metrics["warnings"]
            assert "valminusminival" in warning and "not comparable" in warning and "--year 2017" in warning
        else:
            assert metrics["warnings"] == []
    # --eval-split val: all of val2014 although the minival files exist
    assert splits_from_args(_args(roots["minival"], tmp_path, "--eval-split", "val")).test.name == "coco_2014_val"


def _recorded_task(monkeypatch, argv: list[str]) -> SegTask:
    """Run ``SEG.train.main`` up to the harness and return the task it would train (no training)."""
    seen = {}

    class Recorder:
        def __init__(self, task, args, rt, workspace, print_freq=0):
            seen["task"] = task

        def setup(self):
            pass

        def train(self):
            pass

    monkeypatch.setattr(seg_train, "Run", Recorder)
    assert seg_train.main(argv) == 0
    return seen["task"]


def test_training_uses_upstreams_split_and_the_conventions_flag(roots, tmp_path, monkeypatch, capsys):
    base = ["--data-path", str(roots["minival"]), "--output-dir", str(tmp_path / "out"), "--no-resume", *SMALL]
    task = _recorded_task(monkeypatch, base + ["--conventions", "upstream", "--no-rpn-post-nms-per-batch"])
    ds = task.dataset
    assert isinstance(ds, ConcatInstances) and len(ds.datasets) == 2   # train2014 + valminusminival
    assert sorted(ds.datasets[1].ids) == [3, 4, 5]
    assert all(part.box_convention == "upstream" for part in ds.datasets)    # targets follow the model
    model = task.build_model(None)
    assert model.box_convention == "upstream" and model.rpn.post_nms_per_batch is False
    assert "training on coco_2014_train + coco_2014_valminusminival, evaluating on coco_2014_minival" in \
        capsys.readouterr().out
    # default: torchvision's conventions, recorded as such (evaluation rebuilds what was trained)
    task = _recorded_task(monkeypatch, base)
    assert task.args.conventions == "torchvision" and task.dataset.datasets[0].box_convention == "torchvision"
    assert getattr(task.build_model(None), "box_convention", "torchvision") == "torchvision"
    # a resume written under the other conventions is refused (the same weights would load silently)
    with pytest.raises(UserError, match="--conventions upstream"):
        task.resume_checks(None, {"args": {"conventions": "upstream"}}, "ckpt.pth")
    task.resume_checks(None, {"args": {"conventions": "torchvision"}}, "ckpt.pth")
    # the bare layout: train2014 only, evaluation on all of val2014, with the warning at start
    task = _recorded_task(monkeypatch, ["--data-path", str(roots["bare"]), "--output-dir", str(tmp_path / "o2"),
                                        "--no-resume", *SMALL])
    assert not isinstance(task.dataset, ConcatInstances)
    assert "contains the 35,504 valminusminival images" in capsys.readouterr().out


def test_fine_tuning_from_a_released_file_switches_to_upstream_conventions():
    torch.manual_seed(1)
    args = SimpleNamespace(conventions="auto", weights="release.pth")
    release = {"model": to_upstream_names(model_from_args(_args_ns(), 4).state_dict())}
    anchors = [legacy_cell_anchors(s, z) + 0.5 for s, z in zip((4, 8, 16, 32, 64), (32, 64, 128, 256, 512))]
    for i, a in enumerate(anchors):          # a file with its own anchors: they are installed, not recomputed
        release["model"][f"rpn.anchor_generator.cell_anchors.{i}"] = a
    assert seg_train.resolve_conventions(args, release) == "upstream"
    with pytest.raises(UserError, match="--conventions torchvision"):
        seg_train.resolve_conventions(SimpleNamespace(conventions="torchvision", weights="release.pth"), release)
    ours = {"model": {}, "args": {"conventions": "upstream"}}
    assert seg_train.resolve_conventions(args, ours) == "upstream"            # as recorded by our training run
    assert seg_train.resolve_conventions(args, None) == "torchvision"
    ns = _args_ns(conventions="upstream", weights="release.pth", rpn_post_nms_per_batch=False)
    model = SegTask(ns, SimpleNamespace(num_classes=4), release).build_model(None)
    assert model.box_convention == "upstream"
    assert model.rpn.post_nms_per_batch is False      # loading the file keeps the flag's proposal rule
    for got, want in zip(model.rpn.anchor_generator.cell_anchors, anchors):
        assert torch.equal(got, want)
    reference = release["model"]["roi_heads.box.predictor.cls_score.weight"]
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, reference)


def test_eval_only_rebuilds_the_conventions_a_checkpoint_was_trained_with(roots, tmp_path, monkeypatch):
    from SEG import evaluate as seg_evaluate

    torch.manual_seed(2)
    trained = model_from_args(_args_ns(conventions="upstream"), 4)
    ckpt = {"model": trained.state_dict(), "iteration": 3,
            "args": {"conventions": "upstream", "norm": "bn", "head_norm": "none", "stride_in_1x1": True}}
    (tmp_path / "model_final.pth").write_bytes(b"")   # found by --eval-only; its contents come from ckpt below
    monkeypatch.setattr(seg_evaluate, "read_eval_checkpoint", lambda path, allow_pickle: ckpt)
    seen = {}
    monkeypatch.setattr(seg_evaluate, "run_evaluation", lambda model, args, device: seen.setdefault("model", model))
    args = _args(roots["bare"], tmp_path, "--eval-only", "--weights", str(tmp_path))   # --conventions auto
    seg_evaluate.evaluate_checkpoint(args, torch.device("cpu"))
    assert seen["model"].box_convention == "upstream" and args.conventions == "upstream"


def _args_ns(**overrides):
    parser = seg_train.build_parser()
    args = parser.parse_args(["--norm", "bn", "--head-norm", "none", "--min-size", "64", "--max-size", "64"])
    return SimpleNamespace(**{**vars(args), **overrides})


def _script(name: str, env: dict, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", f"scripts/{name}", *argv], cwd=REPO / "SEG", env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.slow
def test_script_flag_mistakes_are_one_line_without_a_torchrun_traceback(roots, tmp_path):
    common = {"RESULTS": str(tmp_path / "results"), "NGPU": "1", "AMP": "0", "IMS_PER_BATCH": "1"}
    run = _script("train.sh", {**common, "DATA_DIR": str(roots["bare"])}, "--target-flops", "1M", *SMALL)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "--target-flops" in err[0] and "cannot be met" in err[0], err
    assert "Traceback" not in run.stdout + run.stderr and not (tmp_path / "results").exists()
    run = _script("eval.sh", {**common, "DATA_DIR": str(roots["bare"]), "EVAL_SPLIT": "minival"})
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(err) == 1 and "--eval-split minival" in err[0], run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr


def test_check_args_checks_without_running(roots, tmp_path, capsys, monkeypatch):
    # no logging set up, as in a fresh `python -m SEG.train --check-args` (earlier tests leave handlers on closed
    # capture streams): warnings and errors go to stderr through logging's last-resort handler
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    out = tmp_path / "out"
    base = ["--data-path", str(roots["bare"]), "--output-dir", str(out), "--check-args", *SMALL]
    assert seg_train.main(base + ["--grow_prune", "--target-flops", "0.5", "--init_channel_ratio", "0.3"]) == 0
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        seg_train.main(base + ["--grow_prune", "--target-flops", "1M"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--target-flops" in err[0], err
    with pytest.raises(SystemExit) as exc:
        seg_train.main(base + ["--eval-split", "minival"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and MINIVAL_ANN in err[0], err
