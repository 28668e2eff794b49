"""Sampler throughput, side by side in one run (DESIGN.md section 9).

    python tools/bench_sampler.py [--positions 2048] [--vocab 151936] [--repeats 5]

(a) one log_softmax pass over the logits: the floor;
(b) ours: exact entropy + priority sampling + quantization + packing to 37 B/position;
(c) the same with the rskd sampler, N = 50 draws;
(d) the research code's method, reimplemented: N = 50 Gumbel-argmax passes over V, then
    a per-row `unique` loop (timed on a subset of rows and scaled: it is slow).
Logits are LM-like: per row a Zipf law with an exponent drawn in [1.0, 1.6] over a random
permutation of the vocabulary, plus noise (mean entropy is printed; real LMs sit around
2-3 nats). `--flat` uses N(0, 1) logits instead: the sampler's worst case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pipeline.cache_format.codec import RecordCodec
from pipeline.stage1_cache.class_sampler import sample_classes


def lm_like_logits(P: int, V: int, seed: int, flat: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if flat:
        return torch.randn(P, V, generator=g)
    a = 1.0 + 0.6 * torch.rand(P, 1, generator=g)
    logr = torch.log(torch.arange(1, V + 1, dtype=torch.float32))[None, :]
    z = -a * logr * 2.0 + 0.5 * torch.randn(P, V, generator=g)
    perm = torch.randperm(V, generator=g)
    return z[:, perm].contiguous()


def encode(codec: RecordCodec, ids, w, h, rng) -> np.ndarray:
    wc = codec.weight_codebook().encode(w.numpy(), rng)
    ec = codec.entropy_codebook().encode(h.numpy())
    return codec.pack(ids.numpy(), wc, ec)


def research_method(z: torch.Tensor, U: int, draws: int, gen: torch.Generator):
    """N Gumbel-argmax passes, then a Python loop of `unique` per row (the research code)."""
    picks = []
    for _ in range(draws):
        u = torch.rand(z.shape, generator=gen)
        picks.append(torch.argmax(z - torch.log(-torch.log(u)), dim=-1))
    picks = torch.stack(picks, 1)
    out = []
    for row in picks:
        ids, counts = torch.unique(row, return_counts=True)
        order = torch.argsort(counts, descending=True)[:U]
        out.append((ids[order], counts[order].float() / draws))
    return out


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--research-rows", type=int, default=32,
                    help="rows timed for (d); its positions/s is scaled from them")
    ap.add_argument("--flat", action="store_true", help="N(0,1) logits: the worst case")
    args = ap.parse_args()
    P, V, U = args.positions, args.vocab, 12
    z = lm_like_logits(P, V, 0, args.flat)
    codec = RecordCodec(V, U)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    H = sample_classes(z[:256], U, "topk")[2]
    stats: dict = {}

    floor = timed(lambda: torch.log_softmax(z, dim=-1), args.repeats)
    ours = timed(lambda: encode(codec, *sample_classes(z, U, "priority", gen), rng), args.repeats)
    rskd = timed(lambda: encode(codec, *sample_classes(z, U, "rskd", gen, num_draws=50,
                                                       stats=stats), rng), args.repeats)
    zr = z[: args.research_rows]
    research = timed(lambda: research_method(zr, U, 50, gen), max(1, args.repeats // 2))
    research_full = research * P / args.research_rows

    con = Console()
    t = Table(title=f"Sampler throughput: P={P} positions x V={V}, U={U}, "
                    f"{torch.get_num_threads()} threads, mean H={H.mean():.2f} nats"
                    f"{' (flat logits)' if args.flat else ''}")
    for col in ("method", "s per chunk (median)", "positions/s", "x floor"):
        t.add_column(col, justify="right")
    for name, s in [("(a) log_softmax (floor)", floor), ("(b) ours: priority + pack", ours),
                    ("(c) rskd N=50 + pack", rskd),
                    (f"(d) research: 50 Gumbel + unique (scaled from {args.research_rows} rows)",
                     research_full)]:
        t.add_row(name, f"{s:.3f}", f"{P / s:,.0f}", f"{s / floor:.2f}")
    con.print(t)
    trunc = stats["rskd_truncated_positions"] / stats["rskd_positions"]
    con.print(f"b/a = {ours / floor:.2f} (target <= 3)   d/b = {research_full / ours:.1f} "
              f"(target >= 10)   rskd truncated at {trunc:.1%} of positions "
              f"(mean distinct draws {stats['rskd_distinct_sum'] / stats['rskd_positions']:.1f})")


if __name__ == "__main__":
    main()
