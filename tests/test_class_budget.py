"""Allocated U (pipeline.stage1_cache.class_budget): the variance curves against a brute-force threshold,
the greedy allocation against every allocation of a small window, and the sampler's
unbiasedness at allocated sizes (z-scores of each class's mean weight over many draws)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.stage1_cache import class_budget as cb


def _dist(V: int, alpha: float, seed: int) -> torch.Tensor:
    """A Zipf-like distribution over V classes, shuffled: alpha large = peaked (low entropy)."""
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** alpha
    return (w / w.sum())[torch.randperm(V, generator=g)]


def _brute_variance(p: np.ndarray, k: int) -> float:
    """sum_{p_i < tau} p_i (tau - p_i) with sum_i min(1, p_i / tau) = k, tau by bisection."""
    lo, hi = 1e-15, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.minimum(1.0, p / mid).sum() > k:
            lo = mid
        else:
            hi = mid
    tau = (lo + hi) / 2
    small = p < tau
    return float((p[small] * (tau - p[small])).sum())


@pytest.mark.parametrize("alpha", [0.6, 1.2, 3.0])
def test_variance_curves_equal_the_threshold_form_by_bisection(alpha):
    rows = torch.stack([_dist(40, alpha, s) for s in range(3)])
    top = torch.sort(rows, dim=1, descending=True).values
    got = cb.variance_curves(top, (rows ** 2).sum(1), 12)
    for r in range(3):
        want = [_brute_variance(rows[r].numpy(), k) for k in range(1, 13)]
        assert got[r].tolist() == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert all(a >= b - 1e-15 for a, b in zip(got[r].tolist(), got[r].tolist()[1:]))  # decreasing


def test_greedy_allocation_is_the_best_of_every_allocation():
    rows = torch.stack([_dist(30, a, s) for s, a in enumerate([0.5, 1.0, 2.0, 4.0, 0.8])])
    top = torch.sort(rows, dim=1, descending=True).values
    curves = cb.variance_curves(top, (rows ** 2).sum(1), 5)
    for records in (5, 9, 14, 25):
        U = cb.allocate(curves, records, 1, 5)
        assert int(U.sum()) == records and int(U.min()) >= 1 and int(U.max()) <= 5
        got = sum(float(curves[t, U[t] - 1]) for t in range(5))
        best = min(sum(float(curves[t, a[t] - 1]) for t in range(5))
                   for a in itertools.product(range(1, 6), repeat=5) if sum(a) == records)
        assert got == pytest.approx(best, rel=1e-12, abs=1e-15), records


def test_flat_positions_get_more_records_than_peaked_ones():
    rows = torch.stack([_dist(2000, 4.0, 0), _dist(2000, 0.3, 1)])   # peaked, flat
    top = torch.sort(rows, dim=1, descending=True).values
    U = cb.allocate(cb.variance_curves(top, (rows ** 2).sum(1), 48), 24, 1, 48)
    assert int(U[1]) > int(U[0]) and int(U.sum()) == 24


@pytest.mark.parametrize("alpha", [0.4, 2.5], ids=["high-entropy", "low-entropy"])
def test_allocated_samples_are_unbiased_class_by_class(alpha):
    """Mean weight of every class over many draws at the allocated sizes = p_i, within its
    standard error (z-scores), and sum_i p_hat_i averages 1."""
    V, P, draws = 4096, 4, 3000
    rows = torch.stack([_dist(V, alpha, s).float() for s in range(P)])
    top = torch.topk(rows, 13, dim=1).values
    sizes = cb.allocate(cb.variance_curves(top, (rows.double() ** 2).sum(1), 12), 24, 1, 12)
    g = torch.Generator().manual_seed(7)
    total = torch.zeros(P, V, dtype=torch.float64)
    total_sq = torch.zeros(P, V, dtype=torch.float64)
    sums = []
    for _ in range(draws):
        ids, w = cb.priority_sample_sizes(rows, sizes, g, sentinel=V)
        dense = torch.zeros(P, V + 1, dtype=torch.float64).scatter_add_(1, ids, w.double())[:, :V]
        total += dense
        total_sq += dense ** 2
        sums.append(dense.sum(1))
    mean = total / draws
    sd = (total_sq / draws - mean ** 2).clamp_min(0).sqrt()
    se = sd / math.sqrt(draws)
    p = rows.double()
    # classes with enough mass for the normal approximation: z within 5 (a few thousand tests)
    big = p > 1e-3
    z = ((mean - p) / se.clamp_min(1e-12))[big & (se > 0)]
    assert z.abs().max() < 5.0, float(z.abs().max())
    # classes kept exactly (p >= tau) have zero variance and the exact value
    exact = big & (se == 0)
    assert torch.allclose(mean[exact], p[exact], rtol=1e-5)
    s = torch.stack(sums)
    assert ((s.mean(0) - 1).abs() < 5 * s.std(0) / math.sqrt(draws) + 1e-6).all()


def test_records_per_window_are_exactly_the_budget():
    rows = torch.stack([_dist(500, a, s) for s, a in enumerate(np.linspace(0.3, 3.0, 64))])
    top = torch.sort(rows, dim=1, descending=True).values
    curves = cb.variance_curves(top, (rows ** 2).sum(1), 48)
    for B in (4.0, 11.67, 12.0, 24.0):
        n = cb.budget_records(B, 64)
        assert int(cb.allocate(curves, n, 1, 48).sum()) == n == round(B * 64)


def test_budgets_out_of_range_and_other_samplers_are_refused():
    with pytest.raises(ValueError, match=r"--class-budget 0.5 must be in \[1, 48\]"):
        cb.check_budget(0.5, 1, 48)
    with pytest.raises(ValueError, match=r"--class-budget 60.0 must be in \[1, 48\]"):
        cb.check_budget(60.0, 1, 48)
    with pytest.raises(ValueError, match="--sampler topk keeps a fixed U"):
        cb.check_budget(12, 1, 48, method="topk")
    cb.check_budget(12, 1, 48)
