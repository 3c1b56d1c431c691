"""Smoke tests of the evidence scripts (benchmarks/compact_speed.py; the accuracy study: tests/test_accuracy_study.py).

They run the real code paths end to end on tiny settings and check the invariants the published tables rely on:
every pruned model lands on its FLOPs budget, compact models compute what the masked ones do, every method and seed
is reported, and bad flags exit with code 2.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from benchmarks import compact_speed
from benchmarks._common import WidthMacs, bisect_sparsity, retarget_explorer, uniform_widths
from benchmarks.study.model import CifarResNet
from chex_core import ChannelExplorer, ExplorationSchedule, count_macs, resnet_groups


@pytest.fixture
def one_thread():
    """The scripts set torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.numerics
def test_retarget_explorer_lands_on_budget():
    torch.manual_seed(0)
    model = CifarResNet(1, (8, 16, 16))
    groups = resnet_groups(model)
    size = (1, 8, 8)
    macs_of = WidthMacs(model, groups, size)
    target = 0.6 * macs_of.dense
    s0, m0 = bisect_sparsity(lambda s: uniform_widths(groups, s), macs_of, target)
    assert 0 < s0 < 1 and m0 == macs_of(uniform_widths(groups, s0))
    ex = ChannelExplorer(model, groups, ExplorationSchedule(1, 2, s0, s0 / 2, steps_per_unit=1))
    ex.start()
    with torch.no_grad():                        # uneven γ so the global allocation is not uniform
        for g in groups:
            model.get_submodule(g.norm).weight.uniform_(0.1, 2.0)
    s = retarget_explorer(ex, macs_of, target)
    assert ex.schedule.sparsity == s and s >= ex.schedule.delta0
    ex.explore(2)                                # last event (δ = 0): the widths the budget was set for
    assert abs(count_macs(model, size) / target - 1) < 0.05
    assert count_macs(model, size) == macs_of(list(ex.widths().values()))


def test_compact_speed_quick(tmp_path, one_thread):
    out = compact_speed.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    rows = {r["model"]: r for r in out["rows"]}
    chex = [f"chex-{res}{b}G" for res in ("", "res-") for b in ("1.2", "0.8")]
    assert set(rows) == {"dense", *chex}
    for name in chex:
        r, budget = rows[name], float(name.split("-")[-1][:-1]) * 1e9
        assert abs(r["macs"] / budget - 1) < 0.02 and r["macs"] == r["compact_macs"]
        assert r["compact_vs_masked_rel_err"] < 1e-4
        assert r["flops_ratio"] == pytest.approx(rows["dense"]["macs"] / r["macs"])
        assert r["params"] < rows["dense"]["params"]
    assert rows["chex-0.8G"]["macs"] < rows["chex-1.2G"]["macs"]
    # residual groups (--chex-residual) narrow the stream too, at the same budget
    assert not rows["chex-0.8G"]["keep_fraction_residual"]
    assert min(rows["chex-res-0.8G"]["keep_fraction_residual"].values()) < 1
    for r in rows.values():
        assert set(r["speedup"]) == {"fp32_b1", "fp32-cl_b1", "fp32_b4", "fp32-cl_b4"}
        for key, v in r["speedup"].items():          # speed-up = dense time / model time, from the reported times
            assert v == pytest.approx(rows["dense"]["latency_ms"][key] / r["latency_ms"][key], rel=1e-9), key
    assert (tmp_path / "compact_speed_resnet18_cpu_quick.md").read_text().count("| chex-") == 4
    # re-time the same widths with the load-independent CPU clock, without a new mask run
    again = compact_speed.main(["--quick", "--device", "cpu", "--clock", "cpu", "--out", str(tmp_path),
                                "--widths-from", str(tmp_path / "compact_speed_resnet18_cpu_quick.json")])
    assert torch.get_num_threads() == 1
    for r in again["rows"]:
        assert r["macs"] == rows[r["model"]]["macs"] and r.get("width_spec") == rows[r["model"]].get("width_spec")
    assert (tmp_path / "compact_speed_resnet18_cpu_cputime_quick.json").exists()
    # --round-to: every CHEX model gets a twin whose pruned widths are multiples of N (capped at dense)
    rounded = compact_speed.main(["--quick", "--device", "cpu", "--clock", "cpu", "--out", str(tmp_path),
                                  "--round-to", "8",
                                  "--widths-from", str(tmp_path / "compact_speed_resnet18_cpu_quick.json")])
    rrows = {r["model"]: r for r in rounded["rows"]}
    assert set(rrows) == set(rows) | {f"{n}-round8" for n in chex}
    dense_widths = {g.name: g.size for g in resnet_groups(torchvision.models.resnet18(), residual=True)}
    for name in chex:
        r, base = rrows[f"{name}-round8"], rows[name]
        assert all(w % 8 == 0 or w == dense_widths[n] for n, w in r["width_spec"].items())
        assert all(r["width_spec"][n] >= w for n, w in base["width_spec"].items())
        assert r["macs"] >= base["macs"]


@pytest.mark.parametrize("script,argv", [
    (compact_speed, ["--arch", "resnet18", "--budgets", "5"]),
    (compact_speed, ["--batch", "0"]),
    (compact_speed, ["--widths-from", "/nonexistent/speed.json"]),
])
def test_bad_flags_exit_2(script, argv, capsys):
    with pytest.raises(SystemExit) as e:
        script.parse_args(argv)
    assert e.value.code == 2
    assert "--" in capsys.readouterr().err.splitlines()[-1]
