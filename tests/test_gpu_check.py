"""gpu_check (``python -m benchmarks.gpu_check``): the --quick --device cpu run exercises every section's code path in
seconds, so the GPU run is known to work before a GPU is lent; its checks must be able to fail."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import amp_paths, common, train_cls
from CLS.dali import dali_unavailable_reason


@pytest.fixture
def threads_back():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_cpu_run_covers_every_section(tmp_path, threads_back):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_cpu_quick.json").read_text())
    md = (tmp_path / "gpu_cpu_quick.md").read_text()
    assert res["ok"] and set(res["sections"]) == set(common.SECTIONS)
    assert all(s["ok"] and "error" not in s for s in res["sections"].values()), res["sections"]
    assert res["env"]["card"] == "cpu" and res["env"]["torch"] == torch.__version__
    assert torch.get_num_threads() >= 1

    amp = res["sections"]["amp"]
    static, dynamic = amp["paths"]
    assert static["skipped_steps"] == dynamic["skipped_steps"] == 1
    assert [s["scale_after"] for s in static["steps"]] == [128.0] * 4
    assert dynamic["steps"][1]["scale_after"] == dynamic["steps"][1]["scale_before"] / 2

    for task in res["sections"]["detseg"]["tasks"]:
        assert len(task["events"]) == 1 and all(math.isfinite(v) for v in task["losses"])

    train = res["sections"]["train"]
    rows = {r["config"]: r for r in train["rows"]}
    assert set(rows) == {"dense", "masked S=0.7", "compact k=0.45"}
    assert rows["compact k=0.45"]["macs_vs_dense"] < 0.6 and rows["masked S=0.7"]["macs_vs_dense"] < 0.4
    proj = train["projection"]
    assert proj["recipe"]["events"] == 90 and 0 < proj["compact_vs_dense"] and 0 < proj["masked_vs_dense"]
    assert train["event_s"]["masked"] > 0 and train["event_s"]["compact"] > 0 and train["mask_reapply_s"] > 0

    infer = res["sections"]["infer"]
    models = {m["model"]: m for m in infer["models"]}
    assert set(models) == {"dense", "chex-1G", "chex-1G-round8"}
    assert abs(models["chex-1G"]["macs"] / 1e9 - 1) < 0.03 and models["chex-1G-round8"]["macs"] >= models["chex-1G"]["macs"]
    assert set(models["dense"]["ms"]) == {"eager_b1", "eager_b2", "compile_b2"}          # compile: first 2 models
    assert set(models["chex-1G"]["ms"]) == {"eager_b1", "eager_b2", "compile_b2"}
    assert models["dense"]["speedup"]["eager_b1"] == 1.0 and "vs_unrounded" in models["chex-1G-round8"]

    dali = res["sections"]["dali"]
    assert "dali-gpu" in dali["skipped"] or torch.cuda.is_available()
    backends = {r["backend"] for r in dali["rows"]}
    assert "pytorch" in backends and ("dali-cpu" in backends) == (dali_unavailable_reason("dali-cpu") is None)
    for title in ("Loss scaling", "DET and SEG", "CLS training", "Compact inference", "Input pipeline"):
        assert f"## {title}" in md


def test_amp_check_catches_a_broken_scaler():
    cfg = common.Config(device=torch.device("cpu"))
    ok = amp_paths.run_path(cfg, static=True)
    assert amp_paths.problems(ok, cfg) == []
    # what a scaler that ignored the static scale, or a step that was applied despite the overflow, would log
    drifted = json.loads(json.dumps(ok))
    drifted["steps"][2]["scale_after"] = 256.0
    applied = json.loads(json.dumps(ok))
    applied["steps"][1].update(skipped=False, moved=True)
    applied["skipped_steps"] = 0
    misplaced = json.loads(json.dumps(ok))                     # the count is right, the skipped step is not
    misplaced["steps"][1]["skipped"], misplaced["steps"][2]["skipped"] = False, True
    assert any("static scale" in p for p in amp_paths.problems(drifted, cfg))
    assert any("skipped steps counted" in p for p in amp_paths.problems(applied, cfg))
    assert any(p.startswith("step 2: skipped=False") for p in amp_paths.problems(misplaced, cfg))
    silent = amp_paths.run_path(cfg, static=False, inject_at=None)
    assert amp_paths.problems(silent, cfg) == [] and silent["skipped_steps"] == 0


def test_a_failing_section_is_reported_and_fails_the_run(tmp_path, monkeypatch, threads_back):
    def boom(cfg, deadline=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setitem(gpu_check.cli.RUNNERS, "amp", boom)
    assert gpu_check.main(["--device", "cpu", "--quick", "--sections", "amp", "--out", str(tmp_path)]) == 1
    res = json.loads((tmp_path / "gpu_cpu_quick.json").read_text())
    assert not res["ok"] and "illegal memory access" in res["sections"]["amp"]["error"]
    assert "FAILED: RuntimeError" in (tmp_path / "gpu_cpu_quick.md").read_text()


def test_projection_weights_compact_densities_along_the_schedule():
    cfg = common.Config(device=torch.device("cpu"))
    t = {"dense": 1.0, "masked": 1.0}
    per_k = {1.0: 1.0, 0.6: 0.6, 0.45: 0.45, 0.3: 0.3}           # step time proportional to density
    p = train_cls.projection(cfg, 256, t, per_k, {"masked": 0.0, "compact": 0.0})
    assert p["masked_vs_dense"] == pytest.approx(1.0)
    assert p["compact_vs_dense"] == pytest.approx(p["mean_density"]) and 0.3 < p["mean_density"] < 0.6


@pytest.mark.parametrize("argv, text", [
    (["--device", "cpu", "--round-to", "0"], "--round-to"),
    (["--device", "cpu", "--widths", "/nonexistent.json"], "--widths"),
    (["--device", "cpu", "--time-budget", "0"], "--time-budget"),
])
def test_bad_flags_exit_2(argv, text, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv)
    assert e.value.code == 2 and text in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_no_gpu_says_how_to_run_on_cpu(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2 and "--device cpu --quick" in capsys.readouterr().err


def test_card_slug():
    assert common.card_slug({"card": "NVIDIA H200"}) == "nvidia_h200"
    assert common.card_slug({"card": "NVIDIA A100-SXM4-80GB"}) == "nvidia_a100_sxm4_80gb"


def test_batch_search_steps_down_past_out_of_memory(monkeypatch):
    """The GPU path's largest-batch search, with an out-of-memory error faked above batch 2."""
    cfg = common.quick_cpu(common.Config(device=torch.device("cpu")))
    cfg.max_batch = 8

    class FakeRunner:                 # a ResNet-50 per attempt would cost seconds; the loop is what is tested
        def __init__(self, *args, **kwargs):
            pass

        def step(self, x, y):
            if x.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_cls, "Runner", FakeRunner)
    batch, tried = train_cls.largest_batch(cfg)
    assert batch == 2 and tried == ["batch 8: out of memory", "batch 4: out of memory"]

    def other_error(self, x, y):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    monkeypatch.setattr(FakeRunner, "step", other_error)
    with pytest.raises(RuntimeError, match="CUDNN_STATUS"):          # only out-of-memory means "try smaller"
        train_cls.largest_batch(cfg)
