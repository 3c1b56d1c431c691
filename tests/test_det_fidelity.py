"""DET as NVIDIA's SSD: which images and boxes are evaluated and trained on, the detection selection
(``Encoder.decode_single`` written out below), unclipped unrounded results, and the backbone's ImageNet init through
torchvision's weights API (hub cache, local file, offline failure) with files the tests make."""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

import torchvision  # noqa: E402

from chex_tasks.coco import make_tiny_coco  # noqa: E402
from DET.box_coder import BoxCoder, dboxes300_coco  # noqa: E402
from DET.data import CocoDetection, SSDEvalTransform, SSDTrainTransform, dataset_paths  # noqa: E402
from DET.evaluate import predict  # noqa: E402
from DET.model import (BackboneWeightsError, ResNetBackbone, imagenet_weights_cache_file,  # noqa: E402
                       resolve_backbone_init)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Tiny COCO2017 edited into the cases NVIDIA's code treats specially: val image 1 without annotations,
    val image 2 and train image 3 with crowd annotations only, train image 2 with one 0.05-px-wide box more.
    Train image 1 keeps make_tiny_coco's crowd instance next to a normal one."""
    root = make_tiny_coco(tmp_path_factory.mktemp("det_fid"), n_train=5, n_val=4, image_size=64, seed=1)
    val_file, train_file = root / "annotations/instances_val2017.json", root / "annotations/instances_train2017.json"
    val = json.loads(val_file.read_text())
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] != 1]
    for a in val["annotations"]:
        a["iscrowd"] = int(a["image_id"] == 2 or a["iscrowd"])
    val_file.write_text(json.dumps(val))
    train = json.loads(train_file.read_text())
    for a in train["annotations"]:
        a["iscrowd"] = int(a["image_id"] == 3 or a["iscrowd"])
    thin = dict(train["annotations"][0], id=10_000, image_id=2, bbox=[3.0, 3.0, 0.05, 10.0], iscrowd=0)
    train["annotations"].append(thin)
    train_file.write_text(json.dumps(train))
    return root


def _raw(path: Path) -> dict:
    return json.loads(path.read_text())


def test_eval_set_drops_images_without_annotations_only(coco):
    val = CocoDetection(*dataset_paths(coco, "val"), SSDEvalTransform(), train=False)
    raw = _raw(coco / "annotations/instances_val2017.json")
    # NVIDIA COCODetection: every image with at least one annotation, crowd or not
    expected = sorted({a["image_id"] for a in raw["annotations"]})
    assert val.ids == expected and 1 not in val.ids and 2 in val.ids


def test_training_boxes_follow_the_dali_reader(coco):
    coder = BoxCoder(dboxes300_coco())
    train = CocoDetection(*dataset_paths(coco, "train"), SSDTrainTransform(coder), train=True)
    raw = _raw(coco / "annotations/instances_train2017.json")
    # DALI COCOReader: crowd boxes included, boxes with w or h < 0.1 px skipped, images left empty skipped
    usable = [a for a in raw["annotations"] if a["bbox"][2] >= 0.1 and a["bbox"][3] >= 0.1]
    assert train.ids == sorted({a["image_id"] for a in usable})
    assert 3 in train.ids  # crowd-only image
    boxes, labels = train.targets(2, 64, 64)
    n2 = sum(1 for a in usable if a["image_id"] == 2)
    assert len(boxes) == len(labels) == n2, "the 0.05-px box is not a target"
    crowd_boxes, _ = train.targets(3, 64, 64)
    assert len(crowd_boxes) == sum(1 for a in raw["annotations"] if a["image_id"] == 3) > 0
    # make_tiny_coco's own crowd instance sits in an image with other objects: a target here, dropped below
    mixed = next(a["image_id"] for a in usable if a["iscrowd"] and a["image_id"] != 3)
    n_mixed = sum(1 for a in usable if a["image_id"] == mixed)
    assert len(train.targets(mixed, 64, 64)[0]) == n_mixed
    strict = CocoDetection(*dataset_paths(coco, "train"), SSDTrainTransform(coder), train=True, crowd_as_objects=False)
    assert 3 not in strict.ids
    n_plain = sum(1 for a in usable if a["image_id"] == mixed and not a["iscrowd"])
    assert 0 < n_plain < n_mixed and len(strict.targets(mixed, 64, 64)[0]) == n_plain


def nvidia_decode_single(boxes, scores, criteria=0.5, max_output=200, max_num=200):
    """NVIDIA ``Encoder.decode_single`` (plain IoU, no clipping): per class > 0.05, best ``max_num``, greedy
    suppression of everything with IoU >= criteria, then the best ``max_output`` overall."""
    def iou(a, b):
        lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
        return inter / (area(a)[:, None] + area(b)[None] - inter)

    out = []
    for c in range(1, scores.shape[0]):
        mask = scores[c] > 0.05
        bx, sc = boxes[mask], scores[c][mask]
        order = sc.argsort()[-max_num:].tolist()
        while order:
            i = order[-1]
            out.append((c, float(sc[i]), tuple(bx[i].tolist())))
            ious = iou(bx[order], bx[i:i + 1])[:, 0]
            order = [o for o, v in zip(order, ious.tolist()) if v < criteria]
    return sorted(out, key=lambda t: -t[1])[:max_output]


def test_selection_equals_nvidia_decode_single_including_iou_ties():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(300, 2, generator=g) * 1.1 - 0.1  # some boxes reach past the image: not clipped
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 0.3 + 0.01], dim=1)
    scores = torch.softmax(torch.randn(4, 300, generator=g) * 3, dim=0)
    det = BoxCoder.select(boxes, scores, max_output=50)
    got = [(int(c), float(s), tuple(b.tolist())) for b, c, s in zip(det.boxes, det.labels, det.scores)]
    assert got == nvidia_decode_single(boxes, scores, max_output=50)
    # IoU exactly 0.5 ([0, .5]x[0, .5] vs [0, .5]x[0, .25]): NVIDIA drops the second; IoU > 0.5 would keep it
    tie = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.25]])
    probs = torch.tensor([[0.0, 0.0], [0.9, 0.8]])
    assert BoxCoder.select(tie, probs).boxes.tolist() == [[0.0, 0.0, 0.5, 0.5]]


class _FixedHeads(torch.nn.Module):
    """A stand-in detector whose outputs are given: one confident class-1 box reaching past the border."""

    def __init__(self, coder: BoxCoder):
        super().__init__()
        self.n = len(coder.dboxes)
        target = torch.tensor([[-0.1, 0.123456, 0.4, 0.654321]])
        self.locs = coder.encode(target.expand(self.n, 4)).T[None]
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        confs = torch.full((images.shape[0], 2, self.n), -10.0)
        confs[:, 1, 0] = 10.0
        return self.locs.expand(images.shape[0], -1, -1), confs


def test_results_are_neither_clipped_nor_rounded(coco):
    coder = BoxCoder(dboxes300_coco())
    val = CocoDetection(*dataset_paths(coco, "val"), SSDEvalTransform(), train=False)
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    (first, *_) = predict(_FixedHeads(coder), loader, coder, {1: 1}, torch.device("cpu"))
    x, y, w, h = first["bbox"]
    assert x == pytest.approx(-0.1 * 64, abs=1e-3) and x < 0
    assert y == pytest.approx(0.123456 * 64, abs=1e-4) and round(y, 2) != y
    assert w == pytest.approx(0.5 * 64, abs=1e-3) and h == pytest.approx((0.654321 - 0.123456) * 64, abs=1e-3)
    (clipped,) = coder.postprocess(_FixedHeads(coder).locs, torch.zeros(1, 2, coder.dboxes.xywh.shape[0]), clip=True)
    assert clipped.boxes.min() >= 0


# --------------------------------------------------------------------------------------------- backbone init
def _to_layer3(resnet: torch.nn.Module) -> dict:
    """The ResNet state dict without layer4 and fc, which the SSD backbone drops anyway (keeps test files small)."""
    return {k: v for k, v in resnet.state_dict().items() if not k.startswith(("layer4.", "fc."))}


@pytest.fixture()
def hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def test_imagenet_weights_come_from_the_torch_hub_cache(hub):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    # upstream's resnet50(pretrained=True) fetched torchvision's original ImageNet file (IMAGENET1K_V1), not the
    # newer V2 weights that torchvision's DEFAULT now names
    assert imagenet_weights_cache_file("resnet50").endswith("resnet50-0676ba61.pth")
    cached = Path(imagenet_weights_cache_file("resnet18"))
    assert cached.name == Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    assert str(cached).startswith(str(hub / "torch_home"))
    cached.parent.mkdir(parents=True)
    torch.save(_to_layer3(reference), cached)
    init = resolve_backbone_init("resnet18", download=False)
    assert init.source == "imagenet"
    backbone = ResNetBackbone("resnet18")
    init.apply(backbone)
    assert torch.equal(backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(backbone.bn1.running_var, reference.bn1.running_var)
    cached.unlink()  # the disk is shared


def test_local_file_random_init_and_one_line_failures(hub, monkeypatch):
    reference = torchvision.models.resnet18(weights=None)
    path = hub / "backbone.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in _to_layer3(reference).items()}}, path)  # CLS layout
    init = resolve_backbone_init("resnet18", str(path))
    assert init.source == "file"
    backbone = ResNetBackbone("resnet18")
    init.apply(backbone)
    assert torch.equal(backbone.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    path.unlink()
    assert resolve_backbone_init("resnet18", random_init=True).state_dict is None
    with pytest.raises(ValueError, match="exclude"):
        resolve_backbone_init("resnet18", str(path), random_init=True)
    (hub / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="junk.pth"):
        resolve_backbone_init("resnet18", str(hub / "junk.pth"))
    with pytest.raises(BackboneWeightsError, match="--backbone-path") as err:
        resolve_backbone_init("resnet18", download=False)
    assert "\n" not in str(err.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneWeightsError, match="no network.*--backbone-path") as err:
        resolve_backbone_init("resnet50")
    assert "\n" not in str(err.value)
