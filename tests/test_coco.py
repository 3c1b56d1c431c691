"""chex_tasks.coco: tiny COCO generator and COCOeval glue (shared by DET and SEG)."""

import json
import logging

import numpy as np
import pytest

pytest.importorskip("pycocotools")
# pycocotools' mask.decode trips a numpy-2 DeprecationWarning inside the library; nothing this project can change
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from chex_tasks.coco import (  # noqa: E402
    METRIC_NAMES,
    TINY_CATEGORIES,
    coco_evaluate,
    format_metrics,
    load_coco,
    make_tiny_coco,
)


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("coco"), n_train=8, n_val=6, image_size=96, seed=3)


def _gt_as_predictions(coco, iou_type):
    """Every non-crowd ground-truth instance as a score-1 prediction (crowd regions are 'ignore' in COCOeval)."""
    results = []
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        res = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        if iou_type == "bbox":
            res["bbox"] = list(ann["bbox"])
        else:
            res["segmentation"] = dict(ann["segmentation"])
        results.append(res)
    return results


def test_layout_and_annotations(tiny_coco):
    for split, n in (("train", 8), ("val", 6)):
        files = sorted((tiny_coco / f"{split}2017").glob("*.jpg"))
        assert len(files) == n
        assert files[0].name == "000000000001.jpg"
        coco = load_coco(tiny_coco / "annotations" / f"instances_{split}2017.json")
        assert sorted(coco.getCatIds()) == [c["id"] for c in TINY_CATEGORIES]
        anns = coco.loadAnns(coco.getAnnIds())
        assert sum(a["iscrowd"] for a in anns) == 1
        for ann in anns:
            m = coco.annToMask(ann)
            assert m.sum() == ann["area"] > 0
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    train = load_coco(tiny_coco / "annotations" / "instances_train2017.json")
    assert any(len(train.getAnnIds(imgIds=i)) == 0 for i in train.getImgIds())


def test_2014_names_and_determinism(tmp_path):
    a = make_tiny_coco(tmp_path / "a", year="2014", n_train=3, n_val=2, image_size=64, seed=5)
    b = make_tiny_coco(tmp_path / "b", year="2014", n_train=3, n_val=2, image_size=64, seed=5)
    assert (a / "train2014" / "COCO_train2014_000000000001.jpg").is_file()
    assert (a / "val2014" / "COCO_val2014_000000000002.jpg").is_file()
    for rel in ("annotations/instances_train2014.json", "train2014/COCO_train2014_000000000002.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    c = make_tiny_coco(tmp_path / "c", year="2014", n_train=3, n_val=2, image_size=64, seed=6)
    ann = "annotations/instances_train2014.json"
    assert (a / ann).read_bytes() != (c / ann).read_bytes()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_as_prediction_gives_ap_one(tiny_coco, iou_type):
    coco = load_coco(tiny_coco / "annotations" / "instances_val2017.json")
    results = _gt_as_predictions(coco, iou_type)
    first = coco_evaluate(coco, results, iou_type=iou_type)
    assert set(first) == set(METRIC_NAMES)
    assert first["AP"] == pytest.approx(1.0)
    assert first["AP50"] == pytest.approx(1.0)
    assert first["AP75"] == pytest.approx(1.0)
    # evaluating the same list again (loadRes mutates dicts) must give identical numbers
    assert coco_evaluate(coco, results, iou_type=iou_type) == first


def test_perturbed_predictions_lower_ap(tiny_coco):
    coco = load_coco(tiny_coco / "annotations" / "instances_val2017.json")
    results = _gt_as_predictions(coco, "bbox")
    for r in results:
        x, y, w, h = r["bbox"]
        r["bbox"] = [x + w * 0.4, y + h * 0.4, w, h]  # IoU ~0.36: a miss at every threshold >= 0.5
    assert coco_evaluate(coco, results)["AP"] < 0.2


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_empty_predictions_warn_and_return_zero(tiny_coco, caplog, iou_type):
    coco = load_coco(tiny_coco / "annotations" / "instances_val2017.json")
    with caplog.at_level(logging.WARNING):
        metrics = coco_evaluate(coco, [], iou_type=iou_type)
    assert metrics == {name: 0.0 for name in METRIC_NAMES}
    assert any("no predictions" in r.getMessage() for r in caplog.records)


def test_format_and_errors(tmp_path, tiny_coco):
    line = format_metrics({"AP": 0.259, "AP50": 0.43})
    assert line.startswith("AP 25.90 | AP50 43.00 | AP75 0.00") and "\n" not in line
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_coco(bad)
    coco = load_coco(tiny_coco / "annotations" / "instances_val2017.json")
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(coco, [], iou_type="keypoints")
    json.loads((tiny_coco / "annotations" / "instances_val2017.json").read_text())
