"""CLS: a checkpoint written exactly as the official CHEX/NVIDIA CLS code writes it, evaluated through the upstream
evaluation command.

What the official code writes (zejiangh/Filter-GaP ``CLS/image_classification/training.py: train_loop`` →
``utils.save_checkpoint`` → ``torch.save``; the same as NVIDIA DeepLearningExamples ConvNets), per epoch::

    {"epoch": epoch + 1,                                  # int
     "arch": (args.arch, args.model_config, args.num_classes, cfg),   # a tuple (ModelAndLoss.arch), cfg None
     "state_dict": model_and_loss.model.state_dict(),     # the DDP-wrapped model: every key "module."-prefixed
     "best_prec1": best_prec1,                            # a Python float (AverageMeter of floats)
     "optimizer": optimizer.state_dict()}                 # torch SGD, two groups: "bn" params without weight decay

With ``--amp`` (apex O1, the upstream recipe) the weights stay float32; BN ``num_batches_tracked`` is int64. The
network is the fork's ``image_classification/resnet.py``, whose parameter names are torchvision's and whose ``fc``
always has 1000 outputs. ``CLS/checkpoint2model.py`` turns such a file into a bare state dict without ``module.``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import zero_every_second_channel

pytest.importorskip("torchvision")

N_IMAGENET = 1000  # the fork's networks always end in 1000 classes


class _DDPNaming(torch.nn.Module):
    """What ``DistributedDataParallel`` adds to a state dict: the wrapped network under ``module``."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def upstream_sgd(model: torch.nn.Module, lr: float = 1.024, momentum: float = 0.875,
                 weight_decay: float = 3.0517578125e-05) -> torch.optim.SGD:
    """``get_optimizer(bn_weight_decay=False)``: parameters whose name contains "bn" in a group without weight decay,
    the rest in a second group (names taken before the DDP wrap, as upstream builds the optimizer first)."""
    named = list(model.named_parameters())
    return torch.optim.SGD([{"params": [v for n, v in named if "bn" in n], "weight_decay": 0},
                            {"params": [v for n, v in named if "bn" not in n], "weight_decay": weight_decay}],
                           lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)


def write_upstream_checkpoint(path: Path, model: torch.nn.Module, arch: str, epoch: int = 249,
                              best_prec1: float = 69.6) -> dict:
    """``train_loop``'s ``save_checkpoint`` payload after one optimizer step (so momentum buffers exist)."""
    wrapped = _DDPNaming(model)
    optimizer = upstream_sgd(model)
    with torch.no_grad():  # a step that leaves the weights as they are: grads of zero still create the buffers
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    saved = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    state = {"epoch": epoch + 1, "arch": (arch, "fanin", N_IMAGENET, None), "state_dict": wrapped.state_dict(),
             "best_prec1": float(best_prec1), "optimizer": optimizer.state_dict()}
    torch.save(state, path)
    return state


def _imagenet_1000(root: Path) -> Path:
    """``root/val/<class>/x.png`` for 1000 classes, one random 8x8 image each (only val/ is read by --evaluate)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(N_IMAGENET):
        d = root / "val" / f"n{c:08d}"
        d.mkdir(parents=True)
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(d / "x.png")
    return root


def _prototype_head(model: torch.nn.Module, data: Path, image_size: int) -> None:
    """Set ``fc`` so each validation image is classified as its own class (cosine to its own feature), making
    top-1 = 100 % a proof that every tensor landed where the network expects it."""
    from CLS.data import build_loaders

    loaders = build_loaders("pytorch", str(data), batch_size=100, workers=0, image_size=image_size, need_train=False,
                            rank=0, world_size=1)
    fc, model.fc = model.fc, torch.nn.Identity()
    model.eval()
    with torch.no_grad():
        feats, labels = zip(*[(model(x), y) for x, y in loaders.val])
    feats, labels = torch.cat(feats), torch.cat(labels)
    model.fc = fc
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[labels] = torch.nn.functional.normalize(feats, dim=1)
        fc.bias.zero_()


def _summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1])


@pytest.mark.slow
def test_official_cls_checkpoint_layout_through_the_upstream_evaluation_command(tmp_path, capsys):
    from chex_core import count_macs

    from CLS import main as cls_main
    from CLS.model import build_model, read_weight_file

    torch.manual_seed(0)
    data = _imagenet_1000(tmp_path / "imagenet")
    model = build_model("resnet18", N_IMAGENET)
    for m in model.modules():  # non-trivial BN statistics, so a mis-loaded buffer changes the logits
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    zero_every_second_channel(model)
    _prototype_head(model, data, 32)
    ckpt = tmp_path / "resnet18_1gflops_69.6top1.pth.tar"
    write_upstream_checkpoint(ckpt, model, "resnet18")

    raw = torch.load(ckpt, map_location="cpu", weights_only=False)  # the file as upstream's torch.load sees it
    assert set(raw) == {"epoch", "arch", "state_dict", "best_prec1", "optimizer"}
    assert type(raw["arch"]) is tuple and raw["arch"] == ("resnet18", "fanin", 1000, None)
    assert type(raw["epoch"]) is int and type(raw["best_prec1"]) is float
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert {v.dtype for k, v in raw["state_dict"].items() if not k.endswith("num_batches_tracked")} == {torch.float32}
    assert {v.dtype for k, v in raw["state_dict"].items() if k.endswith("num_batches_tracked")} == {torch.int64}
    groups = raw["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0, 3.0517578125e-05] and raw["optimizer"]["state"]

    # upstream README: python ./main.py --data-backend pytorch --arch ${model name} --evaluate --epochs 1 -b 100
    #                  /data/imagenet --pretrained-weights ${checkpoint}.pth.tar
    # given to CLS/main.py's main() in this process (a new interpreter costs more than the evaluation; the shell
    # path is covered by tests/test_cls.py), plus --image-size 32 and -j 0 to keep 1000 images cheap on a CPU
    argv = ["--data-backend", "pytorch", "--arch", "resnet18", "--evaluate", "--epochs", "1", "-b", "100", str(data),
            "--pretrained-weights", str(ckpt), "--image-size", "32", "-j", "0"]
    assert cls_main.main(argv) == 0
    rep = _summary(capsys.readouterr().out)
    assert rep["n"] == N_IMAGENET and rep["top1"] == 100.0
    assert rep["macs"] == count_macs(model, (3, 32, 32))  # zero-aware: the pruned channels were loaded as zeros

    # CLS/checkpoint2model.py's output (bare state dict, "module." removed) is read as the same weights
    bare = tmp_path / "weights.pth"
    torch.save({k[len("module."):] if "module." in k else k: v for k, v in raw["state_dict"].items()}, bare)
    (from_ckpt, meta), (from_bare, _) = read_weight_file(str(ckpt)), read_weight_file(str(bare))
    assert meta["arch"] == "resnet18" and list(from_ckpt) == list(model.state_dict())
    assert all(torch.equal(from_ckpt[k], from_bare[k]) and torch.equal(from_ckpt[k], v)
               for k, v in model.state_dict().items())
    ckpt.unlink(), bare.unlink()  # 140 MB on a shared disk
