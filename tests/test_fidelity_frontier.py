"""tools/fidelity_frontier.py: the top-k + bucket gradient against autograd, its O(k)-per-draw
statistics against dense per-draw gradients, exactness at full support, the bias verdicts
(priority unbiased, top-k / bucket biased by their closed forms) and the CLI's outputs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fidelity_frontier", ROOT / "tools" / "fidelity_frontier.py")
ff = importlib.util.module_from_spec(_spec)
sys.modules["fidelity_frontier"] = ff  # dataclasses look their module up there
_spec.loader.exec_module(ff)
be = ff.be

NEAR, FAR = ("near", 1.0, 0.5), ("far", 2.0, 1.0)


def _zipf(P: int, V: int, a: float, seed: int):
    z = be.zipf_logits(P, V, a, torch.Generator().manual_seed(seed))
    return z, be.make_students(z, [NEAR, FAR], seed)


def _dense_bucket_loss_grad(zs: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, r: float) -> torch.Tensor:
    """autograd of L = -sum_{i in K} w_i log s_i - r log(sum_{j not in K} s_j), written densely."""
    zs = zs.detach().double().clone().requires_grad_(True)
    logs = torch.log_softmax(zs, 0)
    rest = torch.ones_like(zs, dtype=torch.bool)
    rest[ids] = False
    loss = -(w.double() * logs[ids]).sum() - r * torch.logsumexp(logs[rest], 0)
    (g,) = torch.autograd.grad(loss, zs)
    return g


def test_bucket_gradient_and_statistics_match_autograd():
    """(1) bucket_grad = autograd of the dense loss (and = s - p on K, s - r s / S_R outside
    when w = p_K); sparse_bucket_stats' per-draw statistics = those of dense autograd
    gradients of perturbed (quantization-like) weights, for two students."""
    V, k, D = 40, 7, 6
    g = torch.Generator().manual_seed(3)
    zt = 2.0 * torch.randn(V, generator=g, dtype=torch.float64)
    zs = torch.stack([zt + 0.7 * torch.randn(V, generator=g, dtype=torch.float64),
                      0.5 * zt + torch.randn(V, generator=g, dtype=torch.float64)])
    p, s = torch.softmax(zt, 0), torch.softmax(zs, -1)
    ids = torch.topk(p, k).indices
    rest = torch.ones(V, dtype=torch.bool)
    rest[ids] = False
    r = float(p[rest].sum())
    for j in range(2):
        auto = _dense_bucket_loss_grad(zs[j], ids, p[ids], r)
        assert torch.allclose(ff.bucket_grad(zs[j], ids, p[ids], r), auto, rtol=0, atol=1e-14)
        want = s[j] - p
        want[rest] = s[j][rest] - r * s[j][rest] / s[j][rest].sum()
        assert torch.allclose(auto, want, rtol=0, atol=1e-14)
        assert auto.sum().abs() < 1e-14                                  # softmax gradients sum to 0
        # weights off their exact values: the general form c s - w (K), c s - r s / S_R (rest)
        w2, r2 = p[ids] * 1.1, r * 0.8
        assert torch.allclose(ff.bucket_grad(zs[j], ids, w2, r2),
                              _dense_bucket_loss_grad(zs[j], ids, w2, r2), rtol=0, atol=1e-14)

    W = p[ids] * (1 + 0.05 * torch.randn(D, k, generator=g, dtype=torch.float64))
    for R in (r * (1 + 0.05 * torch.randn(D, generator=g, dtype=torch.float64)), None):
        got = ff.sparse_bucket_stats(p, s, ids, W, R)["grad"]
        for j in range(2):
            G = torch.stack([_dense_bucket_loss_grad(zs[j], ids, W[d], 0.0 if R is None else float(R[d]))
                             for d in range(D)])                          # [D, V] dense
            if R is None:                                                 # no bucket: c s - w
                dense = W.sum(1, keepdim=True) * s[j] - torch.zeros(D, V, dtype=torch.float64).index_put(
                    (torch.arange(D)[:, None].expand(D, k), ids.expand(D, k)), W)
                assert torch.allclose(G, dense, atol=1e-14)
            gvec = s[j] - p
            E = G - gvec
            gg = float(gvec @ gvec)
            q = got[j]
            assert q["gg"] == pytest.approx(gg, rel=1e-12)
            assert q["mse"] == pytest.approx(float((E ** 2).sum(1).mean()) / gg, rel=1e-9)
            assert q["err"] == pytest.approx(float(E.norm(dim=1).mean()) / math.sqrt(gg), rel=1e-9)
            assert q["b2"] == pytest.approx(float((E.mean(0) ** 2).sum()), rel=1e-9)
            assert q["noise2"] == pytest.approx(float(G.var(0).sum()) / D, rel=1e-7)
            x = E[D // 2:] @ E[: D // 2].mean(0)                         # split-half bias^2
            assert q["split"] == pytest.approx(float(x.mean()), rel=1e-9)
            assert q["split_se"] == pytest.approx(float(x.std()) / math.sqrt(D // 2), rel=1e-7)


def test_exact_at_full_support():
    """(2) top-k at k >= V (and the bucket) and priority at U >= the support size store p
    itself: error ~0 (fp32: float32 rounding; quantized: the 18-bit codebook's rounding)."""
    P, V, D = 2, 50, 40
    z, st = _zipf(P, V, 1.0, seed=4)
    rows = {}
    for spec in ("topk:50", "topk:80", "topk+bucket:50", "topk:5"):
        fmt = ff.parse_format(spec)
        res = ff.run_format(z, st, fmt, D, seed=0)
        rows[spec] = {q: ff.summarize(fmt, res, 0, "near", q, D) for q in (False, True)}
    for spec in ("topk:50", "topk:80", "topk+bucket:50"):
        assert rows[spec][False]["grad_err"] < 1e-6, rows[spec]
        assert rows[spec][True]["grad_err"] < 2e-3, rows[spec]
    assert rows["topk:80"][False]["bytes_per_position"] == 3 * V + 1       # clamped to V
    assert rows["topk+bucket:50"][False]["bytes_per_position"] == 3 * V + 2
    assert rows["topk:5"][False]["grad_err"] > 0.05                        # not exact below V

    # priority: 10 of 50 classes finite, U = 12 >= support: every class kept with p
    zm = z.clone()
    zm[:, 10:] = -math.inf
    st_m = be.make_students(torch.where(torch.isinf(zm), z, zm), [NEAR], 0)
    for U, exact in ((12, True), (10, True), (4, False)):
        fmt = ff.Format("priority", U)
        res = ff.run_format(zm, st_m, fmt, D, seed=0)
        for q, tol in ((False, 1e-6), (True, 2e-3)):
            e = ff.summarize(fmt, res, 0, "near", q, D)["grad_err"]
            assert (e < tol) if exact else (e > 0.05), (U, q, e)


def test_priority_unbiased_topk_biased():
    """(3) on peaked-but-wide Zipf rows (head-12 mass ~0.6 of V = 3,000): priority U = 12 and
    untruncated rskd N = 50 read a squared bias within 4 SE of 0; top-12 and top-12 + bucket
    read their closed-form biases (||p - p_top||^2 and ||p_R - r s_R / S_R||^2, pooled), far
    above their SE, the bucket's smaller than top-k's."""
    P, V, D = 3, 3000, 600
    z, st = _zipf(P, V, 1.1, seed=1)
    p = torch.softmax(z.double(), -1)
    s = torch.softmax(st.double(), -1)
    top = torch.topk(p, 12, -1)
    head_mass = top.values.sum(-1)
    assert 0.4 < float(head_mass.mean()) < 0.8                           # peaked but wide
    fmts = [ff.parse_format(f) for f in ("priority:12", "rskd:50", "topk:12", "topk+bucket:12")]
    rows = {}
    for fmt in fmts:
        res = ff.run_format(z, st, fmt, D, seed=0)
        rows[fmt.name] = {(q, k): ff.summarize(fmt, res, k, "x", q, D) for q in (False, True) for k in range(2)}

    # closed forms, dense: E g_hat - g = p - p_top (topk), p_R - r s_R / S_R on R (bucket)
    p_top = torch.zeros_like(p).scatter_(1, top.indices, top.values / head_mass[:, None])
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(1, top.indices, False)
    r = (p * rest).sum(-1, keepdim=True)
    for k in range(2):
        gg = ((s[k] - p) ** 2).sum(-1)
        want_topk = float(((p - p_top) ** 2).sum() / gg.sum())
        sR = s[k] * rest
        want_bucket = float(((p * rest - r * sR / sR.sum(-1, keepdim=True)) ** 2).sum() / gg.sum())
        assert want_bucket < want_topk
        for q in (False, True):
            for name in ("priority:12", "rskd:50"):
                row = rows[name][(q, k)]
                assert row["grad_bias2_se"] > 0
                assert abs(row["grad_bias2"]) < 4 * row["grad_bias2_se"], (name, q, k, row)
                assert abs(row["grad_bias_z"]) < 4
            for name, want in (("topk:12", want_topk), ("topk+bucket:12", want_bucket)):
                row = rows[name][(q, k)]
                assert row["grad_bias"] > 0.05, row
                if q:   # quantization noise: the split-half estimate within 4 SE, bias resolved
                    assert abs(row["grad_bias2"] - want) < 4 * row["grad_bias2_se"] + 1e-9 * want, (name, k, row)
                    assert row["grad_bias2"] > 20 * row["grad_bias2_se"], row
                else:   # fp32: deterministic, exact
                    assert row["grad_bias2"] == pytest.approx(want, rel=1e-5)
                    assert row["grad_bias_z"] is None
                assert row["grad_rel_mse"] >= (row["grad_bias2"] - 4 * row["grad_bias2_se"]) * (1 - 1e-9)
    # unbiased formats still err per draw; rskd's bytes follow its distinct count
    assert rows["priority:12"][(True, 0)]["grad_err"] > 0.05
    rk = rows["rskd:50"][(True, 0)]
    assert 12 < rk["rskd_mean_distinct"] <= 50
    assert rk["bytes_per_position"] == pytest.approx(3 * rk["rskd_mean_distinct"] + 1)


def test_main_writes_json_and_plot(tmp_path: Path):
    """(4) the CLI on the tiny trained LM: one row per requested format, the documented keys,
    byte counts of the codec (3 per record + 1, the bucket + 1) increasing within a family,
    a strict-JSON file and a PNG."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    cut = len(text) // 2
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": text[:cut]}) + "\n")
    (tmp_path / "heldout.jsonl").write_text(json.dumps({"text": text[cut:]}) + "\n")
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    formats = ["priority:4", "priority:8", "topk:12", "topk:50", "topk+bucket:12", "rskd:50"]
    ff.main(["--teacher", "none", "--train", str(tmp_path / "train.jsonl"),
             "--heldout", str(tmp_path / "heldout.jsonl"), "--tiny-steps", "3",
             "--positions", "3", "--lm-positions", "16", "--skip", "8", "--draws", "8",
             "--formats", *formats, "--json", str(out), "--plot", str(png)])

    def no_nan(c):
        raise ValueError(f"non-standard JSON constant {c}")
    rows = json.loads(out.read_text(), parse_constant=no_nan)
    assert sorted(r["format"] for r in rows) == sorted(formats)
    keys = {"format", "family", "param", "bytes_per_position", "grad_bias", "grad_bias_se", "grad_err",
            "grad_rel_mse", "positions", "draws"}
    for r in rows:
        assert keys <= set(r), r
        assert (r["positions"], r["draws"], r["weights"]) == (3, 8, "quantized")
        assert r["grad_err"] >= 0 and r["grad_rel_mse"] >= 0 and r["grad_bias_se"] >= 0
    by = {r["format"]: r["bytes_per_position"] for r in rows}
    assert by["priority:4"] == 13 and by["priority:8"] == 25
    assert by["topk:12"] == 37 and by["topk:50"] == 151 and by["topk+bucket:12"] == 38
    assert 4 <= by["rskd:50"] <= 151
    for fam in ff.FAMILIES:
        fr = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["param"])
        assert all(a["bytes_per_position"] < b["bytes_per_position"] for a, b in zip(fr, fr[1:])), fr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
