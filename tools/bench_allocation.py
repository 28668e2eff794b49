"""Allocated U on the real teacher, no training: the estimator variance a window's records buy.

    python tools/bench_allocation.py [--windows 16] [--seq-len 128] [--json OUT]

The demo's SmolLM2-135M teacher (assets_cache/) on the first --windows windows of its
held-out Wikipedia text. For every position t: the threshold-form variance V_t(k) of a size-k
priority sample (pipeline.stage1_cache.class_budget: sum_i Var[p_hat_i], the error of the sparse KD
gradient's target), for fixed U (every position k records) and for allocated U (the window's
round(B x T) records spread greedily, floor 1, ceiling 48). Printed: the mean total variance
per position and its ratio to fixed U = 12, the bytes per position (fixed: 3U + 1; allocated:
3B + 2 with a count byte per position), the U_t histogram by entropy, and on one low- and one
high-entropy row the z-scores of each class's mean weight over --draws draws of stage 1's
own allocated sampler (class_budget.sample_allocated on the row's window, weights rounded
onto the allocated cache's codebook) against p_i (unbiasedness), and the records every draw
put in the window. Deterministic; no timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.stage1_cache import class_budget as cb  # noqa: E402

FIXED = (4, 12, 24, 32, 48)
BUDGETS = (35 / 3, 12.0, 24.0)      # 35/3: 37 B a position with the count byte


def teacher_rows(assets: Path, windows: int, T: int):
    """(p [N, V] float32, entropy [N]) of the teacher on held-out windows, window-major."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.common.text import DataSpec, load_documents, token_stream, windows as cut

    tok = AutoTokenizer.from_pretrained(assets / "teacher")
    model = AutoModelForCausalLM.from_pretrained(assets / "teacher", dtype=torch.float32).eval()
    docs = load_documents(DataSpec(path=str(assets / "corpus" / "heldout.jsonl"), text_field="text"))
    wins = [w for _, w in zip(range(windows), cut(token_stream(docs, tok), T))]
    ps, hs = [], []
    with torch.no_grad():
        for w in wins:
            logits = model(input_ids=torch.tensor(w.astype("int64"))[None]).logits[0].float()
            logp = torch.log_softmax(logits[:, :len(tok)], dim=-1)
            ps.append(logp.exp())
            hs.append(-(logp.exp() * logp).sum(-1))
    return ps, hs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get("SAMPLEDKD_ASSETS", REPO / "assets_cache")))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--ceiling", type=int, default=48)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (args.assets / "teacher" / "config.json").is_file():
        sys.exit(f"bench_allocation: {args.assets}/teacher missing: run `python -m pipeline.demo.assets` first")
    ps, hs = teacher_rows(args.assets, args.windows, args.seq_len)
    U_max = args.ceiling
    curves = []
    for p in ps:
        top = torch.topk(p, U_max + 1, dim=1).values
        curves.append(cb.variance_curves(top, (p.double() ** 2).sum(1), U_max))
    n = sum(c.shape[0] for c in curves)
    res = {"positions": n, "fixed": {}, "allocated": {}}
    for k in FIXED:
        res["fixed"][k] = {"variance": sum(float(c[:, k - 1].sum()) for c in curves) / n,
                           "bytes": 3 * k + 1}
    hist = {}
    for B in BUDGETS:
        tot, used = 0.0, 0
        Us = []
        for c in curves:
            U = cb.allocate(c, cb.budget_records(B, c.shape[0]), 1, U_max)
            Us.append(U)
            used += int(U.sum())
            tot += float(c.gather(1, (U - 1)[:, None]).sum())
        res["allocated"][round(B, 3)] = {"variance": tot / n, "bytes": 3 * B + 2, "records": used / n}
        hist[round(B, 3)] = torch.cat(Us)
    base = res["fixed"][12]["variance"]
    print(f"{n} positions ({args.windows} windows x {args.seq_len}) of held-out text, SmolLM2-135M teacher")
    print(f"{'format':28s} {'B/pos':>6s} {'records/pos':>11s} {'variance/pos':>13s} {'vs U=12':>8s}")
    for k, r in res["fixed"].items():
        print(f"{'fixed U=' + str(k):28s} {r['bytes']:6.1f} {k:11.2f} {r['variance']:13.6f} {r['variance'] / base:8.3f}")
    for B, r in res["allocated"].items():
        print(f"{'allocated B=' + format(B, '.2f'):28s} {r['bytes']:6.1f} {r['records']:11.2f} "
              f"{r['variance']:13.6f} {r['variance'] / base:8.3f}")
    H = torch.cat(hs)
    U = hist[round(35 / 3, 3)]
    print("allocated B=11.67: U_t by teacher entropy (mean, min, max)")
    edges = [0, 0.5, 1, 2, 3, 4, 6, 11]
    by = []
    for lo, hi in zip(edges, edges[1:]):
        m = (H >= lo) & (H < hi)
        if m.any():
            u = U[m].double()
            by.append({"entropy": [lo, hi], "positions": int(m.sum()), "mean_U": float(u.mean()),
                       "min_U": int(u.min()), "max_U": int(u.max())})
            print(f"  H in [{lo}, {hi}) nats: {int(m.sum()):5d} positions, U_t mean {float(u.mean()):5.1f}, "
                  f"range {int(u.min())}-{int(u.max())}")
    res["u_by_entropy"] = by
    # Unbiasedness of what stage 1 writes: the stage's sampler (class_budget.sample_allocated:
    # allocation + blocked priority sampling) on the whole window holding the lowest- and the
    # highest-entropy row, each draw's weights rounded onto the allocated cache's codebook
    # (8 weight bits at V = 49,152, top level weight_max(1)), against the teacher's exact p.
    from pipeline.cache_format.codec import RecordCodec
    from pipeline.stage1_cache.class_budget import sample_allocated

    T = args.seq_len
    B = 35 / 3
    R = cb.budget_records(B, T)
    V = ps[0].shape[1]
    codec = RecordCodec(V, U_max, seq_len=T, window_records=R)
    book = codec.weight_codebook()
    rng = __import__("numpy").random.default_rng(5)
    zs = {}
    for name, t in (("low", int(torch.argmin(H))), ("high", int(torch.argmax(H)))):
        win, row = divmod(t, T)
        p = ps[win].double()
        logits = torch.log(ps[win].clamp_min(1e-30)).float()
        g = torch.Generator().manual_seed(11)
        tot = torch.zeros(V, dtype=torch.float64)
        sq = torch.zeros_like(tot)
        records = set()
        for _ in range(args.draws):
            ids, w, _, sizes = sample_allocated(logits, R, U_max, g, sentinel=codec.sentinel)
            records.add(int(sizes.sum()))
            w = torch.from_numpy(book.decode(book.encode(w.numpy(), rng))).double()
            d = torch.zeros(V + 1, dtype=torch.float64).scatter_add_(
                0, torch.where(ids[row] < V, ids[row], V), w[row])[:-1]
            tot += d
            sq += d * d
        mean = tot / args.draws
        se = ((sq / args.draws - mean ** 2).clamp_min(0) / args.draws).sqrt()
        pp = p[row]
        big = (pp > 1e-3) & (se > 0)
        z = ((mean - pp) / se)[big]
        zs[name] = {"entropy": float(H[t]), "U_t": int(sizes[row]), "classes_tested": int(big.sum()),
                    "max_abs_z": float(z.abs().max()) if big.any() else 0.0,
                    "mean_z": float(z.mean()) if big.any() else 0.0,
                    "exact_classes": int(((pp > 1e-3) & (se == 0)).sum()),
                    "records_per_window": sorted(records), "budget_records": R}
        print(f"unbiasedness (stage 1's sampler + codebook), {name}-entropy row (H {float(H[t]):.2f}, "
              f"U_t {int(sizes[row])}): {zs[name]['classes_tested']} sampled classes with p > 1e-3, "
              f"max |z| {zs[name]['max_abs_z']:.2f}, mean z {zs[name]['mean_z']:+.2f}; "
              f"{zs[name]['exact_classes']} kept exactly; records per window {sorted(records)} "
              f"(budget {R})")
    res["unbiasedness"] = zs
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
