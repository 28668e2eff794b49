"""Position weights and the all-positions estimate of `positional` selection: old rule vs new.

    python tools/bench_positional.py                          # 20,000 draws, T=512 f=0.25, T=128 f=0.1
    python tools/bench_positional.py --draws 40000 --scenarios 2048:0.25

`positional` keeps K = ceil(frac*T) positions of a sequence and weights them so that
`sum_{t in S} w_t x_t` estimates `sum_t x_t`, the all-positions KD loss. Each draw of a
sequence gives the ratio r = estimate / true sum (unbiased: E[r] = 1). Per estimator: mean r,
relative bias (mean r - 1) +- its SE (std r / sqrt(draws)) and z, the per-draw relative
error (std r), median, 99.9th percentile and max of r, the largest position weight seen,
and the share of draws that picked a position whose entropy byte is 0.

Estimators (score = teacher entropy, alpha = 1):
- `old`: the former rule, priority sampling over `q = max(score, 1e-6)`, `w = max(1, tau/q)`
  (tau = the (K+1)-th largest priority q/u): reimplemented here as the reference.
- `priority, floor F`: the same sampling with the new relative floor
  `q = max(score, F * mean score)`: its tau is random (a (K+1)-th order statistic of q/u),
  so even floored weights have no fixed bound; shown to justify the change of sampler.
- `new, floor F`: `pipeline.stage2_distill.selection.positional_rule` (fixed inclusion probabilities
  `pi = min(1, q/tau)`, systematic sampling, `w = 1/pi <= (1 + F) / (F * frac)`).
- `uniform`: the new rule at alpha = 0 (every position pi = K/T, w = T/K), for scale.

Data (synthetic, fixed seed; a real cache needs the real teacher, and `pipeline.demo.tiny`'s
random models give near-uniform entropies with no zeros at all): `--seqs` sequences of T
positions. Teacher entropy per position: with probability 0.3 "confident", h ~ Exp(mean
1e-4 nats), else h ~ LogNormal(ln 1.5, 1.0) clipped to ln V; then quantized to the cache's
entropy byte and decoded (`pipeline.cache_format.codec.EntropyCodebook`, V = 151,936: levels 0, 1.8e-4,
7.3e-4, ...), so ~18% of positions decode to exactly 0 and ~12% to the next levels.
Per-position KD loss (nats), correlated with the entropy: `x = 0.4 h LogNormal(0, 0.5) +
Exp(mean 0.01) + B Exp(mean 2)`, B ~ Bernoulli(0.03) (`--miss-rate`): the student now and
then misses a token the teacher is sure of, the case the old rule weighted by ~1e5-1e6.
Draws are split evenly over the sequences; r is pooled (every sequence has E[r] = 1).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pipeline.cache_format.codec import EntropyCodebook
from pipeline.stage2_distill.selection import RuleContext, k_per_row, positional_rule

VOCAB = 151_936


def make_sequences(n_seq: int, T: int, seed: int, miss: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """(decoded teacher entropies [n_seq, T] float32, per-position losses [n_seq, T] float64)."""
    rng = np.random.default_rng(seed)
    top = math.log(VOCAB)
    conf = rng.random((n_seq, T)) < 0.3
    h = np.where(conf, rng.exponential(1e-4, (n_seq, T)),
                 np.minimum(rng.lognormal(math.log(1.5), 1.0, (n_seq, T)), top))
    cb = EntropyCodebook(VOCAB)
    dec = cb.decode(cb.encode(h))
    x = (0.4 * h * rng.lognormal(0.0, 0.5, (n_seq, T)) + rng.exponential(0.01, (n_seq, T))
         + (rng.random((n_seq, T)) < miss) * rng.exponential(2.0, (n_seq, T)))
    return dec.astype(np.float32), x


def old_rule(scores, valid, frac, gen, floor_rel=None):
    """The former positional rule (priority sampling); floor_rel: relative floor instead of 1e-6."""
    s = scores.double()
    if floor_rel is None:
        q = s.clamp_min(1e-6)
    else:
        mean = torch.where(valid, s, 0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
        q = torch.maximum(s, floor_rel * mean)
    u = 1.0 - torch.rand(s.shape, generator=gen, dtype=torch.float64)
    r = torch.where(valid, q / u, -math.inf)
    k = k_per_row(valid, frac)
    srt, order = torch.sort(r, dim=1, descending=True)
    tau = srt.gather(1, k.clamp_max(r.shape[1] - 1)[:, None]).squeeze(1)
    tau = torch.where(k < valid.sum(1), tau, 0.0).clamp_min(0)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(r.shape[1]).expand_as(order))
    mask = (rank < k[:, None]) & valid
    return mask, torch.where(mask, torch.clamp(tau[:, None] / q, min=1.0), 0.0)


def new_rule(scores, valid, frac, gen, floor_rel, alpha=1.0):
    out = positional_rule(scores, valid, frac, RuleContext(gen, positional_alpha=alpha,
                                                           positional_floor=floor_rel))
    return out.mask, out.weights.double()


def run(ent: np.ndarray, x: np.ndarray, frac: float, draws: int, chunk: int, fn, seed: int) -> dict:
    n_seq, T = ent.shape
    gen = torch.Generator().manual_seed(seed)
    ratios, wmax, zero_hits = [], 0.0, 0
    per_seq = draws // n_seq
    for i in range(n_seq):
        s, xs = torch.from_numpy(ent[i]), torch.from_numpy(x[i])
        truth = float(xs.sum())
        zero = s == 0
        for start in range(0, per_seq, chunk):
            R = min(chunk, per_seq - start)
            valid = torch.ones(R, T, dtype=torch.bool)
            mask, w = fn(s.expand(R, T), valid, frac, gen)
            ratios.append(((w * xs).sum(1) / truth).numpy())
            wmax = max(wmax, float(w.max()))
            zero_hits += int((mask & zero).any(1).sum())
    r = np.concatenate(ratios)
    se = r.std(ddof=1) / math.sqrt(r.size)
    return dict(n=r.size, mean=r.mean(), bias=r.mean() - 1, se=se, z=(r.mean() - 1) / se,
                std=r.std(ddof=1), median=np.median(r), p999=np.quantile(r, 0.999), max=r.max(),
                wmax=wmax, zero_share=zero_hits / r.size)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=20_000, help="draws per estimator and scenario")
    ap.add_argument("--seqs", type=int, default=8, help="synthetic sequences (draws split evenly)")
    ap.add_argument("--scenarios", nargs="+", default=["512:0.25", "128:0.1"], metavar="T:FRAC")
    ap.add_argument("--floors", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2])
    ap.add_argument("--chunk", type=int, default=2000, help="draws per batched call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="also print each table as markdown")
    ap.add_argument("--miss-rate", type=float, default=0.03,
                    help="share of positions whose loss gets an extra Exp(mean 2 nats), any entropy")
    args = ap.parse_args(argv)
    con = Console(width=160)
    for sc in args.scenarios:
        T, frac = int(sc.split(":")[0]), float(sc.split(":")[1])
        ent, x = make_sequences(args.seqs, T, args.seed, args.miss_rate)
        K = math.ceil(frac * T - 1e-9)
        ests = [("old: priority, max(s, 1e-6)", lambda s, v, f, g: old_rule(s, v, f, g), None)]
        ests += [(f"priority, floor {F:g}", lambda s, v, f, g, F=F: old_rule(s, v, f, g, F), None)
                 for F in args.floors]
        ests += [(f"new, floor {F:g}", lambda s, v, f, g, F=F: new_rule(s, v, f, g, F),
                  (1 + F) / (F * frac)) for F in args.floors]
        ests += [("uniform (new, alpha 0)", lambda s, v, f, g: new_rule(s, v, f, g, 0.05, 0.0), T / K)]
        table = Table(title=(f"T={T} frac={frac} (K={K}), {args.seqs} sequences, {args.draws:,} draws; "
                             f"entropy byte 0 at {(ent == 0).mean():.1%} of positions, "
                             f"true sums {x.sum(1).min():.0f}..{x.sum(1).max():.0f} nats, "
                             f"miss rate {args.miss_rate}"))
        cols = ("estimator", "mean r", "rel. bias +- SE", "z", "std r", "median r",
                "p99.9 r", "max r", "max weight", "bound", "draws w/ byte-0 pos.")
        for col in cols:
            table.add_column(col, justify="left" if col == "estimator" else "right")
        for j, (name, fn, bound) in enumerate(ests):
            t0 = time.perf_counter()
            m = run(ent, x, frac, args.draws, args.chunk, fn, args.seed + 1 + j)
            table.add_row(name, f"{m['mean']:.4f}", f"{m['bias']:+.4f} +- {m['se']:.4f}", f"{m['z']:+.1f}",
                          f"{m['std']:.3f}", f"{m['median']:.4f}", f"{m['p999']:.3f}", f"{m['max']:.3g}",
                          f"{m['wmax']:.4g}", "-" if bound is None else f"{bound:.4g}",
                          f"{m['zero_share']:.2%}")
            con.log(f"{name}: {time.perf_counter() - t0:.1f} s")
        con.print(table)
        if args.markdown:
            print(f"\n{table.title}\n\n| " + " | ".join(cols) + " |\n|---" + "|---:" * (len(cols) - 1) + "|")
            for row in zip(*(c.cells for c in table.columns)):
                print("| " + " | ".join(row) + " |")
    con.print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
