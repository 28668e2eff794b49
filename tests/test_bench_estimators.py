"""tools/bench_estimators.py: its O(U)-per-draw statistics against a dense brute force, and
its verdicts (priority unbiased, topk biased) against the closed-form topk bias."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache_format.codec import RecordCodec
from pipeline.stage1_cache.class_sampler import sample_classes

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_estimators", ROOT / "tools" / "bench_estimators.py")
be = importlib.util.module_from_spec(_spec)
sys.modules["bench_estimators"] = be  # dataclasses look their module up there
_spec.loader.exec_module(be)

U = 12


def _problem(P: int, V: int, a: float, seed: int = 0):
    z = be.zipf_logits(P, V, a, torch.Generator().manual_seed(seed))
    students = be.make_students(z, [("near", 1.0, 0.5), ("far", 2.0, 1.0)], seed)
    return z, students


def test_position_stats_match_dense_brute_force():
    """Every per-position statistic equals the same quantity computed from dense [D, V]
    targets of the same draws (same generator stream)."""
    V, D = 60, 400
    z, students = _problem(1, V, 1.1)
    cfg = be.EstConfig(draws=D, seed=0)
    cb = RecordCodec(V, U).weight_codebook()
    got = be.position_stats(z[0], students[:, 0], "priority", cfg, cb,
                            torch.Generator().manual_seed(5), np.random.default_rng(0), {})
    gen = torch.Generator().manual_seed(5)
    halves = [sample_classes(z[0][None].expand(D // 2, V), U, "priority", gen)[:2] for _ in range(2)]
    W = torch.zeros(D, V, dtype=torch.float64)
    for h, (ids, w) in enumerate(halves):
        rows = torch.arange(D // 2)[:, None] + h * D // 2
        ok = ids < V
        W[rows.expand_as(ids)[ok], ids[ok]] = w[ok].double()
    p = torch.softmax(z[0].double(), 0)
    s = torch.softmax(students[:, 0].double(), -1)
    A, B = W[: D // 2], W[D // 2:]
    sign = torch.sign(A.mean(0) - p)
    for target, T in (("unbiased", W), ("selfnorm", W / W.sum(1, keepdim=True))):
        r = got[(False, target)]
        assert r["l1"] == pytest.approx(float((T.mean(0) - p).abs().sum()), rel=1e-9)
        if target == "unbiased":
            assert r["l1_ho"] == pytest.approx(float((B @ sign).mean() - sign @ p), rel=1e-9, abs=1e-12)
            assert r["l1_ho_se"] == pytest.approx(float((B @ sign).std() / np.sqrt(D // 2)), rel=1e-9)
        for k in range(2):
            g = s[k] - p
            G = T.sum(1, keepdim=True) * s[k] - T                     # [D, V] dense gradients
            err = (G - g).norm(dim=1)
            q = r["grad"][k]
            assert q["gg"] == pytest.approx(float(g @ g), rel=1e-12)
            assert q["mse"] == pytest.approx(float((err ** 2).mean() / (g @ g)), rel=1e-9)
            assert q["err"] == pytest.approx(float(err.mean() / g.norm()), rel=1e-9)
            assert q["b2"] == pytest.approx(float(((G.mean(0) - g) ** 2).sum()), rel=1e-9)
            assert q["noise2"] == pytest.approx(float(G.var(0).sum() / D), rel=1e-7)
            x = (G[D // 2:] - g) @ (G[: D // 2].mean(0) - g)          # split-half bias^2
            assert q["split"] == pytest.approx(float(x.mean()), rel=1e-7, abs=1e-15)


def test_priority_unbiased_and_topk_biased():
    """Priority's bias statistics sit within 4 Monte-Carlo SE of 0, with or without weight
    quantization; topk's equal their closed forms (tail mass lost, head renormalised)."""
    P, V = 3, 3000
    z, students = _problem(P, V, 1.2, seed=1)
    res = be.run_source(z, students, be.EstConfig(draws=2000, seed=0), methods=("priority", "topk"))
    p = torch.softmax(z.double(), -1)
    top = torch.topk(p, U, -1)
    tail = 1 - top.values.sum(-1)                                     # [P] true tail mass
    for q in (False, True):
        a = be.summarize_prob(res["pos"]["priority"], (q, "unbiased"))
        for name in ("l1_ho", "head_ho", "tail_bias"):
            assert abs(a[name]) < 4 * a[name + "_se"], (q, name, a)
        for k in range(2):
            gsum = be.summarize_grad(res["pos"]["priority"], (q, "unbiased"), k)
            assert abs(gsum["z"]) < 4, (q, k, gsum)
        t = be.summarize_prob(res["pos"]["topk"], (q, "unbiased"))
        assert t["tail_bias"] == pytest.approx(-float(tail.mean()), rel=1e-5 if q else 1e-6)
        assert abs(t["tail_bias"]) > 20 * t["tail_bias_se"] + 1e-3
        assert t["l1_ho"] > 20 * t["l1_ho_se"] + 1e-3
    t = be.summarize_prob(res["pos"]["topk"], (False, "unbiased"))
    assert t["l1_ho"] == pytest.approx(2 * float(tail.mean()), rel=1e-6)  # fp32 weights
    # topk's gradient bias in closed form: E[g_hat] - g = p - p_topk (renormalised top U)
    p_top = torch.zeros_like(p).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    s = torch.softmax(students.double(), -1)
    for k in range(2):
        gg = ((s[k] - p) ** 2).sum(-1)
        want = float(((p - p_top) ** 2).sum() / gg.sum())
        gsum = be.summarize_grad(res["pos"]["topk"], (False, "unbiased"), k)
        assert gsum["bias_mc"] ** 2 == pytest.approx(want, rel=1e-6)
        assert gsum["bias2"] == pytest.approx(want, rel=1e-6)
        assert gsum["mse"] == pytest.approx(want, rel=1e-6)           # deterministic: no noise
