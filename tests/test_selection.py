"""Tests for pipeline.stage2_distill.selection: scores vs a dense reference, rules vs brute force, GLS vs a
plain-list FIFO across simulated ranks, positional unbiasedness, checkpoint round-trips."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline.stage2_distill.selection import (RULES, SCORES, RuleContext, Selection, SelectionConfig,
                                SelectionInputs, Selector, all_gather_rows, compute_scores,
                                compute_signals, next_token_labels, percentile_band_rule,
                                positional_rule, topk_rule)
from pipeline.stage2_distill.selection.config import Curriculum
from thread_ranks import run_ranks


def _valid(b, t, gen, min_len=0):
    lens = torch.randint(min_len, t + 1, (b,), generator=gen)
    return torch.arange(t)[None, :] < lens[:, None]


# ------------------------------------------------------------------------------ scores
@torch.no_grad()
def _dense_reference(h, w_head, labels, ids, wts, ent, valid):
    """Every signal from full [B,T,V] logits in float64 (the definition, no chunking)."""
    z = (h.double() @ w_head.double().T)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    s_ent = -(p * logp).sum(-1)
    ce = -logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ce = torch.where(labels >= 0, ce, s_ent)
    V = z.shape[-1]
    used = ids < V
    lp_ids = logp.gather(-1, torch.where(used, ids, 0).long())
    kl = -(torch.where(used, wts.double(), 0.0) * lp_ids).sum(-1) - ent.double()
    z0 = lambda x: torch.where(valid, x, 0.0)
    return {"teacher_entropy": z0(ent.double()), "student_entropy": z0(s_ent),
            "student_ce": z0(ce), "kl": z0(kl)}


def _inputs(B, T, H, V, U, seed):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    valid = _valid(B, T, g, min_len=1)
    valid[0] = True                     # the last position: valid, but no next-token label
    ids = torch.randint(0, V, (B, T, U), generator=g)
    sentinel = 2 ** V.bit_length() - 1
    ids[..., U // 2:] = torch.where(torch.rand(B, T, U - U // 2, generator=g) < 0.5, sentinel,
                                    ids[..., U // 2:])
    labels = next_token_labels(torch.randint(0, V, (B, T), generator=g))
    inp = SelectionInputs(valid, hidden=torch.randn(B, T, H, generator=g), labels=labels,
                          teacher_entropy=torch.rand(B, T, generator=g) * 4, ids=ids,
                          weights=torch.rand(B, T, U, generator=g) * 0.2)
    return inp, head


@pytest.mark.parametrize("V,chunks", [(37, (1, 3, 5, 1000)), (151_936, (5, 64))])
def test_signals_chunked_equal_dense(V, chunks):
    inp, head = _inputs(B=2, T=8 if V > 1000 else 13, H=16, V=V, U=6, seed=1)
    ref = _dense_reference(inp.hidden, head.weight, inp.labels, inp.ids, inp.weights,
                           inp.teacher_entropy, inp.valid)
    for c in chunks:
        got = compute_signals(set(ref), inp, head, c)
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-4, atol=2e-4, msg=f"{k} c={c}")


def test_combined_is_weighted_per_sequence_zscores():
    inp, head = _inputs(B=3, T=11, H=8, V=29, U=4, seed=2)
    ref = _dense_reference(inp.hidden, head.weight, inp.labels, inp.ids, inp.weights,
                           inp.teacher_entropy, inp.valid)
    w = (0.5, 1.0, 2.0, 0.25)
    got = compute_scores("combined", inp, head, 4, torch.Generator(), combined_weights=w)
    for b in range(3):
        v = inp.valid[b].numpy()
        want = sum(wj * (ref[n][b].numpy()[v] - ref[n][b].numpy()[v].mean())
                   / (ref[n][b].numpy()[v].std() + 1e-6)
                   for n, wj in zip(("teacher_entropy", "student_entropy", "student_ce", "kl"), w))
        np.testing.assert_allclose(got[b].numpy()[v], want, rtol=1e-4, atol=1e-4)
        assert (got[b].numpy()[~v] == 0).all()


def test_one_chunked_pass_and_only_needed_signals():
    inp, head = _inputs(B=2, T=9, H=8, V=23, U=4, seed=3)
    calls = []
    counted = lambda x: (calls.append(x.shape[0]), head(x))[1]
    n = int(inp.valid.sum())
    compute_scores("combined", inp, counted, 4, torch.Generator())
    assert calls == [min(4, n - s) for s in range(0, n, 4)]      # one pass for 3 signals

    def forbidden(x):
        raise AssertionError("lm_head must not run for this score")
    for name in ("teacher_entropy", "random"):
        compute_scores(name, inp, forbidden, 4, torch.Generator())
    assert not Selector(SelectionConfig(select_score="teacher_entropy")).needs_student_logits
    assert Selector(SelectionConfig(select_score="kl")).needs_student_logits
    assert not Selector(SelectionConfig(select="all", select_score="kl")).needs_student_logits


# ------------------------------------------------------------------------------- rules
@pytest.mark.parametrize("frac", [0.07, 0.1, 0.25, 1 / 3, 0.5, 0.999, 1.0])
def test_topk_exact_count_never_padded(frac):
    g = torch.Generator().manual_seed(4)
    B, T = 64, 120
    valid = _valid(B, T, g)
    valid[0] = True
    valid[1] = False
    valid[2] = torch.arange(T) < 100   # 100 * 0.07 = 7.000000000000001 in floating point
    scores = torch.randint(0, 5, (B, T), generator=g).float()    # many ties
    scores[~valid] = 100.0                                        # padding must lose anyway
    m = topk_rule(scores, valid, frac).mask
    for b in range(B):
        n = int(valid[b].sum())
        k = math.ceil(Fraction(str(frac)) * n) if frac != 1 / 3 else math.ceil(n / 3)
        sel = m[b].nonzero().flatten().tolist()
        assert len(sel) == k, (b, n, k, sel)
        assert all(valid[b, t] for t in sel)
        if 0 < k < n:
            rest = [t for t in range(T) if valid[b, t] and t not in sel]
            assert min(scores[b, sel]) >= max(scores[b, rest])


def test_percentile_band_hand_example():
    scores = torch.tensor([[9.0, 0, 8, 1, 7, 2, 6, 3, 5, 4, -1, -1]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[0, 10:] = False
    ctx = RuleContext(torch.Generator(), band=(20.0, 60.0))
    # sorted 0..9: q20 = 0.2*9 = 1.8, q60 = 5.4  ->  scores 2, 3, 4, 5
    m = percentile_band_rule(scores, valid, 0.25, ctx).mask
    assert sorted(scores[m].tolist()) == [2.0, 3.0, 4.0, 5.0]
    m = percentile_band_rule(scores, valid, 0.25, RuleContext(torch.Generator(), band=(0.0, 100.0))).mask
    assert m.tolist() == valid.tolist()


def test_positional_unbiased_for_all_positions_sum():
    g = torch.Generator().manual_seed(5)
    T, R = 40, 20_000                                             # R independent draws as rows
    valid1 = torch.arange(T) < 33
    score1 = torch.rand(T, generator=g) ** 3 * 5
    score1[3] = 0.0                                               # eps path
    x1 = torch.randn(T, generator=g).double() * 2 + score1.double()
    truth = float(x1[valid1].sum())
    for alpha, frac in [(1.0, 0.25), (2.0, 0.1), (0.0, 0.5), (0.5, 1.0)]:
        valid, scores = valid1.expand(R, T), score1.expand(R, T)
        ctx = RuleContext(torch.Generator().manual_seed(6), positional_alpha=alpha)
        out = positional_rule(scores, valid, frac, ctx)
        k = math.ceil(frac * 33 - 1e-9)
        assert (out.mask.sum(1) == k).all() and not out.mask[:, 33:].any()
        assert (out.weights[out.mask] >= 1).all() and (out.weights[~out.mask] == 0).all()
        est = (out.weights.double() * x1).sum(1)
        mean, se = float(est.mean()), float(est.std() / math.sqrt(R))
        if frac == 1.0:
            assert torch.allclose(est, torch.full_like(est, truth))
        else:
            assert abs(mean - truth) < 4 * se, (alpha, frac, mean, truth, se)


def _ref_inclusion(q: list[float], k: int) -> list[float]:
    """Reference pi_t = min(1, q_t / tau) with sum pi = k: cap the positions at or above
    tau = (sum of the uncapped q) / (k - #capped) until none is left above it."""
    capped: set[int] = set()
    while True:
        rest = [i for i in range(len(q)) if i not in capped]
        tau = sum(q[i] for i in rest) / (k - len(capped))
        new = {i for i in rest if q[i] >= tau}
        if not new:
            return [1.0 if i in capped else q[i] / tau for i in range(len(q))]
        capped |= new


def _entropy_like(n: int, gen: torch.Generator) -> torch.Tensor:
    """Teacher entropies as the cache stores them: 30% of positions confident (Exp(1e-4)
    nats, mostly decoding to byte 0, i.e. exactly 0), the others LogNormal(ln 1.5, 1)."""
    from pipeline.cache_format.codec import EntropyCodebook
    conf = torch.rand(n, generator=gen) < 0.3
    h = torch.where(conf, -1e-4 * torch.log1p(-torch.rand(n, generator=gen, dtype=torch.float64)),
                    (math.log(1.5) + torch.randn(n, generator=gen, dtype=torch.float64)).exp())
    cb = EntropyCodebook(151_936)
    return torch.from_numpy(cb.decode(cb.encode(h.clamp_max(math.log(151_936)).numpy())))


def _floor_bound(n: int, k: int, floor: float) -> float:
    """The docstring's bound on positional weights: n (1 + F) / (K F)."""
    return n * (1 + floor) / (k * floor)


@pytest.mark.parametrize("alpha,frac,floor", [(1.0, 0.25, 0.05), (1.0, 0.1, 0.01), (2.0, 0.25, 0.05)])
def test_positional_weights_bounded_with_zero_scores(alpha, frac, floor):
    """Entropy bytes of 0 used to get weights ~1e5-1e6 (q floored at 1e-6); with the floor
    relative to the row's mean q, every weight is <= n (1+F)/(K F) <= (1+F)/(F frac)."""
    g = torch.Generator().manual_seed(11)
    T, R = 96, 20_000
    seqs = torch.stack([_entropy_like(T, g) for _ in range(4)])   # 4 sequences, own lengths
    assert (seqs == 0).float().mean() > 0.1
    lens = torch.tensor([96, 80, 37, 9])
    scores = seqs.repeat(R // 4, 1)
    valid = torch.arange(T)[None, :] < lens.repeat(R // 4)[:, None]
    ctx = RuleContext(torch.Generator().manual_seed(12), positional_alpha=alpha, positional_floor=floor)
    out = positional_rule(scores, valid, frac, ctx)
    n = valid.sum(1)
    k = torch.ceil(n * frac - 1e-9).long()
    assert torch.equal(out.mask.sum(1), k) and not (out.mask & ~valid).any()
    w = out.weights.double()
    assert (w[out.mask] >= 1).all() and (w[~out.mask] == 0).all()
    row_bound = torch.tensor([_floor_bound(int(a), int(b), floor) for a, b in zip(n, k)])
    assert (w.amax(1) <= row_bound * (1 + 1e-6)).all(), float((w.amax(1) / row_bound).max())
    assert float(w.max()) <= (1 + floor) / (floor * frac) * (1 + 1e-6)
    assert (out.mask & (scores == 0)).any()          # the zeros are drawn (with bounded weight)
    # The knob reaches the rule through SelectionConfig / Selector (teacher_entropy scores).
    sel = Selector(SelectionConfig(select="positional", select_frac=frac, positional_alpha=alpha,
                                   positional_floor=floor)).select(
        SelectionInputs(valid[:400], teacher_entropy=scores[:400]), None, 0)
    assert float(sel.weights.max()) <= (1 + floor) / (floor * frac) * (1 + 1e-6)
    assert float(sel.weights.max()) > (1 + 0.1) / (0.1 * frac)   # the default 0.1's bound: not used


@pytest.mark.parametrize("alpha,frac", [(1.0, 0.25), (2.0, 0.1), (0.5, 0.5)])
def test_positional_exact_inclusion_and_unbiased_where_floor_inactive(alpha, frac):
    """Scores in [1, 3] (no tiny values: the floor 0.05 * mean q is below all of them) plus
    two large ones (pi capped at 1): each position is kept with the reference probability, the
    weight is exactly 1/pi, and the estimate of an arbitrary x's sum is unbiased (brute force)."""
    g = torch.Generator().manual_seed(21)
    T, n, R = 40, 33, 20_000
    s1 = torch.rand(T, generator=g) * 2 + 1
    s1[[4, 17]] = torch.tensor([12.0, 9.0])
    valid1 = torch.arange(T) < n
    q0 = [float(v) ** alpha for v in s1[:n]]
    assert min(q0) > 0.05 * sum(q0) / n                               # the floor is inactive
    k = math.ceil(frac * n - 1e-9)
    pi = torch.tensor(_ref_inclusion(q0, k), dtype=torch.float64)
    assert frac == 0.5 or (pi == 1).sum() >= 1                         # the cap path runs
    x1 = torch.randn(T, generator=g, dtype=torch.float64) * 2 + s1.double()
    truth = float(x1[:n].sum())                                        # brute force
    ctx = RuleContext(torch.Generator().manual_seed(22), positional_alpha=alpha, positional_floor=0.05)
    out = positional_rule(s1.expand(R, T), valid1.expand(R, T), frac, ctx)
    assert (out.mask.sum(1) == k).all() and not out.mask[:, n:].any()
    m, w = out.mask[:, :n], out.weights[:, :n].double()
    want_w = (1 / pi).expand(R, n)
    assert torch.allclose(w[m], want_w[m], rtol=1e-6, atol=0)         # w = 1/pi, no randomness
    freq = m.double().mean(0)
    se_f = (pi * (1 - pi) / R).sqrt()
    assert ((freq - pi).abs() <= 4 * se_f + 1e-12).all(), ((freq - pi) / se_f.clamp_min(1e-12)).tolist()
    est = (out.weights.double() * x1).sum(1)
    mean, se = float(est.mean()), float(est.std() / math.sqrt(R))
    assert abs(mean - truth) < 4 * se, (mean, truth, se)


def test_positional_unbiased_and_precise_with_zero_scores():
    """Entropies with exact zeros, losses correlated with entropy plus rare misses where the
    teacher is sure: the floored q only moves variance. Byte-0 positions are kept with the
    reference probability F * mean(q) / tau, and over 20,000 draws the estimate of the
    all-positions sum is within 4 SE of it with SE < 1% of it (the former rule kept none of
    the ~12,000 byte-0 positions expected here: their loss was missing from every draw)."""
    g = torch.Generator().manual_seed(31)
    n, frac, floor, R = 256, 0.25, 0.05, 20_000
    h = _entropy_like(n, g).double()
    x = (0.4 * h * (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).exp()
         + 0.02 * torch.rand(n, generator=g, dtype=torch.float64)
         + (torch.rand(n, generator=g) < 0.05) * 4 * torch.rand(n, generator=g, dtype=torch.float64))
    zero = h == 0
    assert zero.sum() >= 20 and float(x[zero].sum()) > 0.005 * float(x.sum())
    q0 = h.tolist()
    f = floor * sum(q0) / n
    k = math.ceil(frac * n - 1e-9)
    pi = torch.tensor(_ref_inclusion([max(v, f) for v in q0], k), dtype=torch.float64)
    ctx = RuleContext(torch.Generator().manual_seed(32), positional_floor=floor)
    out = positional_rule(h.float().expand(R, n), torch.ones(R, n, dtype=torch.bool), frac, ctx)
    hits = out.mask[:, zero].double().sum()                            # byte-0 positions kept
    want, sd = float(pi[zero].sum()) * R, math.sqrt(float((pi * (1 - pi))[zero].sum()) * R)
    assert abs(float(hits) - want) < 4 * sd, (float(hits), want, sd)
    ratio = (out.weights.double() * x).sum(1) / float(x.sum())
    bias, se = float(ratio.mean()) - 1, float(ratio.std() / math.sqrt(R))
    assert se < 0.01, se
    assert abs(bias) < 4 * se, (bias, se)
    assert float(ratio.max()) <= _floor_bound(n, k, floor)            # x >= 0: est <= max w * sum


# --------------------------------------------------------------------------------- GLS
def _gls_batches(steps, world, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append([( torch.randn(B, T, generator=g), _valid(B, T, g)) for _ in range(world)])
    return out


def _gls_reference(batches, Q, warm, fracs):
    """Independent: a Python list FIFO + numpy quantile; top-k by sorting during warm-up."""
    fifo, seen, res = [], 0, []
    for step, ranks in enumerate(batches):
        for sc, va in ranks:                                      # rank order
            fifo.extend(sc[va].tolist())
            seen += int(va.sum())
        fifo = fifo[-Q:]
        frac = fracs[step]
        if seen < warm:
            masks = []
            for sc, va in ranks:
                m = torch.zeros_like(va)
                for b in range(va.shape[0]):
                    idx = [t for t in range(va.shape[1]) if va[b, t]]
                    idx.sort(key=lambda t: (-float(sc[b, t]), t))
                    for t in idx[:math.ceil(frac * len(idx) - 1e-9)]:
                        m[b, t] = True
                masks.append(m)
            res.append((None, masks, list(fifo)))
        else:
            thr = float(np.quantile(np.array(fifo, dtype=np.float64), 1 - frac))
            res.append((thr, [va & (sc.double() >= thr) for sc, va in ranks], list(fifo)))
    return res


def _run_gls(world, cfg, batches, steps_range, state=None):
    def fn(rank, comm):
        sel = Selector(cfg, comm=comm)
        if state is not None:
            sel.load_state_dict(state[rank])
        out = []
        for step in steps_range:
            sc, va = batches[step][rank]
            s = sel.select(SelectionInputs(va, teacher_entropy=sc), None, step)
            out.append((s.threshold, s.mask, sel.gls.buf.tolist()))
        return out, sel.state_dict()
    return run_ranks(world, fn)


@pytest.mark.parametrize("curriculum", ["constant", "linear:0.5:0.2:6"])
def test_gls_two_ranks_bit_identical_and_equal_reference(curriculum):
    world, B, T, Q, steps = 2, 3, 17, 200, 14
    cfg = SelectionConfig(select="gls", select_frac=0.3, gls_queue=Q, gls_warmup=120, curriculum=curriculum)
    cfg.validate()
    batches = _gls_batches(steps, world, B, T, seed=7)
    cur = Curriculum.parse(curriculum, 0.3)
    ref = _gls_reference(batches, Q, 120, [cur(s) for s in range(steps)])
    res = _run_gls(world, cfg, batches, range(steps))
    assert ref[0][0] is None and ref[-1][0] is not None and len(ref[-1][2]) == Q
    for step in range(steps):
        t0, t1 = res[0][0][step][0], res[1][0][step][0]
        assert t0 == t1 == ref[step][0], (step, t0, t1, ref[step][0])   # bit for bit
        for r in range(world):
            assert res[r][0][step][1].tolist() == ref[step][1][r].tolist()
            assert res[r][0][step][2] == ref[step][2]            # same FIFO, same order

    # checkpoint after 6 steps, restore into fresh selectors, continue: identical tail
    first = _run_gls(world, cfg, batches, range(6))
    states = [first[r][1] for r in range(world)]
    assert states[0]["gls"]["buf"].tolist() == ref[5][2]
    resumed = _run_gls(world, cfg, batches, range(6, steps), state=states)
    for r in range(world):
        for i, step in enumerate(range(6, steps)):
            assert resumed[r][0][i][0] == res[r][0][step][0]
            assert resumed[r][0][i][1].tolist() == res[r][0][step][1].tolist()
        assert torch.equal(resumed[r][1]["gls"]["buf"], res[r][1]["gls"]["buf"])


def test_gls_ties_at_the_threshold_keep_frac_in_expectation():
    """Quantized scores: 60% of positions share the threshold level. Keeping every tie
    would select 80%; the tie draw keeps frac = 0.3 in expectation (4 binomial SEs)."""
    B, T, frac = 8, 500, 0.3
    levels = torch.tensor([0.0] * 2 + [1.0] * 6 + [2.0] * 2)   # 20% above the tie level 1.0
    g = torch.Generator().manual_seed(3)
    scores = levels[torch.randint(0, 10, (B, T), generator=g)]
    valid = torch.ones(B, T, dtype=torch.bool)
    sel = Selector(SelectionConfig(select="gls", select_frac=frac, gls_queue=B * T, gls_warmup=0))
    s = sel.select(SelectionInputs(valid, teacher_entropy=scores), None, 0)
    assert s.threshold == 1.0
    assert s.mask[scores == 2.0].all() and not s.mask[scores == 0.0].any()
    n, kept = valid.sum().item(), s.mask.sum().item()
    # the tie probability from the FIFO (= this batch): (0.3 n - #above) / #tied
    above, tied = (scores > 1).sum().item(), (scores == 1).sum().item()
    p = (frac * n - above) / tied
    se = math.sqrt(tied * p * (1 - p))
    assert abs(kept - frac * n) < 4 * se, (kept, frac * n, se)


def test_gls_no_scores_yet_falls_back():
    sel = Selector(SelectionConfig(select="gls", gls_queue=50, gls_warmup=0))
    empty = torch.zeros(2, 5, dtype=torch.bool)
    s = sel.select(SelectionInputs(empty, teacher_entropy=torch.rand(2, 5)), None, 0)
    assert s.threshold is None and not s.mask.any()
    valid = torch.ones(2, 5, dtype=torch.bool)
    s = sel.select(SelectionInputs(valid, teacher_entropy=torch.arange(10.0).reshape(2, 5)), None, 1)
    assert s.threshold == float(np.quantile(np.arange(10.0), 0.75)) and int(s.mask.sum()) == 3


def test_all_gather_rows_uneven():
    def fn(rank, comm):
        x = torch.arange(rank * 3, dtype=torch.float32).reshape(-1, 1) + 10 * rank
        return all_gather_rows(comm, x).flatten().tolist()
    res = run_ranks(3, fn)
    assert res[0] == res[1] == res[2] == [10.0, 11.0, 12.0, 20.0, 21.0, 22.0, 23.0, 24.0, 25.0]


# ------------------------------------------------------------------- selector plumbing
@pytest.mark.parametrize("rule", ["topk", "positional", "percentile_band", "all"])
def test_random_stream_round_trips(rule):
    inp, head = _inputs(B=2, T=12, H=8, V=19, U=4, seed=8)
    cfg = SelectionConfig(select=rule, select_score="random")
    a = Selector(cfg)
    a.select(inp, head, 0)
    sd = a.state_dict()
    want = [a.select(inp, head, s) for s in range(1, 4)]
    b = Selector(cfg)
    b.load_state_dict(sd)
    for s, w in zip(range(1, 4), want):
        got = b.select(inp, head, s)
        assert torch.equal(got.scores, w.scores) and torch.equal(got.weights, w.weights)


def test_selection_fields():
    inp, head = _inputs(B=2, T=12, H=8, V=19, U=4, seed=9)
    s = Selector(SelectionConfig(select="positional", select_score="kl", select_frac=0.5)).select(inp, head, 0)
    assert isinstance(s, Selection) and s.mask.dtype == torch.bool and s.weights.dtype == torch.float32
    assert not (s.mask & ~inp.valid).any() and float(s.denominator) == float(inp.valid.sum())
    assert set(RULES) >= {"topk", "gls", "learned"} and "kl" in SCORES


def test_curriculum_schedules():
    lin, cos = Curriculum.parse("linear:0.5:0.1:100", 0.3), Curriculum.parse("cosine:0.5:0.1:100", 0.3)
    assert [lin(s) for s in (0, 50, 100, 500)] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert [cos(s) for s in (0, 50, 100)] == pytest.approx([0.5, 0.3, 0.1])
    assert Curriculum.parse("constant", 0.3)(1234) == 0.3


# -------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,vkw,needle", [
    (dict(select_frac=1.5), {}, "--select-frac 1.5 must be in (0, 1]"),
    (dict(select_frac=0.0), {}, "--select-frac 0.0 must be in (0, 1]"),
    (dict(select="nope"), {}, "--select 'nope' must be one of"),
    (dict(select_score="nope"), {}, "--select-score 'nope' must be one of"),
    (dict(select_band=[60, 40]), {}, "--select-band 60 40"),
    (dict(select_band=[10, 101]), {}, "--select-band 10 101"),
    (dict(select_band=[10.0]), {}, "--select-band 10.0: need LO HI"),
    (dict(gls_queue=0), {}, "--gls-queue 0 must be >= 1"),
    (dict(select="gls", gls_queue=1000, gls_steps=1001), {}, "--gls-steps 1001 must be in [1, --gls-queue 1000]"),
    (dict(select="gls", gls_steps=0), {}, "--gls-steps 0 must be in [1,"),
    (dict(gls_warmup=-1), {}, "--gls-warmup -1"),
    (dict(positional_alpha=-1.0), {}, "--positional-alpha -1.0"),
    (dict(positional_floor=0.0), {}, "--positional-floor 0.0 must be in (0, 1]"),
    (dict(positional_floor=1.5), {}, "--positional-floor 1.5 must be in (0, 1]"),
    (dict(learned_kind="svm"), {}, "--learned-kind 'svm'"),
    (dict(learned_kind="mlp", learned_explore=1.5), {}, "--learned-explore 1.5"),
    (dict(learned_kind="linucb", learned_explore=-0.1), {}, "--learned-explore -0.1"),
    (dict(curriculum="linear:0.5:0.1"), {}, "--curriculum 'linear:0.5:0.1'"),
    (dict(curriculum="cosine:0.5:1.2:10"), {}, "--curriculum fraction 1.2"),
    (dict(curriculum="linear:0.5:0.2:0"), {}, "--curriculum steps 0"),
    (dict(combined_weights=(0.0, 0.0, 0.0, 0.0)), {}, "--combined-weights"),
    (dict(combined_weights=(1.0, -1.0, 0.0, 0.0)), {}, "--combined-weights"),
    (dict(select_chunk=0), {}, "--select-chunk 0"),
    (dict(select="positional", select_score="combined"), {}, "needs nonnegative scores"),
    (dict(select_score="kl"), dict(has_targets=False), "--select-score kl needs ['kl']"),
    (dict(select_score="combined"), dict(has_targets=False), "--select-score combined needs ['kl']"),
    (dict(select_score="teacher_entropy"), dict(has_targets=False), "needs ['teacher_entropy']"),
    (dict(select="learned"), dict(has_targets=False), "--select learned needs"),
])
def test_validation_errors(kwargs, vkw, needle):
    with pytest.raises(ValueError) as e:
        SelectionConfig(**kwargs).validate(**vkw)
    assert needle in str(e.value)


def test_validation_collects_all_and_accepts_good():
    with pytest.raises(ValueError) as e:
        SelectionConfig(select_frac=2.0, select_band=[90.0, 10.0], select_chunk=0).validate()
    assert all(s in str(e.value) for s in ("--select-frac", "--select-band", "--select-chunk"))
    SelectionConfig(select_score="student_ce").validate(has_targets=False)
    SelectionConfig(select_score="combined", combined_weights=(0.0, 1.0, 1.0, 0.0)).validate(has_targets=False)
    SelectionConfig(select="gls", gls_queue=4096).validate()
    SelectionConfig(select="gls", gls_queue=1000).validate()   # a step of 2,048 scores is sampled
