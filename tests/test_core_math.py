"""Pure math of chex_core: CSS criteria, regrowth sampling, allocation and the schedule."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from chex_core.allocate import global_keep_counts, keep_counts, uniform_keep_counts
from chex_core.css import leverage_scores, qr_pivots, select_channels, weight_matrix
from chex_core.regrow import projection_residuals, regrow_channels
from chex_core.schedule import ExplorationSchedule


def planted_weight(seed=0, c_out=12, rows=40, rank=4, noise=1e-4):
    """Conv weight whose channel matrix has ``rank`` planted independent columns; the others are small multiples
    of combinations of them, so any good CSS must pick exactly the planted ones first."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rows, rank, generator=g, dtype=torch.float64) * 10
    x = torch.randn(rows, c_out, generator=g, dtype=torch.float64) * noise
    planted = torch.randperm(c_out, generator=g)[:rank].sort().values
    x[:, planted] += basis
    others = [j for j in range(c_out) if j not in planted.tolist()]
    x[:, others] += 0.1 * basis @ torch.randn(rank, len(others), generator=g, dtype=torch.float64)
    w = x.t().reshape(c_out, rows // 4, 2, 2).float()
    return w, planted


@pytest.mark.numerics
@pytest.mark.parametrize("criterion", ["qr", "leverage"])
@pytest.mark.parametrize("seed", range(5))
def test_planted_columns_are_recovered(criterion, seed):
    w, planted = planted_weight(seed)
    assert torch.equal(select_channels(w, planted.numel(), criterion), planted)


@pytest.mark.numerics
def test_qr_agrees_with_scipy_pivot_order():
    w = torch.randn(16, 4, 3, 3)
    x = w.reshape(16, -1).t().double().numpy()
    _, _, piv = scipy.linalg.qr(x, pivoting=True)
    assert np.array_equal(qr_pivots(weight_matrix(w)).numpy(), piv)
    assert torch.equal(select_channels(w, 5, "qr"), torch.sort(torch.from_numpy(piv[:5])).values)


def test_wide_matrix_falls_back_to_l1():
    w = torch.randn(32, 2, 1, 1)          # C_in*k*k = 2 < C_out = 32
    w[7] *= 100
    w[3] *= 50
    for crit in ("qr", "leverage", "l1"):
        assert torch.equal(select_channels(w, 2, crit), torch.tensor([3, 7]))


@pytest.mark.numerics
@pytest.mark.parametrize("criterion", ["qr", "leverage"])
def test_choice_past_the_numerical_rank_ignores_rounding_noise(criterion):
    """k above the rank of the live columns (a residual stream whose producers' inputs were squeezed): the picks past
    the rank must not be decided by rounding noise, or a compact model, another CPU or a resumed run would keep other
    channels. Perturbing the weight at 1e-15 relative must not change the choice; the extra picks follow L1."""
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(12, 16, 1, 1, dtype=torch.float64)
    w[:, :3] = torch.randn(12, 3, 1, 1, generator=g, dtype=torch.float64)   # rank 3: 13 zero input rows
    base = select_channels(w, 6, criterion)
    for trial in range(20):
        noise = torch.randn(w.shape, generator=g, dtype=torch.float64) * 1e-15 * w.abs().max()
        assert torch.equal(select_channels(w + noise * (w != 0), 6, criterion), base), trial
    first3 = select_channels(w, 3, criterion)          # the criterion's own picks up to the rank are kept
    assert set(first3.tolist()) <= set(base.tolist())
    l1 = w.abs().sum(dim=(1, 2, 3))
    l1[first3] = -1
    assert set(base.tolist()) == set(first3.tolist()) | set(torch.topk(l1, 3).indices.tolist())


def test_pruned_zero_columns_are_never_selected_over_live_ones():
    w = torch.randn(10, 8, 3, 3)
    w[[1, 4, 6]] = 0
    for crit in ("qr", "leverage", "l1"):
        chosen = select_channels(w, 7, crit)
        assert not set(chosen.tolist()) & {1, 4, 6}


def test_select_rejects_bad_input():
    with pytest.raises(ValueError, match="criterion"):
        select_channels(torch.randn(4, 4, 1, 1), 2, "nope")
    with pytest.raises(ValueError, match="keep"):
        select_channels(torch.randn(4, 4, 1, 1), 5)


@pytest.mark.parametrize("method", ["importance", "random"])
def test_regrow_draws_exact_count_outside_kept_and_is_reproducible(method):
    w = torch.randn(20, 6, 3, 3)
    kept = torch.tensor([0, 2, 5, 9])
    for n in (1, 5, 16):
        a = regrow_channels(w, kept, n, torch.Generator().manual_seed(3), method)
        b = regrow_channels(w, kept, n, torch.Generator().manual_seed(3), method)
        assert torch.equal(a, b)
        assert a.numel() == n == a.unique().numel()
        assert not set(a.tolist()) & set(kept.tolist())
    assert regrow_channels(w, kept, 0, torch.Generator(), method).numel() == 0
    assert regrow_channels(w, kept, 100, torch.Generator(), method).numel() == 16


@pytest.mark.numerics
def test_importance_prefers_channels_outside_the_kept_span():
    # channel 1 is far from span(kept), channel 2 lies in it: importance sampling must almost always pick 1
    x = torch.zeros(6, 3, dtype=torch.float64)
    x[0, 0] = 1.0
    x[1, 1] = 8.0
    x[0, 2] = 3.0
    res = projection_residuals(x, torch.tensor([0]), torch.tensor([1, 2]))
    assert res[0] == pytest.approx(8.0) and res[1] == pytest.approx(0.0, abs=1e-12)
    w = x.t().reshape(3, 6, 1, 1).float()
    picks = [int(regrow_channels(w, torch.tensor([0]), 1, torch.Generator().manual_seed(s))) for s in range(50)]
    assert picks.count(1) >= 49


def test_global_allocation_hits_budget_and_respects_floor():
    torch.manual_seed(0)
    gammas = [torch.rand(16), torch.rand(32) * 0.01, torch.rand(8) + 1]
    counts = global_keep_counts(gammas, 0.5, min_channels=1)
    assert sum(counts) == 28
    assert counts[2] == 8  # the large-gamma group keeps everything
    counts = global_keep_counts(gammas, 0.9, min_channels=3)
    assert min(counts) >= 3
    assert counts[1] == 3
    # monotone in sparsity
    prev = None
    for s in np.linspace(0, 0.95, 12):
        c = global_keep_counts(gammas, float(s))
        if prev is not None:
            assert all(a <= b for a, b in zip(c, prev))
        prev = c


def test_zero_gammas_are_pruned_first():
    g = [torch.tensor([0.0, 0.0, 0.3, 0.4]), torch.tensor([0.5, 0.0, 0.6, 0.7])]
    assert global_keep_counts(g, 3 / 8) == [2, 3]


def test_uniform_allocation():
    assert uniform_keep_counts([10, 64, 3], 0.5) == [5, 32, 2]
    assert uniform_keep_counts([10, 64, 3], 0.9, min_channels=2) == [2, 7, 2]
    with pytest.raises(ValueError):
        keep_counts("bogus", [torch.ones(3)], 0.5)


def test_schedule_boundaries():
    s = ExplorationSchedule(interval=2, t_max=10, sparsity=0.5, delta0=0.2, steps_per_unit=5)
    assert s.event_steps() == [10, 20, 30, 40, 50]
    assert [st for st in range(0, 80) if s.is_event(st)] == s.event_steps()
    assert s.regrow_fraction(0) == pytest.approx(0.2)
    assert s.regrow_fraction(25) == pytest.approx(0.1)          # t = 5 = T_max/2
    assert s.regrow_fraction(50) == pytest.approx(0.0, abs=1e-12)
    assert s.regrow_fraction(10) == pytest.approx(0.1 * (1 + math.cos(math.pi * 2 / 10)))
    assert not s.frozen(49) and s.frozen(50)
    odd = ExplorationSchedule(interval=3, t_max=10, sparsity=0.5, delta0=0.2)
    assert odd.event_steps() == [3, 6, 9] and odd.regrow_fraction(9) > 0


@pytest.mark.parametrize("kw, match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(delta0=0.6), "delta0"),
    (dict(interval=0), "delta_T"), (dict(t_max=1, interval=2), "T_max"),
])
def test_schedule_rejects_bad_values(kw, match):
    args = dict(interval=2, t_max=10, sparsity=0.5, delta0=0.2) | kw
    with pytest.raises(ValueError, match=match):
        ExplorationSchedule(**args)


# ------------------------------------------------------------------------ issue 16: rank deficiency, floors, ties
def squeezed_weight(seed, n_masked=4):
    """A conv2 whose input was squeezed to 1 channel (rank ≤ 9 < 12 live columns) with channels 0..3 masked: past
    rank-many pivots every residual is zero, so position or the null space decides."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, 3, 3, generator=g)
    w[:, 1:] = 0
    w[:n_masked] = 0
    live = torch.ones(16, dtype=torch.bool)
    live[:n_masked] = False
    return w, live


@pytest.mark.parametrize("criterion", ["qr", "leverage"])
def test_css_keeps_live_channels_when_k_exceeds_the_rank(criterion):
    masked_kept = []
    for seed in range(10):
        w, live = squeezed_weight(seed)
        chosen = select_channels(w, 11, criterion, live=live)
        assert chosen.numel() == 11 and bool(live[chosen].all()), (seed, chosen)
        # the raw criterion on the whole matrix (what upstream does: geqp3's first pivots, top leverage scores of V_k)
        # keeps masked channels for some seeds
        x = weight_matrix(w)
        raw = qr_pivots(x)[:11] if criterion == "qr" else torch.topk(leverage_scores(x, 11), 11).indices
        masked_kept.append(not bool(live[raw].all()))
        # and so does no choice of select_channels, even without the live set: past the rank it follows L1
        assert bool(live[select_channels(w, 11, criterion)].all())
    assert any(masked_kept)


def test_css_fill_beyond_the_live_channels_is_ranked_and_deterministic():
    w, live = squeezed_weight(0, n_masked=6)                # 10 live channels; keep 12
    restored = w.clone()
    g = torch.Generator().manual_seed(1)
    restored[:6, 0] = w[6:12, 0] * 0.5                      # remembered filters 0..5 lie in the live span...
    restored[4, 1] = torch.randn(3, 3, generator=g) * 5     # ...except 4 and 2, far from it (4 the farthest)
    restored[2, 2] = torch.randn(3, 3, generator=g)
    chosen = select_channels(w, 12, "qr", live=live, restored=restored)
    assert chosen.tolist() == [2, 4] + list(range(6, 16))
    assert torch.equal(select_channels(w, 12, "leverage", live=live, restored=restored), chosen)
    # without remembered values every pruned column is zero: ties go to the lowest indices
    assert select_channels(w, 12, "qr", live=live).tolist() == [0, 1] + list(range(6, 16))


def test_css_and_regrowth_refuse_non_finite_weights():
    w = torch.randn(8, 4, 3, 3)
    w[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        select_channels(w, 4, "qr")
    w[3, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        regrow_channels(w, torch.tensor([0, 1]), 2, torch.Generator().manual_seed(0))


def test_global_budget_is_exact_with_the_floor_inside_the_cut():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(1, 40, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        gammas = [torch.rand(s, generator=g) * float(torch.rand(1, generator=g)) for s in sizes]
        for s in (0.0, 0.3, 0.5, 0.8, 0.95, 0.99):
            for m in (1, 2, 5):
                counts = global_keep_counts(gammas, s, min_channels=m)
                n = sum(sizes)
                assert sum(counts) == max(n - int(n * s), sum(min(c, m) for c in sizes)), (sizes, s, m)
                assert all(min(c, m) <= k <= c for k, c in zip(counts, sizes))
    # one group of tiny γ: a cut before the floor would take all 8, and the floor would give 1 back (13 > 12)
    assert global_keep_counts([torch.full((8,), 1e-3), torch.rand(16) + 1], 0.5) == [1, 11]


def test_equal_gammas_are_cut_evenly_across_layers():
    # with a position tie-break the first layers would be emptied first ([1, 20] after the floor)
    assert global_keep_counts([torch.ones(10), torch.ones(30)], 0.5) == [5, 15]
    assert global_keep_counts([torch.zeros(8), torch.zeros(24), torch.ones(4)], 0.5) == [4, 10, 4]   # 18 of 32 zeros
    # ties among equal values only: a larger γ is still never cut before a smaller one
    assert global_keep_counts([torch.tensor([0.1, 0.1, 0.9]), torch.tensor([0.1, 0.5])], 0.4) == [2, 1]
