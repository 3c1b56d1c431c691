"""SEG: Mask R-CNN R-50-FPN + CHEX on COCO2014-layout data (CPU, tiny synthetic set)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from chex_core import ChannelExplorer, ExplorationSchedule  # noqa: E402
from chex_core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from chex_tasks.coco import make_tiny_coco  # noqa: E402
from chex_tasks.export import read_compact  # noqa: E402
from chex_tasks.harness import make_train_loader  # noqa: E402
from SEG import train as seg_train  # noqa: E402
from SEG.data import (CocoInstances, DataError, GroupedInfiniteBatchSampler, aspect_ratio_groups,  # noqa: E402
                      hflip, split_paths)
from SEG.evaluate import evaluate_results, outputs_to_coco, target_as_output  # noqa: E402
from SEG.model import (UPSTREAM_PIXEL_MEAN, CheckpointMismatchError, build_maskrcnn, channel_groups,  # noqa: E402
                       compact_maskrcnn, load_model_weights, to_upstream_names)

# pycocotools' RLE decoding trips a numpy-2 DeprecationWarning on every mask; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
# CPU-sized sampling and tiny images, shared by every run below.
SMALL = ["--rpn-pre-nms-top-n-train", "200", "--rpn-post-nms-top-n-train", "100", "--rpn-batch-size-per-image", "64",
         "--box-batch-size-per-image", "64", "--box-detections-per-img", "20", "--rpn-pre-nms-top-n-test", "200",
         "--rpn-post-nms-top-n-test", "100", "--print-freq", "1"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("seg") / "coco", year="2014", n_train=6, n_val=3, image_size=64,
                          seed=3)


def _val(coco: Path) -> CocoInstances:
    return CocoInstances(*split_paths(coco, "val"), train=False)


# ----------------------------------------------------------------------------------------------------- data + eval
def test_dataset_filters_crowd_and_empty_and_maps_labels(coco):
    train = CocoInstances(*split_paths(coco, "train"), train=True)
    raw = train.coco
    empty = [i for i in raw.imgs if not raw.imgToAnns.get(i)]
    assert empty and not set(empty) & set(train.ids), "images without annotations must be dropped from training"
    assert sorted(train.cat_to_label.values()) == [1, 2, 3] and train.num_classes == 4
    crowd_img = next(a["image_id"] for a in raw.anns.values() if a["iscrowd"])
    _, target = train[train.ids.index(crowd_img)]
    n_plain = sum(1 for a in raw.imgToAnns[crowd_img] if not a["iscrowd"])
    assert len(target["labels"]) == n_plain and int(target["iscrowd"].sum()) == 0
    val = _val(coco)
    assert len(val) == len(val.coco.imgs), "evaluation keeps every image"


def test_missing_or_malformed_annotations_are_data_errors(tmp_path, coco):
    broken = tmp_path / "instances.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="not a valid COCO annotation file"):
        CocoInstances(coco / "val2014", broken, train=False)
    (tmp_path / "val2014").mkdir()
    with pytest.raises(DataError, match="annotation file not found"):
        split_paths(tmp_path, "val")


def test_hflip_keeps_boxes_and_masks_consistent(coco):
    image, target = _val(coco)[0]
    flipped, ft = hflip(image, target)
    assert torch.equal(flipped.flip(-1), image)
    for box, mask in zip(ft["boxes"], ft["masks"]):
        cols = torch.nonzero(mask.any(0)).flatten()
        assert abs(float(box[0]) - float(cols.min())) <= 1 and abs(float(box[2]) - float(cols.max() + 1)) <= 1


def test_grouped_sampler_is_deterministic_resumable_and_grouped():
    ratios = [0.5, 2.0] * 10 + [0.75, 1.5, 1.0]
    groups = aspect_ratio_groups(ratios, 0)
    full = list(GroupedInfiniteBatchSampler(groups, 2, 12, rank=0, world_size=2, seed=1))
    other = list(GroupedInfiniteBatchSampler(groups, 2, 12, rank=1, world_size=2, seed=1))
    assert len(full) == 12 and all(len(b) == 2 for b in full)
    assert full == list(GroupedInfiniteBatchSampler(groups, 2, 12, rank=0, world_size=2, seed=1))
    # resumable: the harness's stateful loader stopped after 5 batches continues with the rest of the stream
    def loader():
        sampler = GroupedInfiniteBatchSampler(groups, 2, 12, rank=0, world_size=2, seed=1)
        return make_train_loader(list(range(len(ratios))), batch_sampler=sampler, collate_fn=list)
    first = loader()
    it = iter(first)
    assert [next(it) for _ in range(5)] == full[:5]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == full[5:]
    assert not set(full[0]) & set(other[0]), "ranks see different images"
    assert sum(len({groups[i] for i in b}) == 1 for b in full) >= 10, "batches are built within aspect groups"
    with pytest.raises(ValueError, match="batch size"):
        GroupedInfiniteBatchSampler(groups, 64, 3)


def test_ground_truth_as_prediction_scores_ap_one(coco):
    val = _val(coco)
    bbox, segm = [], []
    for i in range(len(val)):
        _, target = val[i]
        b, s = outputs_to_coco(target_as_output(target), target["image_id"], val.label_to_cat)
        bbox += b
        segm += s
    assert {r["category_id"] for r in bbox} <= set(val.coco.getCatIds())
    metrics = evaluate_results(val, bbox, segm)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    # and the path can fail: shifted boxes and dropped masks must score lower
    shifted = [dict(r, bbox=[r["bbox"][0] + 6, r["bbox"][1] + 6, r["bbox"][2], r["bbox"][3]]) for r in bbox]
    worse = evaluate_results(val, shifted, segm[: len(segm) // 2])
    assert worse["bbox"]["AP"] < 0.9 and worse["segm"]["AP"] < 0.9


# ----------------------------------------------------------------------------------------------------- model
def _masked_bn_model(sparsity: float = 0.5) -> tuple[torch.nn.Module, ChannelExplorer]:
    torch.manual_seed(0)
    model = build_maskrcnn(4, norm="bn", head_norm="none", min_size=64, max_size=64)
    for m in model.backbone.body.modules():  # non-trivial BN statistics and affine params
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    schedule = ExplorationSchedule(interval=1, t_max=1, sparsity=sparsity, delta0=0.0)
    explorer = ChannelExplorer(model, channel_groups(model, include_downsample=True), schedule,
                               allocation="uniform", criterion="l1")
    explorer.start()
    return model.eval(), explorer


@pytest.mark.numerics
def test_compact_body_equals_masked_bn_and_gn_is_rejected(tmp_path):
    model, explorer = _masked_bn_model()
    assert explorer.density() == pytest.approx(0.5, abs=0.01)
    x = torch.randn(1, 3, 64, 64)
    small, spec = compact_maskrcnn(model, explorer.groups, explorer.masks)
    body = small.backbone.body.eval()
    with torch.no_grad():
        masked, compact = model.backbone.body(x), body(x)
    assert list(masked) == list(compact)
    for key in masked:
        torch.testing.assert_close(compact[key], masked[key], rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in body.parameters()) < 0.8 * sum(p.numel() for p in model.backbone.body.parameters())
    # the compact checkpoint written by training rebuilds from its width spec and loads strictly
    path = save_checkpoint({"model": small.state_dict(), "body_spec": spec}, str(tmp_path / "compact.pth"))
    fresh = build_maskrcnn(4, norm="bn", head_norm="none", min_size=64, max_size=64)
    assert load_model_weights(fresh, load_checkpoint(path)) == "native"
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().backbone.body(x)["3"], masked["3"], rtol=1e-4, atol=1e-4)
    gn = build_maskrcnn(4, norm="gn", min_size=64, max_size=64)
    with pytest.raises(ValueError, match="GroupNorm"):
        compact_maskrcnn(gn, channel_groups(gn), {g.name: torch.ones(g.size, dtype=torch.bool)
                                                  for g in channel_groups(gn)})


def test_upstream_checkpoint_names_map_and_unmapped_keys_are_named(tmp_path):
    torch.manual_seed(1)
    ours = build_maskrcnn(81, norm="gn", head_norm="gn", stride_in_1x1=True)
    upstream = {"module." + k: v for k, v in to_upstream_names(ours.state_dict()).items()}
    for name in ("module.backbone.body.stem.conv1.weight", "module.backbone.body.stem.bn1.weight",
                 "module.backbone.body.layer1.0.conv1.weight", "module.backbone.body.layer1.0.downsample.1.weight",
                 "module.backbone.fpn.fpn_inner2.0.weight", "module.backbone.fpn.fpn_layer4.1.bias",
                 "module.rpn.head.conv.weight", "module.roi_heads.box.feature_extractor.fc6.0.weight",
                 "module.roi_heads.box.predictor.cls_score.weight",
                 "module.roi_heads.mask.feature_extractor.mask_fcn1.0.weight",
                 "module.roi_heads.mask.predictor.mask_fcn_logits.weight"):
        assert name in upstream, name
    # maskrcnn-benchmark's GN blocks may be named gn1/gn2/gn3
    upstream = {k.replace("layer1.0.bn2.", "layer1.0.gn2."): v for k, v in upstream.items()}
    path = tmp_path / "maskrcnn_37%flops_37.3apbox_34.5apmask.pth.tar"
    torch.save({"model": upstream, "iteration": 270000}, path)
    fresh = build_maskrcnn(81, norm="gn", head_norm="gn", stride_in_1x1=True)
    assert load_model_weights(fresh, load_checkpoint(str(path))) == "upstream"
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.transform.image_mean == pytest.approx(UPSTREAM_PIXEL_MEAN)
    # upstream semantics: stem(BGR*255 - mean) with released weights == stem(normalised RGB) after conversion
    rgb = torch.rand(1, 3, 32, 32)
    bgr255 = rgb.flip(1) * 255 - torch.tensor([102.9801, 115.9465, 122.7717]).view(1, 3, 1, 1)
    released = upstream["module.backbone.body.stem.conv1.weight"]
    normalised = fresh.transform.normalize(rgb[0])[None]
    torch.testing.assert_close(torch.nn.functional.conv2d(normalised, fresh.backbone.body.conv1.weight, stride=2),
                               torch.nn.functional.conv2d(bgr255, released, stride=2), rtol=1e-4, atol=1e-3)
    # an unknown parameter and a missing one are both named
    bad = dict(upstream)
    bad["module.roi_heads.keypoint.predictor.weight"] = torch.zeros(1)
    del bad["module.rpn.head.bbox_pred.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"roi_heads\.keypoint\.predictor\.weight.*rpn\.head\.bbox_pred"):
        load_model_weights(build_maskrcnn(81), {"model": bad})


def test_eval_only_finds_the_release_file_in_the_results_folder(tmp_path, coco):
    results = tmp_path / "results"
    results.mkdir()
    torch.manual_seed(2)
    release = to_upstream_names(build_maskrcnn(4, norm="gn", head_norm="gn").state_dict())  # 3 classes + bg
    torch.save({"model": release, "iteration": 270000}, results / seg_train.UPSTREAM_CHECKPOINT)
    save_checkpoint({"model": {}}, str(results / "model_final.pth"))  # the release file takes precedence
    argv = ["--eval-only", "--weights", str(results), "--data-path", str(coco), "--output-dir", str(results),
            "--norm", "bn", "--head-norm", "none", "--no-stride-in-1x1",  # overridden by the upstream layout
            "--min-size", "64", "--max-size", "64", "--workers", "0", *SMALL]
    assert seg_train.main(argv) == 0
    metrics = json.loads((results / "eval_metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm", "body_macs", "dense_body_macs", "flops_reduction"}
    assert metrics["flops_reduction"] == pytest.approx(0.0, abs=1e-6)  # a dense release-format model


def test_mismatched_native_checkpoint_is_a_clear_error():
    small = build_maskrcnn(4, norm="bn", head_norm="none")
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        load_model_weights(build_maskrcnn(81, norm="bn", head_norm="none"), {"model": small.state_dict()})


# ----------------------------------------------------------------------------------------------------- entry point
def _train_argv(coco: Path, out: Path, max_iter: int, *extra: str) -> list[str]:
    return ["--data-path", str(coco), "--output-dir", str(out), "--max-iter", str(max_iter), "--steps", "100",
            "--warmup-iters", "1", "--batch-size", "2", "--workers", "0", "--min-size", "64", "--max-size", "64",
            "--lr", "0.01", "--checkpoint-period", "1", "--no-final-eval", "--norm", "bn", "--head-norm", "none",
            "--grow_prune", "--delta_T", "1", "--T_max", "2", *SMALL, *extra]


def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, coco):
    for argv, flag in ((["--data-path", str(tmp_path / "nowhere")], "--data-path"),
                       (["--data-path", str(coco), "--eval-only", "--weights", str(tmp_path / "x.pth")], "--weights"),
                       (["--data-path", str(coco), "--grow_prune", "--channel_sparsity", "1.5"], "--channel_sparsity"),
                       (["--data-path", str(coco), "--steps", "9", "3"], "--steps")):
        with pytest.raises(SystemExit) as exc:
            seg_train.parse_args(argv)
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err


def test_resume_keeps_explorer_state_and_corrupt_image_loses_nothing(tmp_path, coco):
    data = tmp_path / "coco"
    subprocess.run(["cp", "-r", str(coco), str(data)], check=True)
    out = tmp_path / "run"
    assert seg_train.main(_train_argv(data, out, 2)) == 0
    uninterrupted = load_checkpoint(str(out / "checkpoint_000002.pth"))
    # simulate a run killed after iteration 1: only checkpoint 1 survives
    for name in ("checkpoint_000002.pth", "model_final.pth", "model_compact.pth"):
        (out / name).unlink()
    first = load_checkpoint(str(out / "checkpoint_000001.pth"))
    assert first["iteration"] == 1 and first["explorer"]["event_count"] == 1
    # a corrupt image: one clear error, exit code 1, the existing checkpoint is untouched
    images = sorted((data / "train2014").iterdir())
    good = {p: p.read_bytes() for p in images}
    for p in images:
        p.write_bytes(b"not a jpeg")
    assert seg_train.main(_train_argv(data, out, 2)) == 1
    assert load_checkpoint(str(out / "checkpoint_000001.pth"))["iteration"] == 1
    with pytest.raises(DataError, match="corrupt image file"):
        CocoInstances(*split_paths(data, "train"), train=True)[0]
    for p, content in good.items():
        p.write_bytes(content)
    # resuming with other channel groups (shortcuts now masked too) is refused with one clear line (exit 2)
    with pytest.raises(SystemExit) as exc:
        seg_train.main(_train_argv(data, out, 2, "--chex-prune-downsample"))
    assert exc.value.code == 2
    assert seg_train.main(_train_argv(data, out, 2)) == 0  # resumes at 1, runs event 2 (T_max) then stops
    second = load_checkpoint(str(out / "checkpoint_000002.pth"))
    assert second["iteration"] == 2 and second["explorer"]["event_count"] == 2
    assert second["explorer"]["started"] and second["args"]["norm"] == "bn"
    for name, mask in uninterrupted["explorer"]["masks"].items():  # the resumed run explored the same way
        assert torch.equal(second["explorer"]["masks"][name], mask), name
    for key, value in uninterrupted["model"].items():  # and reproduced the uninterrupted step exactly
        assert torch.equal(second["model"][key], value), key
    compact = load_checkpoint(str(out / "model_compact.pth"))
    assert compact["module"] == "backbone.body" and min(compact["width_spec"].values()) >= 1   # the one format


def test_residual_flag_narrows_the_fpn_laterals_and_the_export_equals_the_masked_model(tmp_path, coco):
    """--chex-residual: every body stage's residual stream is explored with the FPN lateral that reads it;
    model_compact.pth, rebuilt from its body_spec, computes the masked model's features (C2..C5 through the FPN).
    L1 selection and random regrowth keep the events cheap on the ResNet-50 body (the explorer's math is tested on
    tiny models in tests/test_coupled.py)."""
    out = tmp_path / "run"
    assert seg_train.main(_train_argv(coco, out, 2, "--chex-residual", "--chex-criterion", "l1",
                                      "--chex-regrow", "random", "--chex-allocation", "global",
                                      "--checkpoint-period", "100")) == 0     # one rolling checkpoint, not two
    masked, compact = (build_maskrcnn(4, norm="bn", head_norm="none", min_size=64, max_size=64) for _ in range(2))
    load_model_weights(masked, load_checkpoint(str(out / "model_final.pth")))
    spec = read_compact(load_checkpoint(str(out / "model_compact.pth"))).width_spec
    load_model_weights(compact, load_checkpoint(str(out / "model_compact.pth")))
    assert {f"layer{i}.residual" for i in range(1, 5)} <= set(spec)
    for i in range(4):
        assert compact.backbone.fpn.inner_blocks[i][0].in_channels == spec[f"layer{i + 1}.residual"]
    assert compact.backbone.fpn.inner_blocks[3][0].in_channels < 2048
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        a, b = compact.double().eval().backbone(x), masked.double().eval().backbone(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-9, msg=key)


@pytest.mark.slow
def test_train_sh_then_eval_sh_two_processes(tmp_path, coco):
    results = tmp_path / "results"
    env = {**os.environ, "DATA_DIR": str(coco), "RESULTS": str(results), "NGPU": "2", "IMS_PER_BATCH": "2",
           "MAX_ITER": "2", "STEPS": "100", "WARMUP_ITERS": "1", "DELTA_T": "1", "T_MAX": "2", "MIN_SIZE": "64",
           "MAX_SIZE": "64", "CKPT_PERIOD": "2", "WORKERS": "0", "LR": "0.01", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    seg_dir = REPO / "SEG"
    run = subprocess.run(["bash", "scripts/train.sh", *SMALL, "--no-final-eval"], cwd=seg_dir, env=env,
                         capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert log.count("CHEX event") >= 2 and "world 2 x batch 1" in log
    ckpt = load_checkpoint(str(results / "checkpoint_000002.pth"))  # weights_only load
    explorer = ckpt["explorer"]
    assert ckpt["iteration"] == 2 and explorer["event_count"] == 2 and explorer["last_event_step"] == 2
    kept = sum(int(m.sum()) for m in explorer["masks"].values())
    total = sum(m.numel() for m in explorer["masks"].values())
    assert kept / total == pytest.approx(0.5, abs=0.01)  # S = 0.5, uniform, after T_max
    assert any(name.endswith("downsample.0") for name in explorer["masks"])  # PRUNE_DOWNSAMPLE=1 (released)
    assert {"model", "optimizer", "scheduler", "scaler", "iteration", "explorer", "args"} <= set(ckpt)
    assert (results / "model_final.pth").is_file()
    # eval.sh without torchrun on PATH (a venv used without activating it): $PYTHON -m torch.distributed.run
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.log"}\nexec {sys.executable} "$@"\n')
    (shim / "python").chmod(0o755)
    system = {os.path.dirname(shutil.which(tool)) for tool in ("bash", "dirname", "env")}
    env["PATH"] = os.pathsep.join([str(shim), *system])
    run = subprocess.run(["bash", "scripts/eval.sh", *SMALL], cwd=seg_dir, env=env, capture_output=True, text=True,
                         timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    launched = (tmp_path / "calls.log").read_text()
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m SEG.train" in launched
    assert "model_final.pth" in log
    for line in ("task  |    AP |  AP50 |  AP75 |   APs |   APm |   APl", "bbox  |", "segm  |", "FLOPs reduction"):
        assert line in log, line
    metrics = json.loads((results / "eval_metrics.json").read_text())
    assert set(metrics["bbox"]) == set(metrics["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["flops_reduction"] == pytest.approx(0.605, abs=0.02)  # S = 0.5 with downsample, stride in 1x1
