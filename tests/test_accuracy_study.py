"""The accuracy study (benchmarks/accuracy_study.py, benchmarks/study/): its task, its baselines and its bookkeeping.

What the published tables rely on, checked on tiny settings: validation patches never share a pixel with anything
training can see; the data order is a function of the seed; Torch-Pruning's baseline lands on its MACs budget with
coupled residual channels; every (method, budget, epochs, seed) is reported with its achieved MACs; an interrupted
sweep resumes without re-training finished runs and refuses runs of another configuration; bad flags exit with 2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import accuracy_study
from benchmarks.study import methods, report, tasks
from benchmarks.study.model import CifarResNet
from chex_core import count_macs

pytest.importorskip("skimage", reason="the study's extra: pip install -e '.[study]'")
pytest.importorskip("torch_pruning", reason="the study's extra: pip install -e '.[study]'")


@pytest.fixture
def one_thread():
    """The study sets torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _coverage(shape: tuple[int, int], pos: np.ndarray, p: int) -> np.ndarray:
    """Boolean map of every pixel covered by a ``p``×``p`` window at one of ``pos`` (top-left corners)."""
    hits = np.zeros((shape[0] + 1, shape[1] + 1))
    np.add.at(hits, (pos[:, 0], pos[:, 1]), 1)
    np.add.at(hits, (pos[:, 0] + p, pos[:, 1]), -1)
    np.add.at(hits, (pos[:, 0], pos[:, 1] + p), -1)
    np.add.at(hits, (pos[:, 0] + p, pos[:, 1] + p), 1)
    return hits.cumsum(0).cumsum(1)[:-1, :-1] > 0


def test_photo_patches_train_and_val_pixels_are_disjoint():
    p, grid = 24, 4
    for k, img in enumerate(tasks.photos(256)):
        tr, va = tasks.split_positions(img, k, grid, p, 0.02, split_seed=0)
        assert len(tr) > 1000 and len(va) > 128, tasks.PHOTOS[k]
        seen, held_out = _coverage(img.shape, tr, p), _coverage(img.shape, va, p)
        assert not (seen & held_out).any(), tasks.PHOTOS[k]
        assert 0.05 < held_out.mean() <= 0.26            # at most the quarter of the photo in validation cells
        cells = tasks.val_cells(grid, k, 0)              # one per row and one per column: spread over the photo
        assert {c // grid for c in cells} == {c % grid for c in cells} == set(range(grid))
    assert tasks.val_cells(grid, 0, 0) != tasks.val_cells(grid, 0, 1)


def test_photo_patches_task_is_deterministic_and_seeded():
    cfg = {"task": "photo-patches", "res": 8, "photo_side": 48, "grid": 4, "min_std": 0.02, "val_per_class": 4,
           "train_per_epoch": 64, "split_seed": 0, "batch": 32}
    t = tasks.load_task(cfg)
    assert t.x_val.shape == (4 * len(tasks.PHOTOS), 1, 8, 8) and t.num_classes == len(tasks.PHOTOS)
    assert torch.equal(t.y_val.bincount(), torch.full((len(tasks.PHOTOS),), 4))
    # every patch is standardised on its own: no brightness or contrast cue survives
    flat = t.x_val.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(len(flat)), atol=1e-4)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(len(flat)), atol=1e-3)
    t2 = tasks.photo_patches_task(8, 48, 4, 0.02, 4, 64, 0, 32)          # rebuilt from scratch: same validation set
    assert torch.equal(t.x_val, t2.x_val) and torch.equal(t.y_val, t2.y_val)
    a, b, c = (list(t.train_stream(s, 32)()) for s in (0, 0, 1))
    assert len(a) == t.steps_per_epoch == 2 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    stream = t.train_stream(0, 32)
    first, second = list(stream()), list(stream())                       # a later epoch draws fresh crops
    assert not torch.equal(first[0][0], second[0][0])


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.12])
def test_torch_pruning_baseline_lands_on_budget_with_coupled_residual_channels(budget):
    torch.manual_seed(0)
    model = CifarResNet(2, (16, 32, 64), num_classes=17)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = (1, 24, 24)
    dense = count_macs(model, size, zero_aware=False)
    small, (r, r3) = methods.tp_prune_to_macs(model, size, budget * dense)
    assert abs(count_macs(small, size, zero_aware=False) / (budget * dense) - 1) < 0.02
    assert 0 < r < 1 and 0 <= r3 <= r
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())    # the dense model is untouched
    # the residual stream was pruned as one group per stage: the stem, every block's output and the downsample agree
    for stage, stem in ((small.layer1, small.conv1), (small.layer2, small.layer2[0].downsample[0]),
                        (small.layer3, small.layer3[0].downsample[0])):
        assert {b.conv2.out_channels for b in stage} == {stem.out_channels}
        assert stem.out_channels < {"layer1": 16, "layer2": 32, "layer3": 64}[
            next(n for n, m in small.named_children() if m is stage)]
    assert small.fc.out_features == 17 and small.fc.in_features == small.layer3[-1].conv2.out_channels
    assert small(torch.randn(2, *size)).shape == (2, 17)


def test_accuracy_study_quick_reports_every_run_and_resumes(tmp_path, one_thread):
    out = accuracy_study.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot"])
    runs, rows, meta = out["runs"], out["summary"], out["meta"]
    want = set(accuracy_study.default_methods())
    assert {"dense", "chex", "tp-l1-init", "tp-l1-half"} <= want
    assert {(r["method"], r["epochs"]) for r in rows} == {(m, e) for m in want for e in (2, 3)}
    assert len(runs) == 2 * 2 * len(want) and all(r["n"] == 2 for r in rows)
    for r in runs:
        correct = r["val_top1"] * meta["n_val"] / 100          # top-1 counts whole validation images
        assert correct == pytest.approx(round(correct), abs=1e-6) and round(correct) <= meta["n_val"], r
        if r["method"] == "dense":
            assert r["macs"] == r["dense_macs"] and r["budget"] == 1.0
            continue
        assert r["budget"] == 0.5 and r["macs"] <= r["dense_macs"]
        if r["method"].startswith("chex"):
            assert r["masked_macs"] == r["macs"] and r["macs"] <= r["target_macs"]    # compact == masked ≤ budget
            assert r["events"] >= 1
        else:
            assert r["pruned_at_epoch"] == (r["epochs"] // 2 if r["method"] == "tp-l1-half" else 0)
        assert abs(r["macs_error"]) < 0.15, r        # 8-channel toy layers: one channel is a big MACs step
    md = (tmp_path / "accuracy_study_quick.md").read_text()
    assert "| chex |" in md and "| tp-l1-init |" in md and "Training length at 50 % of dense MACs" in md
    assert "chex at 50 % MACs, 3 epochs:" in md
    assert (tmp_path / "accuracy_study_quick.csv").exists()
    assert len((tmp_path / "accuracy_study_quick_runs.csv").read_text().splitlines()) == len(runs) + 1
    # the reports can be rebuilt from the saved runs alone, identically
    (tmp_path / "accuracy_study_quick.md").unlink()
    again = accuracy_study.main(["--from-json", str(tmp_path / "accuracy_study_quick.json"), "--no-plot"])
    assert (tmp_path / "accuracy_study_quick.md").read_text() == md and again["summary"] == rows
    # restarting the sweep re-trains nothing and reports the same runs
    resumed = accuracy_study.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot"])
    assert resumed["meta"]["resumed_runs"] == len(runs) and resumed["runs"] == runs
    # a sweep still in progress (here: a third seed not trained yet) can be reported without training anything
    partial = accuracy_study.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot", "--seeds", "3",
                                   "--report-only"])
    assert partial["runs"] == runs and partial["summary"] == rows
    with pytest.raises(SystemExit) as e:
        accuracy_study.main(["--quick", "--out", str(tmp_path / "empty"), "--no-plot", "--report-only"])
    assert e.value.code == 2
    # ... but refuses run files written under another configuration
    with pytest.raises(SystemExit) as e:
        accuracy_study.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot", "--lr", "0.05"])
    assert e.value.code == 2


def test_legacy_baselines_and_ablations_still_run(tmp_path, one_thread):
    legacy = list(methods.LEGACY + methods.ABLATIONS)
    out = accuracy_study.main(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-plot", "--seeds", "1",
                               "--epochs", "2", "--methods", *legacy])
    assert sorted(r["method"] for r in out["runs"]) == sorted(legacy)
    for r in out["runs"]:
        assert r["macs"] <= r["target_macs"] and r["macs"] < r["dense_macs"], r


def test_verdict_rule():
    a = {"top1_mean": 80.0, "top1_std": 1.0, "n": 5}
    assert report.verdict(a, {"top1_mean": 77.0, "top1_std": 1.0, "n": 5}, 0.05)[0] == "beats"
    assert report.verdict(a, {"top1_mean": 79.0, "top1_std": 1.0, "n": 5}, 0.05)[0] == "ties with"   # < 2 s.e.
    assert report.verdict(a, {"top1_mean": 82.0, "top1_std": 0.0, "n": 5}, 0.05)[0] == "loses to"
    exact = {"top1_mean": 80.0, "top1_std": 0.0, "n": 5}
    assert report.verdict(exact, {"top1_mean": 79.8, "top1_std": 0.0, "n": 5}, 0.5)[0] == "ties with"  # < 1 image
    assert report.verdict(exact, {"top1_mean": 79.4, "top1_std": 0.0, "n": 5}, 0.5)[0] == "beats"
    one = {"top1_mean": 70.0, "top1_std": 0.0, "n": 1}                 # a single seed has no spread: no verdict
    assert report.verdict(a, one, 0.05)[0] == report.verdict(one, a, 0.05)[0] == "cannot yet be compared with"


def test_accuracy_study_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"method": m, "budget": 1.0 if m == "dense" else b, "epochs": e, "n": 2, "macs_mean": 1e6 * b,
             "macs_frac_mean": b, "top1_mean": 70.0 + 10 * b, "top1_std": 0.5}
            for m in report.ORDER for b in (0.5, 0.25) for e in ((15, 45) if b == 0.25 else (15,))]
    path = tmp_path / "p.png"
    assert report.plot(rows, path, "t") and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv", [
    ["--budgets", "1.5"],
    ["--epochs", "1"],
    ["--epochs", "45", "15"],
    ["--long-budgets", "0.3"],
    ["--methods", "nonsense"],
    ["--from-json", "/nonexistent/sweep.json"],
    ["--photo-side", "40"],
])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        accuracy_study.parse_args(argv)
    assert e.value.code == 2
    assert "--" in capsys.readouterr().err.splitlines()[-1]

