"""Tests for pipeline.stage2_distill.losses against independent float64 references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.stage2_distill.losses import (
    ce,
    dense_kd,
    sparse_kd,
    sparse_kd_linear,
    sparse_kd_per_position,
    sparse_kl_estimate,
)
from pipeline.stage2_distill.sampled_softmax import sampled_ce, sampled_softmax_kd

SENTINEL_18 = 2**18 - 1  # the codec's padding id at V = 151,936


def _ref_sparse(z: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, t: float = 1.0):
    """float64, per row: -T^2 sum_{valid i} w_i log softmax(z/T)_i (loops, no shared code)."""
    z = z.double()
    out = torch.zeros(z.shape[0], dtype=torch.float64)
    for r in range(z.shape[0]):
        logp = torch.log_softmax(z[r] / t, 0)
        for i, wi in zip(ids[r].tolist(), w[r].double().tolist()):
            if i < z.shape[1]:
                out[r] -= t * t * wi * logp[i]
    return out


def _ref_grad(z: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, t: float = 1.0):
    """float64 T * (s * sum(p_hat) - p_hat), p_hat scattered over V (padding dropped)."""
    z = z.double()
    s = torch.softmax(z / t, 1)
    p_hat = torch.zeros_like(z)
    for r in range(z.shape[0]):
        for i, wi in zip(ids[r].tolist(), w[r].double().tolist()):
            if i < z.shape[1]:
                p_hat[r, i] += wi
    return t * (s * p_hat.sum(1, keepdim=True) - p_hat)


def _targets(n: int, v: int, u: int, seed: int, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:u] for _ in range(n)]) if n else \
        torch.empty(0, u, dtype=torch.long)
    w = torch.rand(n, u, generator=g)
    if pad:
        ids[:, -pad:] = SENTINEL_18
    return ids, w


def test_hand_computed_three_classes():
    # z = (0, ln 2, ln 3): softmax = (1, 2, 3) / 6. Cache slots: class 0 with p_hat 0.5,
    # class 2 with 0.25, one sentinel slot with a (meaningless) weight 9.
    # L = -(0.5 ln(1/6) + 0.25 ln(3/6)) = 0.5 ln 6 + 0.25 ln 2 = 1.0691675...
    # dL/dz = s * (0.5 + 0.25) - p_hat = (0.125 - 0.5, 0.25, 0.375 - 0.25) = (-0.375, 0.25, 0.125)
    z = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], requires_grad=True)
    ids = torch.tensor([[0, 2, 7]])
    w = torch.tensor([[0.5, 0.25, 9.0]])
    loss, count = sparse_kd(z, ids, w)
    assert loss.item() == pytest.approx(0.5 * math.log(6) + 0.25 * math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(1.0691675, abs=1e-6)
    assert count.item() == 1.0
    loss.backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-0.375, 0.25, 0.125]]), atol=1e-6, rtol=0)


def test_full_support_equals_dense_kl():
    n, v = 6, 1000
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, v, generator=g) * 3
    y = torch.randn(n, v, generator=g) * 4  # teacher logits, fairly peaked
    p64 = torch.softmax(y.double(), 1)
    kl64 = (p64 * (torch.log_softmax(y.double(), 1) - torch.log_softmax(z.double(), 1))).sum()
    h64 = -(p64 * torch.log_softmax(y.double(), 1)).sum(1)
    ids = torch.arange(v).expand(n, v)

    zs = z.clone().requires_grad_()
    sparse_sum, c1 = sparse_kd(zs, ids, p64.float())
    zd = z.clone().requires_grad_()
    dense_sum, c2 = dense_kd(zd, y, chunk_rows=4)
    # sparse CE - H(p) == KL == dense_kd, against the float64 reference
    assert (sparse_sum.double() - h64.sum()).item() == pytest.approx(kl64.item(), rel=1e-5)
    assert dense_sum.item() == pytest.approx(kl64.item(), rel=1e-5)
    kl_logged = sparse_kl_estimate(sparse_sum, h64.float(), ids, v)
    assert kl_logged.item() == pytest.approx(kl64.item(), rel=1e-5)
    assert c1.item() == c2.item() == n
    (sparse_sum + dense_sum).backward()
    torch.testing.assert_close(zs.grad, zd.grad, atol=1e-6, rtol=0)


def test_dense_kd_temperatures_and_gradient():
    n, v, t, tt = 5, 300, 2.0, 0.7
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, v, generator=g, requires_grad=True)
    y = torch.randn(n, v, generator=g) * 2
    pw = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0])
    loss, count = dense_kd(z, y, temperature=t, teacher_temperature=tt, position_weights=pw,
                           chunk_rows=2)
    logp = torch.log_softmax(y.double() / tt, 1)
    logs = torch.log_softmax(z.detach().double() / t, 1)
    kl = t * t * (logp.exp() * (logp - logs)).sum(1)
    assert loss.item() == pytest.approx((pw.double() * kl).sum().item(), rel=1e-5)
    assert count.item() == pytest.approx(4.5)
    loss.backward()
    ref = t * (logs.exp() - logp.exp()) * pw.double()[:, None]
    torch.testing.assert_close(z.grad.double(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
def test_gradient_is_s_sum_minus_p_hat(t):
    n, v, u = 7, 200, 12
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(n, v, generator=g) * 2).requires_grad_()
    ids = torch.randint(0, v, (n, u), generator=g)  # duplicates allowed: p_hat adds up
    ids[:, -2:] = v  # two padding slots at the smallest sentinel
    w = torch.rand(n, u, generator=g)
    loss, _ = sparse_kd(z, ids, w, temperature=t, chunk_rows=3)
    assert loss.item() == pytest.approx(_ref_sparse(z.detach(), ids, w, t).sum().item(), rel=1e-5)
    loss.backward()
    torch.testing.assert_close(z.grad.double(), _ref_grad(z.detach(), ids, w, t),
                               atol=1e-6, rtol=1e-5)


def test_sentinel_slots_contribute_nothing():
    n, v = 4, 100
    ids, w = _targets(n, v, 8, seed=4)
    z = torch.randn(n, v, generator=torch.Generator().manual_seed(5))
    pad_ids = torch.cat([ids, torch.tensor([[v, SENTINEL_18, v + 1, SENTINEL_18]] * n)], 1)
    pad_w = torch.cat([w, torch.full((n, 4), 5.0)], 1)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, ca = sparse_kd(za, ids, w)
    b, cb = sparse_kd(zb, pad_ids, pad_w)
    (a + b).backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and ca.item() == cb.item() == n
    torch.testing.assert_close(za.grad, zb.grad)
    # self-normalization also ignores the sentinel weights
    sa, _ = sparse_kd(z, ids, w, self_normalize=True)
    sb, _ = sparse_kd(z, pad_ids, pad_w, self_normalize=True)
    assert sa.item() == pytest.approx(sb.item(), rel=1e-6)
    # a row made only of sentinels is not counted
    only_pad = pad_ids.clone()
    only_pad[1] = SENTINEL_18
    c, cc = sparse_kd(z, only_pad, pad_w)
    ref = _ref_sparse(z, only_pad, pad_w).sum()
    assert c.item() == pytest.approx(ref.item(), rel=1e-6) and cc.item() == n - 1


def _all_losses(n: int, v: int = 50, h: int = 8, masked: bool = True):
    """Every loss on n rows; masked=True masks all rows by position weight 0."""
    g = torch.Generator().manual_seed(6)
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    ids, w = _targets(n, v, 4, seed=7)
    pw = torch.zeros(n) if masked else None
    z = hid @ weight.T
    y = torch.randn(n, v, generator=g)
    tgt = torch.randint(0, v, (n,), generator=g)
    return hid, weight, {
        "sparse_kd": sparse_kd(z, ids, w, pw),
        "sparse_kd_linear": sparse_kd_linear(hid, weight, ids, w, pw),
        "dense_kd": dense_kd(z, y, position_weights=pw),
        "ce": ce(z, tgt, pw),
        "sampled_softmax_kd": sampled_softmax_kd(hid, weight, ids, w, 10, None, pw),
        "sampled_ce": sampled_ce(hid, weight, tgt, 10, None, pw),
    }


@pytest.mark.parametrize("n", [0, 3])
def test_all_masked_gives_zero_and_zero_count(n):
    hid, weight, out = _all_losses(n)
    for name, (loss_sum, count) in out.items():
        assert loss_sum.item() == 0.0 and count.item() == 0.0, name
        assert loss_sum.dtype == count.dtype == torch.float32, name
        hid.grad = weight.grad = None
        loss_sum.backward(retain_graph=True)  # still attached: every parameter gets a (zero) gradient
        assert torch.count_nonzero(weight.grad) == 0, name
        if n:
            assert torch.count_nonzero(hid.grad) == 0, name
    # all-sentinel targets and all-ignored labels mask too
    z = torch.randn(3, 50)
    assert sparse_kd(z, torch.full((3, 4), SENTINEL_18), torch.ones(3, 4))[1].item() == 0
    assert ce(z, torch.full((3,), -100))[1].item() == 0


def test_selected_rows_path_equals_full_logits_then_select():
    b, t, h, v = 2, 16, 12, 300
    g = torch.Generator().manual_seed(8)
    hidden0 = torch.randn(b * t, h, generator=g)
    head0 = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head0.weight.copy_(torch.randn(v, h, generator=g))
    head1 = torch.nn.Linear(h, v, bias=False)
    head1.load_state_dict(head0.state_dict())
    sel = torch.tensor([1, 4, 5, 9, 17, 30])
    ids, w = _targets(len(sel), v, 12, seed=9, pad=2)
    pw = torch.tensor([1.0, 2.0, 0.5, 1.0, 0.0, 3.0])

    h_a = hidden0.clone().requires_grad_()
    loss_a, count_a = sparse_kd(head0(h_a[sel]), ids, w, pw, temperature=1.5)
    loss_a.backward()
    h_b = hidden0.clone().requires_grad_()
    loss_b, count_b = sparse_kd(head1(h_b)[sel], ids, w, pw, temperature=1.5)
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert count_a.item() == count_b.item() == pytest.approx(7.5)
    torch.testing.assert_close(h_a.grad, h_b.grad)
    torch.testing.assert_close(head0.weight.grad, head1.weight.grad)
    assert torch.count_nonzero(h_a.grad[[0, 2, 17]]) == 0  # unselected / weight-0 rows


@pytest.mark.parametrize("t", [1.0, 1.5])
def test_fused_linear_equals_lm_head_then_sparse_kd(t):
    n, h, v = 10, 12, 300
    g = torch.Generator().manual_seed(24)
    hidden, weight, bias = (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g),
                            torch.randn(v, generator=g))
    ids, w = _targets(n, v, 12, seed=25, pad=2)
    pw = torch.rand(n, generator=g)
    pw[3] = 0.0
    a = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    la, ca = sparse_kd_linear(a[0], a[1], ids, w, pw, temperature=t, lm_bias=a[2], chunk_rows=2)
    (la / ca).backward()  # a grad_output other than 1
    b = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    lb, cb = sparse_kd(F.linear(b[0], b[1], b[2]), ids, w, pw, temperature=t)
    (lb / cb).backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-5) and ca.item() == cb.item()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # no gradient work, same value
        assert sparse_kd_linear(hidden, weight, ids, w, pw, t, lm_bias=bias)[0].item() == \
            pytest.approx(lb.item(), rel=1e-5)
        _, _, rows = sparse_kd_linear(hidden, weight, ids, w, pw, t, lm_bias=bias,
                                      return_per_position=True)
        # per-position losses, unweighted, from the dense log-softmax (independent of both)
        logp = torch.log_softmax(F.linear(hidden, weight, bias) / t, -1)
        ok = ids < v
        ref = -t * t * (torch.where(ok, w, 0.0) * logp.gather(1, torch.where(ok, ids, 0))).sum(1)
        torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_fp32_results_close_to_fp32():
    n, v = 8, 5000
    g = torch.Generator().manual_seed(10)
    z32 = (torch.randn(n, v, generator=g) * 3).bfloat16().float()  # exactly representable
    y = torch.randn(n, v, generator=g) * 3
    ids, w = _targets(n, v, 12, seed=11, pad=1)
    tgt = torch.randint(0, v, (n,), generator=g)
    z16 = z32.bfloat16().requires_grad_()
    zf = z32.clone().requires_grad_()
    # the fused path with hidden = I, W = z^T: logits z in bf16, fp32 loss
    fused, _ = sparse_kd_linear(torch.eye(n).bfloat16(), z32.T.bfloat16(), ids, w)
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(sparse_kd(z32, ids, w)[0].item(), rel=1e-5)
    for fn in (lambda z: sparse_kd(z, ids, w, temperature=2.0),
               lambda z: dense_kd(z, y.bfloat16() if z.dtype == torch.bfloat16 else
                                  y.bfloat16().float()),
               lambda z: ce(z, tgt)):
        z16.grad = zf.grad = None
        lo16, c16 = fn(z16)
        lo32, _ = fn(zf)
        assert lo16.dtype == c16.dtype == torch.float32
        # same input values, fp32 math either way: only summation order may differ
        assert lo16.item() == pytest.approx(lo32.item(), rel=1e-5)
        (lo16 + lo32).backward()
        assert z16.grad.dtype == torch.bfloat16
        torch.testing.assert_close(z16.grad.float(), zf.grad, atol=2e-3, rtol=1e-2)


def test_position_weights_scale_and_bool_mask():
    n, v = 6, 120
    g = torch.Generator().manual_seed(12)
    z = torch.randn(n, v, generator=g)
    ids, w = _targets(n, v, 5, seed=13)
    per_row = _ref_sparse(z, ids, w)
    pw = torch.tensor([0.0, 1.0, 2.5, 0.5, 0.0, 4.0])
    loss, count = sparse_kd(z, ids, w, pw)
    assert loss.item() == pytest.approx((pw.double() * per_row).sum().item(), rel=1e-6)
    assert count.item() == pytest.approx(8.0)
    loss3, count3 = sparse_kd(z, ids, w, 3 * pw)
    assert loss3.item() == pytest.approx(3 * loss.item(), rel=1e-6)
    assert count3.item() == pytest.approx(24.0)
    mask = pw > 0
    lm, cm = sparse_kd(z, ids, w, mask)
    assert lm.item() == pytest.approx(per_row[mask].sum().item(), rel=1e-6) and cm.item() == 4
    torch.testing.assert_close(sparse_kd_per_position(z, ids, w).double(), per_row)


def test_self_normalize_and_chunking():
    n, v = 9, 400
    z = torch.randn(n, v, generator=torch.Generator().manual_seed(14))
    ids, w = _targets(n, v, 12, seed=15, pad=3)
    w_norm = w.clone()
    w_norm[:, -3:] = 0
    w_norm = w_norm / w_norm.sum(1, keepdim=True)
    a, _ = sparse_kd(z, ids, w, self_normalize=True, chunk_rows=2)
    assert a.item() == pytest.approx(_ref_sparse(z, ids, w_norm).sum().item(), rel=1e-6)
    for rows in (1, 4, 100):
        b, _ = sparse_kd(z, ids, w, chunk_rows=rows)
        assert b.item() == pytest.approx(_ref_sparse(z, ids, w).sum().item(), rel=1e-6)


def test_ce_matches_torch_float64():
    n, v = 10, 77
    g = torch.Generator().manual_seed(16)
    z = torch.randn(n, v, generator=g, requires_grad=True)
    tgt = torch.randint(0, v, (n,), generator=g)
    tgt[[2, 5]] = -100
    loss, count = ce(z, tgt, chunk_rows=3)
    z64 = z.detach().double().requires_grad_()
    ref = F.cross_entropy(z64, tgt, reduction="sum", ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and count.item() == 8
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-6, rtol=0)


def _sampled_setup(n=6, v=200, h=16, u=12, pad=2, seed=17):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    bias = torch.randn(v, generator=g)
    ids, w = _targets(n, v, u, seed=seed + 1, pad=pad)
    return hidden, weight, bias, ids, w


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("with_exact", [False, True])
def test_sampled_softmax_all_classes_is_exact(t, with_exact):
    hidden, weight, bias, ids, w = _sampled_setup()
    ids[0, 1] = ids[0, 0]  # a duplicated class: target weight counts twice, partition once
    # exact classes overlap S_t (ids[1, :3]) and repeat (torch.unique de-duplicates them)
    exact = torch.cat([ids[1, :3], torch.arange(40, 60), torch.arange(40, 45)]) if with_exact \
        else None
    # just enough negatives to draw all of V \ E
    m = 200 - (torch.unique(exact).numel() if with_exact else 0)
    pw = torch.tensor([1.0, 2.0, 0.0, 1.0, 0.5, 1.0])
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    a, ca = sampled_softmax_kd(*leaves[:2], ids, w, m, None, pw, leaves[2], temperature=t,
                               exact_ids=exact)
    a.backward()
    ref = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    b, cb = sparse_kd(ref[0] @ ref[1].T + ref[2], ids, w, pw, temperature=t)
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-5) and ca.item() == cb.item()
    for x, r in zip(leaves, ref):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-5, rtol=1e-5)
    # the same for the CE variant
    tgt = torch.randint(0, 200, (6,), generator=torch.Generator().manual_seed(0))
    sc, _ = sampled_ce(hidden, weight, tgt, 10**6, None, lm_bias=bias, exact_ids=exact)
    assert sc.item() == pytest.approx(ce(hidden @ weight.T + bias, tgt)[0].item(), rel=1e-5)


@pytest.mark.parametrize("with_exact", [False, True])
def test_sampled_partition_estimate_is_unbiased(with_exact):
    # One row, one target class y with weight 1: L = log Z_hat - z_y, so Z_hat = exp(L + z_y).
    # V = 30, M = 8 with y and 11 other classes in S: negatives often land in S and must be
    # dropped and rescaled. With exact classes, some of them also in S. E[Z_hat] = Z exactly;
    # check the mean within 4 standard errors.
    v, m, draws = 30, 8, 600
    g = torch.Generator().manual_seed(19)
    hidden = torch.randn(1, 6, generator=g)
    weight = torch.randn(v, 6, generator=g)
    z = (hidden @ weight.T).double()[0]
    perm = torch.randperm(v, generator=g)
    ids = perm[:12][None]
    exact = torch.cat([perm[10:12], perm[20:24]]) if with_exact else None  # 2 in S, 4 not
    w = torch.zeros(1, 12)
    w[0, 0] = 1.0
    gen = torch.Generator().manual_seed(20)
    z_hat = torch.tensor([
        math.exp(sampled_softmax_kd(hidden, weight, ids, w, m, gen, exact_ids=exact)[0].item()
                 + z[ids[0, 0]].item())
        for _ in range(draws)
    ], dtype=torch.float64)
    se = z_hat.std() / math.sqrt(draws)
    assert abs(z_hat.mean() - z.exp().sum()) < 4 * se
    assert se > 0  # it is a random estimate at M < V


def test_sampled_softmax_converges_as_m_grows():
    hidden, weight, bias, ids, w = _sampled_setup(n=8, v=400, seed=21)
    hidden = hidden * 2  # a few dominant classes, as in a trained LM
    exact = sparse_kd(hidden @ weight.T, ids, w)[0].item()
    gen = torch.Generator().manual_seed(22)

    def mean_abs_err(m: int, draws: int = 20) -> float:
        return sum(abs(sampled_softmax_kd(hidden, weight, ids, w, m, gen)[0].item() - exact)
                   for _ in range(draws)) / draws

    errs = [mean_abs_err(m) for m in (16, 64, 256, 399)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-2 * abs(exact)


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(3, 10)
    ids, w = _targets(3, 10, 4, seed=23)
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd(z, ids, w, temperature=0.0)
    with pytest.raises(ValueError, match="shape of ids"):
        sparse_kd(z, ids, w[:, :3])
    with pytest.raises(ValueError, match="rows"):
        sparse_kd(z, ids[:2], w[:2])
    with pytest.raises(ValueError, match="integer"):
        sparse_kd(z, ids.float(), w)
    with pytest.raises(ValueError, match="position_weights"):
        sparse_kd(z, ids, w, torch.ones(4))
    with pytest.raises(ValueError, match="outside"):
        ce(z, torch.tensor([1, 10, 2]))
    with pytest.raises(ValueError, match="teacher_logits"):
        dense_kd(z, torch.randn(3, 11))
    with pytest.raises(ValueError, match="num_negatives"):
        sampled_softmax_kd(torch.randn(3, 4), torch.randn(10, 4), ids, w, 0, None)
    with pytest.raises(ValueError, match="exact_ids"):
        sampled_softmax_kd(torch.randn(3, 4), torch.randn(10, 4), ids, w, 5, None,
                           exact_ids=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="agree on H"):
        sampled_softmax_kd(torch.randn(3, 5), torch.randn(10, 4), ids, w, 5, None)
