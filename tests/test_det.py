"""DET: SSD300 default boxes, box coding, loss, data, checkpoints mapping, CLI, and the upstream commands end to end."""

import os
import pathlib
import shutil
import sys

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from torchvision.ops import box_iou  # noqa: E402

from chex_core import checkpoint as ckpt_utils  # noqa: E402
from chex_core import resnet_groups  # noqa: E402
from chex_tasks.coco import make_tiny_coco  # noqa: E402
from DET import main as det_main  # noqa: E402
from DET.box_coder import BoxCoder, dboxes300_coco  # noqa: E402
from DET.data import CocoDetection, DataError, SSDEvalTransform, SSDTrainTransform, dataset_paths  # noqa: E402
from DET import evaluate as det_evaluate  # noqa: E402
from DET.evaluate import evaluate  # noqa: E402
from DET.model import (SSD300, MultiBoxLoss, StateDictMismatch, load_pretrained_backbone,  # noqa: E402
                       load_state_dict_checked, map_upstream_state_dict)
from conftest import free_port, run_process_group  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DET_MAIN = REPO / "DET" / "main.py"


@pytest.fixture(scope="module")
def coder():
    return BoxCoder(dboxes300_coco())


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("det_coco"), n_train=8, n_val=4, image_size=128, seed=0)


def test_default_boxes():
    d = dboxes300_coco()
    assert len(d) == 8732
    assert d.num_defaults == [4, 6, 6, 6, 4, 4]
    assert d.xywh.min() >= 0 and d.xywh.max() <= 1
    # first map: 38x38 cells, box centres on the cell grid (stride 8 px)
    assert torch.allclose(d.xywh[0, :2], torch.tensor([0.5 / 37.5, 0.5 / 37.5]))
    # last map (1x1, 4 shapes): scale 261 px square, sqrt(261*315) square, then 2:1 and 1:2 (clamped to 1)
    s1, s2, r = 261 / 300, (261 * 315) ** 0.5 / 300, 2 ** 0.5
    expected = torch.tensor([[.5, .5, s1, s1], [.5, .5, s2, s2], [.5, .5, s1 * r, s1 / r], [.5, .5, s1 / r, s1 * r]])
    assert torch.allclose(d.xywh[-4:], expected.clamp(0, 1))


def test_encode_decode_round_trip(coder):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 8732, 2, generator=g) * 0.6
    wh = torch.rand(50, 8732, 2, generator=g) * 0.35 + 0.01
    boxes = torch.cat([xy, xy + wh], dim=-1)
    assert torch.allclose(coder.decode(coder.encode(boxes)), boxes, atol=1e-5)
    # default boxes encode to zero offsets
    assert coder.encode(coder.dboxes.ltrb).abs().max() < 1e-5


def test_matching_every_object_gets_a_box(coder):
    gt = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.95], [0.0, 0.0, 0.02, 0.03]])
    labels = torch.tensor([1, 2, 3])
    offsets, matched = coder.encode_target(gt, labels)
    assert offsets.shape == (8732, 4) and matched.shape == (8732,)
    assert set(matched.unique().tolist()) == {0, 1, 2, 3}  # even the 6x9 px box is matched
    decoded = coder.decode(offsets)
    for k in range(3):
        assert torch.allclose(decoded[matched == k + 1], gt[k].expand((matched == k + 1).sum(), 4), atol=1e-5)
    empty_offsets, empty_labels = coder.encode_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (empty_labels == 0).all() and empty_offsets.abs().max() < 1e-5


def test_postprocess_decodes_and_suppresses(coder):
    n = len(coder.dboxes)
    locs = torch.zeros(1, 4, n)
    confs = torch.full((1, 3, n), -10.0)
    confs[0, 0] = 10.0  # background everywhere
    target = 5000
    overlapping = coder.dboxes.ltrb[target]
    # every default box overlapping box `target` strongly votes class 2: NMS must leave a single detection
    strong = (box_iou(overlapping[None], coder.dboxes.ltrb)[0] > 0.7).nonzero().flatten()
    confs[0, 0, strong] = -10.0
    confs[0, 2, strong] = 10.0
    confs[0, 2, target] = 12.0
    (det,) = coder.postprocess(locs, confs)
    assert det.labels.tolist() == [2]
    assert torch.allclose(det.boxes[0], coder.dboxes.ltrb[target].clamp(0, 1))
    (none,) = coder.postprocess(locs, torch.zeros(1, 3, n).index_fill_(1, torch.tensor([0]), 20.0))
    assert none.boxes.shape == (0, 4)


def test_loss_hard_negative_mining(coder):
    torch.manual_seed(0)
    n = len(coder.dboxes)
    offsets, labels = coder.encode_target(torch.tensor([[0.2, 0.2, 0.6, 0.7]]), torch.tensor([1]))
    locs = torch.randn(2, 4, n, requires_grad=True)
    confs = torch.randn(2, 3, n, requires_grad=True)
    empty_labels = torch.zeros(n, dtype=torch.long)
    losses = MultiBoxLoss()(locs, confs, torch.stack([offsets, offsets]), torch.stack([labels, empty_labels]))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    pos = int((labels > 0).sum())
    boxes_with_conf_grad = (confs.grad[0].abs().sum(0) > 0).sum().item()
    assert boxes_with_conf_grad == 4 * pos  # positives + 3:1 hard negatives
    assert confs.grad[1].abs().sum() == 0 and locs.grad[1].abs().sum() == 0  # image without objects adds nothing
    assert (locs.grad[0].abs().sum(0) > 0).sum().item() == pos


def test_model_shapes_and_backbone_groups():
    model = SSD300("resnet18", num_classes=4).eval()
    with torch.no_grad():
        locs, confs = model(torch.randn(1, 3, 300, 300))
    assert locs.shape == (1, 4, 8732) and confs.shape == (1, 4, 8732)
    assert model.backbone(torch.randn(1, 3, 300, 300)).shape[-2:] == (38, 38)
    groups = resnet_groups(model.backbone)
    assert len(groups) == 6  # resnet18 layers 1-3: 2 BasicBlocks each, one group per block
    assert all(g.producer.startswith("layer") for g in groups)


def _to_upstream(state):
    """Our names → the upstream NVIDIA/CHEX names, as a DDP-saved (``module.``) dict."""
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    out = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            first, rest = k[len("backbone."):].split(".", 1)
            k = f"feature_extractor.feature_extractor.{names[first]}.{rest}"
        out["module." + k] = v
    return out


def test_upstream_checkpoint_mapping_and_pretrained_backbone():
    import torchvision

    src = SSD300("resnet18", num_classes=4)
    dst = SSD300("resnet18", num_classes=4)
    load_state_dict_checked(dst, map_upstream_state_dict(_to_upstream(src.state_dict())), "upstream")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(StateDictMismatch, match="cannot be mapped"):
        map_upstream_state_dict({"module.feature_extractor.feature_extractor.7.weight": torch.zeros(1)})
    with pytest.raises(StateDictMismatch, match="shape mismatch"):
        load_state_dict_checked(SSD300("resnet18", num_classes=5), src.state_dict(), "ckpt")
    tv = torchvision.models.resnet18(weights=None)
    load_pretrained_backbone(dst.backbone, {"state_dict": {"module." + k: v for k, v in tv.state_dict().items()}},
                             "cls.pth")
    assert torch.equal(dst.backbone.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)


def test_dataset_and_bad_data(tiny_coco, coder, tmp_path):
    img_dir, ann = dataset_paths(tiny_coco, "train")
    train = CocoDetection(img_dir, ann, SSDTrainTransform(coder), train=True)
    assert len(train) == 7  # the image without annotations is dropped
    assert train.label_map == {1: 1, 3: 2, 7: 3}
    image, offsets, labels = train[0]
    assert image.shape == (3, 300, 300) and offsets.shape == (8732, 4) and labels.shape == (8732,)
    assert (labels > 0).any() and labels.max() <= 3
    val = CocoDetection(*dataset_paths(tiny_coco, "val"), SSDEvalTransform(), train=False)
    _, image_id, size = val[0]
    assert image_id == val.ids[0] and size.tolist() == [128, 128]

    broken = tmp_path / "broken"
    shutil.copytree(tiny_coco, broken)
    missing = sorted((broken / "train2017").glob("*.jpg"))[2]
    missing.unlink()
    with pytest.raises(DataError, match=missing.name):
        CocoDetection(*dataset_paths(broken, "train"), SSDTrainTransform(coder), train=True)
    corrupt = sorted((broken / "val2017").glob("*.jpg"))[0]
    corrupt.write_bytes(b"not a jpeg")
    val = CocoDetection(*dataset_paths(broken, "val"), SSDEvalTransform(), train=False)
    with pytest.raises(DataError, match=corrupt.name):
        val[0]
    (broken / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DataError, match="instances_val2017.json"):
        CocoDetection(*dataset_paths(broken, "val"), SSDEvalTransform(), train=False)


@pytest.mark.numerics
def test_loss_falls_on_tiny_set(tiny_coco, coder):
    """Sixteen SGD steps on 2 fixed tiny-COCO images: the SSD loss must fall far below its start (learnable data,
    correct targets). ResNet-18 backbone keeps this CPU test short; the architecture code path is the same.

    The CPU's kernels change the trajectory from the first step on, so the verdict must not hinge on it: at lr 0.01
    this from-scratch SSD on a 2-image batch jumped 2x between steps (and failed on an AVX2 machine); at lr 0.003 the
    loss ends at 0.06-0.11 of its start (AVX-512, AVX2 and baseline x86-64 kernels, 1 or 2 threads), while with
    targets shuffled at every step (nothing to learn) it stays at ~0.75: the 0.3 threshold is 2.5x from both."""
    torch.manual_seed(0)
    val = CocoDetection(*dataset_paths(tiny_coco, "val"), SSDEvalTransform(), train=False)
    images, offsets, labels = [], [], []
    for i in range(2):
        image, image_id, _ = val[i]
        boxes, cats = val.targets(image_id, 128, 128)
        o, lab = coder.encode_target(boxes, cats)
        images.append(image), offsets.append(o), labels.append(lab)
    images, offsets, labels = torch.stack(images), torch.stack(offsets), torch.stack(labels)
    model = SSD300("resnet18", num_classes=4)
    optimizer = det_main.make_optimizer(model, lr=0.003, momentum=0.9, weight_decay=5e-4)
    criterion = MultiBoxLoss()
    history = []
    for _ in range(16):
        loss = sum(criterion(*model(images), offsets, labels).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history)))
    # the last three steps against the untrained model's loss (history[0] is measured before any update)
    assert sum(history[-3:]) / 3 < 0.3 * history[0], history
    print("loss history:", [round(v, 2) for v in history])
    # the trained model evaluated twice through the COCOeval path gives identical metrics
    loader = torch.utils.data.DataLoader(val, batch_size=4)
    inverse = {label: cat for cat, label in val.label_map.items()}
    first = evaluate(model, loader, coder, inverse, torch.device("cpu"))
    assert first == evaluate(model, loader, coder, inverse, torch.device("cpu"))
    assert set(first) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} and all(0 <= v <= 1 for v in first.values())
    assert model.training  # evaluate() restores the mode


def test_lr_schedule(tiny_coco, coder):
    """NVIDIA SSD: warm-up over --warmup iterations, x0.1 at every --multistep epoch (iterations/epoch = 10)."""
    from types import SimpleNamespace

    from DET.task import DetTask

    args = det_main.parse_args(["--data", str(tiny_coco), "--warmup", "300", "--multistep", "430", "540"])
    loaders = SimpleNamespace(train_set=SimpleNamespace(label_map={1: 1}))
    f = DetTask(args, loaders, coder).lr_schedule(SimpleNamespace(steps_per_epoch=10))
    assert f(0) == pytest.approx(1 / 300)
    assert f(299) == pytest.approx(1.0)
    assert f(4300) == pytest.approx(0.1)
    assert f(5400) == pytest.approx(0.01)


@pytest.mark.parametrize("argv, flag", [
    (["--channel_sparsity", "1.5"], "--channel_sparsity"),
    (["--backbone", "vgg16"], "--backbone"),
    (["--data", "/nonexistent/coco"], "--data"),
    (["--bs", "1"], "--bs"),
    (["--mode", "evaluation"], "--checkpoint"),
    (["--multistep", "540", "430"], "--multistep"),
])
def test_bad_flags_exit_2_with_one_line(argv, flag, tiny_coco, capsys):
    if "--data" not in argv:
        argv = argv + ["--data", str(tiny_coco)]
    with pytest.raises(SystemExit) as exc:
        det_main.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_legacy_local_rank_flag_accepted(tiny_coco):
    for argv in (["--local_rank=1"], ["--local-rank=0"], ["--local_rank", "3"]):
        args = det_main.parse_args(argv + ["--data", str(tiny_coco)])
        assert args.mode == "training"


def _run(cmd, cwd, timeout=240, expect_rc=0):
    """Run ``cmd`` in its own process group (killed on timeout); check its exit status; return its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    run = run_process_group(cmd, cwd=cwd, env=env, timeout=timeout)
    assert run.returncode == expect_rc, run.stdout[-4000:]
    return run.stdout


def _train_cmd(data, epochs):
    # the upstream command, verbatim except: data path, --epoch, --bs, tiny --delta_T/--T_max, and the documented
    # test-size flags (one iteration per epoch, in-process data loading, no in-training evaluation)
    return [str(DET_MAIN), "--backbone", "resnet50", "--warmup", "300", "--bs", "2", "--amp", "--data", str(data),
            "--epoch", str(epochs), "--multistep", "430", "540", "--grow_prune", "--channel_sparsity", "0.5",
            "--init_channel_ratio", "0.2", "--delta_T", "1", "--T_max", "2", "--save", "./logs",
            "--max-iters-per-epoch", "1", "--num-workers", "0", "--eval-on-epochs"]


@pytest.mark.slow
def test_upstream_commands_two_processes(tiny_coco, tmp_path, monkeypatch):
    """Legacy launcher (epoch 0, first CHEX event) → torchrun resume (epoch 1, last event) → upstream evaluation.
    The backbone starts from torchvision's ImageNet file, as upstream's: here a stand-in the test puts in the hub cache
    (up to layer3, the part SSD uses), which rank 0 finds there and rank 1 then reads without downloading."""
    import torchvision

    from DET.model import imagenet_weights_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = pathlib.Path(imagenet_weights_cache_file("resnet50"))
    cached.parent.mkdir(parents=True)
    torch.save({k: v for k, v in torchvision.models.resnet50().state_dict().items()
                if not k.startswith(("layer4.", "fc."))}, cached)
    legacy = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}"]
    out = _run(legacy + _train_cmd(tiny_coco, 1), tmp_path)
    assert "CHEX event 1 at step 1" in out and "world 2" in out
    assert f"backbone initialised from torchvision resnet50 IMAGENET1K_V1 ({cached})" in out
    first = ckpt_utils.load_checkpoint(str(tmp_path / "logs" / "epoch_0.pt"))
    assert first["epoch"] == 1 and first["iteration"] == 1 and first["explorer"]["event_count"] == 1

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = _run(torchrun + _train_cmd(tiny_coco, 2) + ["--checkpoint", "logs/epoch_0.pt"], tmp_path)
    cached.unlink()  # 34 MB on a shared disk
    assert "resuming from logs/epoch_0.pt (epoch 1 done, iteration 1)" in out
    assert "CHEX event 2 at step 2" in out
    ckpt = ckpt_utils.load_checkpoint(str(tmp_path / "logs" / "epoch_1.pt"))
    assert ckpt["iteration"] == 2 and ckpt["explorer"]["event_count"] == 2
    assert ckpt["label_map"] == {1: 1, 3: 2, 7: 3} and ckpt["args"]["backbone"] == "resnet50"
    # pruned channels are exactly zero in the saved weights (masks enforced under DDP and bf16 autocast)
    masks = ckpt["explorer"]["masks"]
    model = SSD300("resnet50", num_classes=4)
    groups = resnet_groups(model.backbone)
    kept = sum(int(masks[g.name].sum()) for g in groups) / sum(g.size for g in groups)
    assert kept == pytest.approx(0.5, abs=0.01)
    for g in groups[:5]:
        w = ckpt["model"][f"backbone.{g.producer}.weight"]
        assert w[~masks[g.name]].abs().sum() == 0 and w[masks[g.name]].abs().sum() > 0
    assert (tmp_path / "logs" / "model_compact.pt").is_file()

    evaluation = [sys.executable, str(DET_MAIN), "--backbone", "resnet50", "--mode", "evaluation", "--checkpoint",
                  "logs/epoch_1.pt", "--data", str(tiny_coco), "--num-workers", "0"]
    out = _run(evaluation, tmp_path)
    assert "AP " in out and "AP50" in out and "APl" in out
    assert "FLOPs reduction" in out
    # a checkpoint for another backbone: one error line, exit status 1 (in-process: saves a torch import)
    rc = det_main.main(["--backbone", "resnet101", "--mode", "evaluation", "--checkpoint",
                        str(tmp_path / "logs" / "epoch_1.pt"), "--data", str(tiny_coco), "--num-workers", "0"])
    assert rc == 1


def test_compact_training_trains_resumes_and_exports(tiny_coco, tmp_path):
    """--compact-training on the SSD backbone: the backbone really shrinks during training, a compact checkpoint
    resumes (and refuses a resume without the flag), and the exported model evaluates."""
    base = ["--backbone", "resnet18", "--random-backbone", "--bs", "4", "--data", str(tiny_coco), "--multistep", "10",
            "--warmup", "2",
            "--grow_prune", "--channel_sparsity", "0.5", "--init_channel_ratio", "0.2", "--delta_T", "1",
            "--T_max", "2", "--save", str(tmp_path), "--max-iters-per-epoch", "1", "--num-workers", "0",
            "--eval-on-epochs", "99"]
    assert det_main.main(base + ["--epoch", "3", "--compact-training"]) == 0
    ck = torch.load(tmp_path / "epoch_2.pt", weights_only=True)
    assert ck["physical"]["compact"]
    dense = SSD300("resnet18", num_classes=4).backbone.state_dict()
    shrunk = [k for k, v in ck["model"].items() if k.startswith("backbone.") and v.shape != dense[k[9:]].shape]
    assert shrunk, "the trained backbone should be physically narrower"
    with pytest.raises(SystemExit) as exc:       # a user error: one line naming --resume, exit 2
        det_main.main(base + ["--epoch", "4", "--checkpoint", str(tmp_path / "epoch_2.pt")])
    assert exc.value.code == 2
    assert det_main.main(base + ["--epoch", "4", "--compact-training",
                                 "--checkpoint", str(tmp_path / "epoch_2.pt")]) == 0
    assert torch.load(tmp_path / "epoch_3.pt", weights_only=True)["iteration"] == 4
    assert det_main.main(["--backbone", "resnet18", "--mode", "evaluation", "--data", str(tiny_coco),
                          "--checkpoint", str(tmp_path / "model_compact.pt"), "--num-workers", "0"]) == 0


def test_residual_flag_narrows_the_heads_and_the_export_equals_the_masked_model(tiny_coco, tmp_path):
    """--chex-residual: layer3's residual stream is explored with the layers that read it outside the backbone (the
    first extra block and the first loc/conf heads); model_compact.pt, rebuilt from its width_spec by --mode
    evaluation's loader, computes what the masked model computes."""
    argv = ["--backbone", "resnet18", "--bs", "2", "--data", str(tiny_coco), "--multistep", "10", "--warmup", "2",
            "--grow_prune", "--channel_sparsity", "0.5", "--init_channel_ratio", "0.2", "--delta_T", "1",
            "--T_max", "2", "--save", str(tmp_path), "--max-iters-per-epoch", "1", "--num-workers", "0",
            "--eval-on-epochs", "99", "--chex-residual", "--epoch", "2", "--seed", "3", "--random-backbone"]
    torch.set_num_threads(1)
    assert det_main.main(argv) == 0
    masked = SSD300("resnet18", num_classes=4)
    masked.load_state_dict(torch.load(tmp_path / "epoch_1.pt", weights_only=True)["model"])
    _, state, spec = det_evaluate.read_model_checkpoint(str(tmp_path / "model_compact.pt"), "resnet18")
    assert {"layer1.residual", "layer3.residual"} <= set(spec)
    small = det_evaluate.build_compact_ssd("resnet18", 4, spec)       # what --mode evaluation rebuilds
    load_state_dict_checked(small, state, "model_compact.pt")
    width = spec["layer3.residual"]
    assert small.loc[0].in_channels == small.conf[0].in_channels == small.additional_blocks[0][0].in_channels \
        == width < 256
    x = torch.randn(1, 3, 300, 300, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(small.double().eval()(x), masked.double().eval()(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
