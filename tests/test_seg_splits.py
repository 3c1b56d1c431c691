"""SEG data: upstream's COCO2014 split (train2014 + valminusminival / minival), the overlap warning, and targets in
maskrcnn-benchmark's inclusive box convention scored back to exact COCO boxes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from chex_tasks.coco import make_tiny_coco  # noqa: E402
from SEG.data import (MINIVAL_ANN, VALMINUSMINIVAL_ANN, CocoInstances, ConcatInstances, DataError,  # noqa: E402
                      build_instances, hflip, resolve_splits, split_paths)
from SEG.evaluate import evaluate_results, outputs_to_coco, target_as_output  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _subset(src: Path, dst: Path, image_ids: set[int]) -> None:
    data = json.loads(src.read_text())
    data["images"] = [i for i in data["images"] if i["id"] in image_ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]
    dst.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Tiny COCO2014 layout plus upstream's minival / valminusminival files carved out of val2014."""
    root = make_tiny_coco(tmp_path_factory.mktemp("splits") / "coco", year="2014", n_train=4, n_val=5,
                          image_size=48, seed=5)
    ann = root / "annotations"
    _subset(ann / "instances_val2014.json", ann / MINIVAL_ANN, {1, 2})
    _subset(ann / "instances_val2014.json", ann / VALMINUSMINIVAL_ANN, {3, 4, 5})
    return root


def test_upstream_split_when_the_minival_files_exist(coco):
    splits = resolve_splits(coco, "2014")
    assert [s.name for s in splits.train] == ["coco_2014_train", "coco_2014_valminusminival"]
    assert splits.test.name == "coco_2014_minival" and splits.test.images == coco / "val2014"
    assert splits.warnings == ()
    train = build_instances(splits.train, train=True)
    assert isinstance(train, ConcatInstances) and train.num_classes == 4
    parts = [CocoInstances(s.images, s.annotations, train=True) for s in splits.train]
    assert len(train) == sum(len(p) for p in parts)
    # index i of the concatenation is image i of train2014, then the valminusminival images
    last = len(train) - 1
    assert train.aspect_ratio(last) == parts[1].aspect_ratio(len(parts[1]) - 1)
    assert train[last][1]["image_id"] == parts[1].ids[-1]
    test = build_instances((splits.test,), train=False)
    assert sorted(test.ids) == [1, 2], "minival only: the images upstream trains on stay out of evaluation"


def test_full_val2014_is_flagged_and_minival_can_be_required(coco, tmp_path):
    splits = resolve_splits(coco, "2014", split="val")
    assert splits.test.name == "coco_2014_val" and [s.name for s in splits.train] == ["coco_2014_train"]
    (warning,) = splits.warnings
    for needle in ("val2014", "valminusminival", MINIVAL_ANN, VALMINUSMINIVAL_ANN, "--year 2017", "val2017 = minival"):
        assert needle in warning
    bare = tmp_path / "bare"
    make_tiny_coco(bare, year="2014", n_train=2, n_val=1, image_size=32)
    assert resolve_splits(bare, "2014").warnings == (warning.replace(str(coco), str(bare)),)  # auto falls back
    with pytest.raises(DataError, match=MINIVAL_ANN):
        resolve_splits(bare, "2014", split="minival")
    # minival alone: upstream's evaluation set, training on train2014 only (said so)
    (bare / "annotations" / MINIVAL_ANN).write_text((coco / "annotations" / MINIVAL_ANN).read_text())
    only = resolve_splits(bare, "2014")
    assert only.test.name == "coco_2014_minival" and len(only.train) == 1 and "train2014 only" in only.warnings[0]
    with pytest.raises(DataError, match="train2017"):
        resolve_splits(bare, "2017")
    with pytest.raises(ValueError, match="split"):
        resolve_splits(coco, "2014", split="test")


def test_coco2017_is_upstreams_split_without_warning(tmp_path):
    root = make_tiny_coco(tmp_path / "c17", year="2017", n_train=2, n_val=1, image_size=32)
    splits = resolve_splits(root, "2017")
    assert [s.name for s in splits.train] == ["coco_2017_train"] and splits.test.name == "coco_2017_val"
    assert splits.warnings == ()


def test_concatenated_sets_must_share_categories(coco, tmp_path):
    other = json.loads((coco / "annotations" / VALMINUSMINIVAL_ANN).read_text())
    other["categories"] = other["categories"][:2]
    kept = {c["id"] for c in other["categories"]}
    other["annotations"] = [a for a in other["annotations"] if a["category_id"] in kept]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(DataError, match="different categories"):
        ConcatInstances([CocoInstances(*split_paths(coco, "train"), train=True),
                         CocoInstances(coco / "val2014", bad, train=True)])


def test_upstream_box_convention_round_trips_to_the_exact_coco_boxes(coco):
    val = CocoInstances(*split_paths(coco, "val"), train=False, box_convention="upstream")
    plain = CocoInstances(*split_paths(coco, "val"), train=False)
    bbox, segm = [], []
    for i in range(len(val)):
        image, target = val[i]
        _, reference = plain[i]
        # inclusive: x2 = x + w - 1 (maskrcnn-benchmark BoxList xywh -> xyxy)
        torch.testing.assert_close(target["boxes"][:, 2:], reference["boxes"][:, 2:] - 1)
        flipped, ft = hflip(image, target, "upstream")
        w = image.shape[-1]
        torch.testing.assert_close(ft["boxes"][:, [0, 2]], (w - 1) - target["boxes"][:, [2, 0]])
        assert torch.equal(hflip(flipped, ft, "upstream")[1]["boxes"], target["boxes"])
        b, s = outputs_to_coco(target_as_output(target), target["image_id"], val.label_to_cat, "upstream")
        bbox += b
        segm += s
    gt = {(a["image_id"], round(a["bbox"][0], 3)): a["bbox"] for a in val.coco.anns.values() if not a["iscrowd"]}
    for r in bbox:  # the +1 width brings the inclusive boxes back to COCO's x, y, w, h exactly
        assert r["bbox"] == pytest.approx(gt[(r["image_id"], round(r["bbox"][0], 3))], abs=1e-4)
    metrics = evaluate_results(val, bbox, segm)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    # scoring inclusive boxes without the +1 is exactly the mistake the convention flag prevents
    wrong = [dict(r, bbox=[r["bbox"][0], r["bbox"][1], r["bbox"][2] - 1, r["bbox"][3] - 1]) for r in bbox]
    assert evaluate_results(val, wrong, segm)["bbox"]["AP"] < 1.0
