"""Teacher logits -> (class ids, unbiased weights, exact entropy): the X axis.

    ids, weights, entropy = sample_classes(logits [P, V], num_classes=12, method="priority")

Samplers (DESIGN.md section 3):
- `priority` (default): priority sampling (Duffield, Lund & Thorup 2007). Class i gets
  priority p_i / u_i with u_i ~ U(0, 1]; keep the U largest; tau = the (U+1)-th largest
  priority; weight p_hat_i = max(p_i, tau). E[p_hat_i] = p_i for every class, exactly U
  distinct classes, and every class with p_i >= tau is kept with its exact probability.
- `rskd`: N draws with replacement from q = softmax(z / tau_s), weight count_i/N * p_i/q_i.
  Unbiased while at most U distinct classes are drawn; beyond U the top-U counts are kept
  (biased, as in the RS-KD research code) and the truncation is counted in `stats`.
- `topk`: the U most probable classes renormalised. Biased; a baseline.

How the priority sampler avoids drawing V random numbers per position (on a CPU the random
numbers, not the softmax, are the expensive part; see shared/notes/sampler-speed-facts.md):
let b <= p_(U+1), a lower bound on the (U+1)-th largest probability. Priorities dominate
probabilities (u <= 1), so the (U+1)-th largest priority is >= b and only classes with
p_i / u_i > b, i.e. u_i < r_i = p_i / b, can enter the top U+1. Classes are split at delta * b:
- heavy (p_i >= delta * b; at most 1 / (delta * b) of them): draw u_i directly;
- light (r_i < delta): propose every class independently with probability delta using
  geometric gaps (about delta * V proposals per row, never a pass over V), give a
  proposal u_i ~ U(0, delta), and keep it iff u_i < r_i. Then P(kept) = r_i and
  u_i | kept ~ U(0, r_i): exactly the law of the direct draw, so the result is exact.
Passes over [P, V]: softmax, max, sum, the entropy dot, and one max per 128-column block;
b is the (U+1)-th largest block max (U+1 distinct logits, so a lower bound) and only the
blocks whose max can be heavy are scanned for heavy classes (`_priority_blocks`). No topk
or [P, V] mask runs on peaked rows (2.4x the log_softmax floor, BENCHMARKS.md); a vocabulary
no block width divides takes b = p_(U+1) from a topk and a heavy mask over V instead.

A -inf logit is a class of probability 0 (a masked class): no sampler ever returns it (a
class with p = 0 never gets a nonzero weight, and slots without one hold the sentinel),
and the entropy is that of the distribution over the finite classes. NaN and +inf logits,
and a row whose logits are all -inf, are refused.

All randomness comes from one `torch.Generator` on the logits' device, so the same code runs
on CPU and CUDA and is deterministic for a given seed and chunking. This module imports
nothing of ours.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

METHODS = ("priority", "rskd", "topk")
# Positions per sampler pass. The passes over [chunk, V] are memory-bound: 64 rows (12 MiB
# at V = 49,152) stay in a 32 MiB L3 where 2,048 rows (400 MiB) stream from DRAM. On the
# 2-core CPU, [1,024, 49,152] logits took 0.177 s at 64 rows against 0.30 s at 2,048 (and
# 0.148 vs 0.180 s for [256, 151,936]). The draws depend on it (caches record it, header
# key `sampler_chunk`; caches written before it existed used 2,048).
DEFAULT_CHUNK = 64
DEFAULT_DELTA = 1.0 / 256   # heavy / light split, in units of b
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _validate(logits: torch.Tensor, num_classes: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [P, V], got {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not one of {_FLOAT_DTYPES}")
    P, V = logits.shape
    if P == 0:
        raise ValueError("logits chunk is empty (P = 0 positions)")
    if not isinstance(num_classes, int) or not 1 <= num_classes < V:
        raise ValueError(f"num_classes U={num_classes!r} must be an integer in [1, V={V})")


def _check_finite(z: torch.Tensor, S: torch.Tensor, entropy: torch.Tensor | None = None) -> None:
    # A NaN or +inf logit makes its row's max shift NaN, so S = sum softmax is NaN: checking
    # the [P] results catches them without another pass over [P, V]. A -inf logit is a class
    # of probability 0 (a masked class) and leaves S finite; a row whose logits are all -inf
    # has no distribution (S is NaN) and is refused with its own message.
    bad = ~torch.isfinite(S)
    if entropy is not None:
        bad |= ~torch.isfinite(entropy)
    if bad.any():
        rows = torch.nonzero(bad).flatten()
        empty = torch.isneginf(z[rows]).all(dim=-1)
        if empty.any():
            er = rows[empty]
            raise ValueError(f"logits are all -inf (no class has nonzero probability) at "
                             f"positions {er[:5].tolist()} ({er.numel()} positions in all)")
        raise ValueError(f"logits contain NaN or inf at positions {rows[:5].tolist()} "
                         f"({rows.numel()} positions in all)")


def _block_size(V: int, min_blocks: int = 1) -> int | None:
    """Column block for the blocked row passes: the largest of 128..8 that divides V into at
    least `min_blocks` blocks (both real vocabularies, 151,936 and 128,256, are multiples of
    128); None: no blocked path."""
    return next((b for b in (128, 64, 32, 16, 8) if V % b == 0 and V // b >= min_blocks), None)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`<a_r, b_r>` per row in fp32, accurate and fast: dots of one column block each (one
    BLAS batch, short sequential sums), then torch's cascade sum over the blocks. 3.5x
    faster than `(a * b).sum(-1)` (no [P, V] product is written) at the same ~1e-6
    accuracy; a whole-row BLAS dot is as slow and 1e-3 off on flat rows."""
    P, V = a.shape
    block = _block_size(V)
    if block is None or not (a.is_contiguous() and b.is_contiguous()):
        return (a * b).sum(dim=-1)
    n = V // block
    return torch.einsum("pnk,pnk->pn", a.view(P, n, block), b.view(P, n, block)).sum(dim=-1)


class Stats(NamedTuple):
    p: torch.Tensor                 # [P, V] softmax, fp32
    entropy: torch.Tensor           # [P] nats
    top_idx: torch.Tensor | None    # [P, k] the k largest logits, sorted (None: k not asked)
    z_max: torch.Tensor             # [P] max logit
    p_max: torch.Tensor             # [P] p at the max logit (= 1 / the softmax's own sum)


def softmax_stats(logits: torch.Tensor, k: int | None) -> Stats:
    """Softmax, exact entropy and (if k) the k largest logits of `[P, V]` logits, in fp32.

    Passes over [P, V]: topk (or a max), softmax, the row sums of p and the row dots
    <p, z>. The max class has p_max = exp(0) / S_softmax, so with S = sum p,
    lse = max z + log S - log p_max and
        H = lse - <p, z> / S.
    Accuracy about 1e-6 nats at V = 151,936 (cascade sums, `_rowdot`). `-<p, log p>` with
    p = exp(log_softmax(z)) is off by (sum p - 1) * E[log p] (~2e-4 nats).
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    if k is None:
        top_idx, z_max, p_max = None, z.amax(dim=-1), p.amax(dim=-1)   # exp is monotone
    else:
        top_z, top_idx = torch.topk(z, min(k, z.shape[1]), dim=-1, sorted=True)
        z_max, p_max = top_z[:, 0], torch.gather(p, 1, top_idx[:, :1]).squeeze(1)
    S = p.sum(dim=-1)
    # softmax divided by its own (fp32, ~1e-5 relative) sum: p_max = 1 / S_softmax, and the
    # cascade sum S = sum p = S_true / S_softmax corrects it: lse = max z + log S_true.
    lse = z_max + torch.log(S) - torch.log(p_max)
    _check_finite(z, S)
    entropy = lse - _rowdot(p, z) / S
    # A -inf logit (p = 0) gives 0 * -inf = NaN in the dot: recompute those rows with the
    # -inf logits zeroed (their p is 0, so H is the entropy over the finite classes). Rows
    # without -inf pay nothing extra.
    holes = ~torch.isfinite(entropy)
    if holes.any():
        r = torch.nonzero(holes).flatten()
        zr = z[r]
        entropy[r] = lse[r] - _rowdot(p[r], torch.where(torch.isneginf(zr), 0.0, zr)) / S[r]
        _check_finite(z, S, entropy)
    return Stats(p, entropy, top_idx, z_max, p_max)


def _rows_topk(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, P: int, k: int):
    """Top-k of ragged per-row lists given as (row, col, value) triples sorted by row.

    Returns `(vals [P, k], cols [P, k])`, padded with -inf / -1 where a row has fewer.
    """
    counts = torch.bincount(rows, minlength=P)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    width = max(int(counts.max()) if counts.numel() else 0, k)
    dense_v = torch.full((P, width), -math.inf, device=values.device, dtype=values.dtype)
    dense_c = torch.full((P, width), -1, device=values.device, dtype=torch.long)
    dense_v[rows, slot] = values
    dense_c[rows, slot] = cols
    top_v, top_i = torch.topk(dense_v, k, dim=-1)
    return top_v, torch.gather(dense_c, 1, top_i)


def _geometric_positions(rate: float, V: int, rows: torch.Tensor, gen: torch.Generator):
    """Bernoulli(rate) process over [0, V) for each row in `rows`: (row, position) pairs.

    Gaps between successes are Geometric(rate); we draw a generous batch of gaps per row
    and draw again for the (astronomically rare) rows whose batch ended before V.
    """
    dev = rows.device
    out_r, out_c = [], []
    start = torch.full((rows.numel(),), -1, dtype=torch.long, device=dev)
    pending = torch.arange(rows.numel(), device=dev)
    mean = rate * V
    m = int(mean + 8 * math.sqrt(mean) + 16)
    log1m = math.log1p(-rate)
    while pending.numel():
        u = torch.rand((pending.numel(), m), generator=gen, device=dev)
        gaps = torch.floor(torch.log1p(-u) / log1m).long() + 1           # >= 1
        pos = start[pending, None] + torch.cumsum(gaps, dim=1)
        keep = pos < V
        r_idx, c_idx = torch.nonzero(keep, as_tuple=True)
        out_r.append(rows[pending[r_idx]])
        out_c.append(pos[r_idx, c_idx])
        last = pos[:, -1]
        start[pending] = last
        pending = pending[last < V - 1]
    if not out_r:
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return empty, empty
    return torch.cat(out_r), torch.cat(out_c)


def _kth(sorted_desc: torch.Tensor, U: int, sizes: torch.Tensor | None) -> torch.Tensor:
    """Column U of each row (fixed U), or column sizes[t] of row t (allocated U_t)."""
    if sizes is None:
        return sorted_desc[:, U]
    return sorted_desc.gather(1, sizes[:, None]).squeeze(1)


def _finish_priority(p: torch.Tensor, top_prio: torch.Tensor, top_cols: torch.Tensor, U: int,
                     sizes: torch.Tensor | None = None):
    """ids = the U largest priorities, tau = the (U+1)-th, p_hat = max(p, tau). With `sizes`
    [P] (allocated U_t <= U): row t keeps its sizes[t] largest, tau_t = the (sizes[t]+1)-th,
    and its slots from sizes[t] on are empty."""
    kth = _kth(top_prio, U, sizes)
    tau = torch.where(torch.isfinite(kth), kth, 0.0)                      # [P]
    ids = top_cols[:, :U]
    valid = (ids >= 0) & torch.isfinite(top_prio[:, :U])
    if sizes is not None:
        valid &= torch.arange(U, device=ids.device)[None, :] < sizes[:, None]
    p_sel = torch.gather(p, 1, ids.clamp_min(0))
    weights = torch.where(valid & (p_sel > 0), torch.maximum(p_sel, tau[:, None]), 0.0)
    return torch.where(valid, ids, -1), weights


def _priority_dense(p: torch.Tensor, U: int, gen: torch.Generator, sizes: torch.Tensor | None = None):
    u = 1.0 - torch.rand(p.shape, generator=gen, device=p.device)        # (0, 1]
    prio = torch.where(p > 0, p / u, -math.inf)
    top_prio, top_cols = torch.topk(prio, U + 1, dim=-1, sorted=True)
    return _finish_priority(p, top_prio, top_cols, U, sizes)


def _priority(p: torch.Tensor, top_idx: torch.Tensor, U: int, gen: torch.Generator, delta: float,
              dense_fraction: float, sizes: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Any V: b = p_(U+1) from the sorted top-(U+1), heavy classes by a pass over V."""
    thr, has_light, b = _heavy_threshold(torch.gather(p, 1, _kth(top_idx, U, sizes)[:, None]).squeeze(1),
                                         delta)
    return _priority_masked(p, thr, has_light, b, U, gen, delta, dense_fraction, sizes)


def _priority_blocks(z: torch.Tensor, st: Stats, U: int, gen: torch.Generator, delta: float,
                     dense_fraction: float, block: int, sizes: torch.Tensor | None = None,
                     bmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V = n * block: heavy classes without a topk or a mask over [P, V].

    The U+1 largest block maxima are U+1 distinct logits, so the (U+1)-th of them is a
    lower bound z_lb <= z_(U+1), and b = p(z_lb) <= p_(U+1) is all the sampler needs of b
    (any lower bound keeps it exact; a smaller one only adds heavy classes). A heavy class
    (p >= delta * b) lies in a block whose max clears the heavy logit, so only those blocks
    are scanned: about one per heavy class, a few percent of V on peaked rows. `sizes`:
    allocated U_t <= U per row; `bmax`: the block maxima when the caller has them."""
    P, V = z.shape
    n = V // block
    zb = z.view(P, n, block)
    if bmax is None:
        bmax = zb.amax(dim=-1)                                             # [P, n]
    z_lb = _kth(torch.topk(bmax, U + 1, dim=-1, sorted=True).values, U, sizes)
    # p = exp(z - z_max) * p_max; shave 1e-6 so fp32 rounding cannot lift b above p_(U+1)
    b = torch.exp(z_lb - st.z_max) * st.p_max * (1.0 - 1e-6)
    thr, has_light, b = _heavy_threshold(b, delta)
    z_h = st.z_max + torch.log(thr / st.p_max) - 1e-4   # logit of thr, minus a rounding margin
    cand = bmax >= z_h[:, None]
    if int(torch.count_nonzero(cand)) > dense_fraction * P * n:
        return _priority_masked(st.p, thr, has_light, b, U, gen, delta, dense_fraction, sizes)
    c_rows, c_blk = torch.nonzero(cand, as_tuple=True)                     # row-major
    ci, off = torch.nonzero(zb[c_rows, c_blk] >= z_h[c_rows, None], as_tuple=True)
    rows, cols = c_rows[ci], c_blk[ci] * block + off
    exact = st.p[rows, cols] >= thr[rows]                                  # the heavy test itself
    return _priority_sparse(st.p, rows[exact], cols[exact], has_light, thr, b, U, gen, delta, sizes)


def _heavy_threshold(b: torch.Tensor, delta: float):
    """b = p_(U+1) [P] -> (heavy threshold, rows with light classes, b). Rows where
    delta * b underflows (b == 0 when fewer than U+1 classes have nonzero fp32 probability)
    have no light classes: every class with p >= tiny is heavy, and those with fewer than
    U+1 such classes keep them exactly."""
    tiny = torch.finfo(torch.float32).tiny
    has_light = delta * b >= tiny
    return torch.where(has_light, delta * b, tiny), has_light, b


def _priority_masked(p: torch.Tensor, thr: torch.Tensor, has_light: torch.Tensor, b: torch.Tensor,
                     U: int, gen: torch.Generator, delta: float, dense_fraction: float,
                     sizes: torch.Tensor | None = None):
    """Heavy classes by a pass over V: rows with more heavy classes than the top-K list."""
    P, V = p.shape
    heavy = p >= thr[:, None]
    n_heavy = int(torch.count_nonzero(heavy))   # (a bool .sum() copies to int64: 20x slower)
    if n_heavy > dense_fraction * P * V:
        # Flat distributions: most classes are heavy, so draw u for every class.
        return _priority_dense(p, U, gen, sizes)
    h_rows, h_cols = torch.nonzero(heavy, as_tuple=True)
    return _priority_sparse(p, h_rows, h_cols, has_light, thr, b, U, gen, delta, sizes)


def _priority_sparse(p: torch.Tensor, h_rows: torch.Tensor, h_cols: torch.Tensor,
                     light_rows: torch.Tensor, thr: torch.Tensor, b: torch.Tensor, U: int,
                     gen: torch.Generator, delta: float, sizes: torch.Tensor | None = None):
    """Heavy classes (h_rows, h_cols) drawn directly; light ones of `light_rows` [P] bool by
    proposals at rate delta, kept iff u < r = p / b."""
    P, V = p.shape
    dev = p.device
    h_p = p[h_rows, h_cols]
    h_u = 1.0 - torch.rand(h_p.shape, generator=gen, device=dev)          # (0, 1]
    h_prio = h_p / h_u
    l_rows, l_cols = _geometric_positions(delta, V, torch.nonzero(light_rows).flatten(), gen)
    l_p = p[l_rows, l_cols]
    l_b = b[l_rows]
    light = l_p < thr[l_rows]
    u = delta * (1.0 - torch.rand(l_p.shape, generator=gen, device=dev))  # U(0, delta]
    keep = light & (u * l_b < l_p)
    rows = torch.cat([h_rows, l_rows[keep]])
    cols = torch.cat([h_cols, l_cols[keep]])
    prio = torch.cat([h_prio, l_p[keep] / u[keep]])
    order = torch.argsort(rows, stable=True)
    top_prio, top_cols = _rows_topk(prio[order], rows[order], cols[order], P, U + 1)
    return _finish_priority(p, top_prio, top_cols, U, sizes)


def _rskd(logits: torch.Tensor, e: torch.Tensor, U: int, gen: torch.Generator,
          num_draws: int, tau_s: float, stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights in the scale of e: count_i / N * e_i / q_i (q normalised)."""
    P, V = e.shape
    dev = e.device
    if tau_s == 1.0:
        q_un = e                                          # q = p: the ratio p_i/q_i is 1
    else:
        zt = logits.float() / tau_s
        q_un = torch.exp(zt - zt.max(dim=-1, keepdim=True).values)
    draws = torch.multinomial(q_un, num_draws, replacement=True, generator=gen)   # [P, N]
    draws, _ = torch.sort(draws, dim=1)
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = torch.cumsum(new.long(), dim=1) - 1           # distinct-class slot of each draw
    counts = torch.zeros((P, num_draws), dtype=torch.float32, device=dev)
    counts.scatter_add_(1, group, torch.ones_like(draws, dtype=torch.float32))
    cls = torch.full((P, num_draws), -1, dtype=torch.long, device=dev)
    cls.scatter_(1, group, draws)
    distinct = new.sum(dim=1)
    if stats is not None:
        stats["rskd_positions"] = stats.get("rskd_positions", 0) + P
        stats["rskd_truncated_positions"] = (stats.get("rskd_truncated_positions", 0)
                                             + int((distinct > U).sum()))
        stats["rskd_distinct_sum"] = stats.get("rskd_distinct_sum", 0) + int(distinct.sum())
    # Keep the top-U counts (ties: the smaller class id), as the research code did.
    k = min(U, num_draws)
    top_c, top_g = torch.topk(counts, k, dim=1, sorted=True)
    ids = torch.gather(cls, 1, top_g)
    valid = top_c > 0
    safe = ids.clamp_min(0)
    q_sel = torch.gather(q_un, 1, safe) / q_un.sum(dim=-1, keepdim=True)
    if tau_s == 1.0:
        weights = torch.where(valid, top_c / num_draws, 0.0)      # p/q = 1 exactly
    else:
        weights = torch.where(valid, top_c / num_draws * torch.gather(e, 1, safe) / q_sel, 0.0)
    if k < U:
        pad = U - k
        ids = torch.cat([ids, ids.new_full((P, pad), -1)], 1)
        weights = torch.cat([weights, weights.new_zeros((P, pad))], 1)
        valid = torch.cat([valid, valid.new_zeros((P, pad))], 1)
    return torch.where(valid, ids, -1), weights


def _topk(p: torch.Tensor, top_idx: torch.Tensor, U: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = top_idx[:, :U]
    vals = torch.gather(p, 1, ids)
    return ids, vals / vals.sum(dim=-1, keepdim=True)


def sample_classes(logits: torch.Tensor, num_classes: int = 12, method: str = "priority",
                   generator: torch.Generator | None = None, *, chunk_size: int = DEFAULT_CHUNK,
                   sentinel: int | None = None, stats: dict | None = None,
                   **method_args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample U classes per position from teacher logits.

    Args:
        logits: `[P, V]` fp32/bf16/fp16 teacher logits (teacher temperature already applied);
            -inf marks a class of probability 0, NaN and +inf are refused.
        num_classes: U, records per position.
        method: one of `priority`, `rskd`, `topk`.
        generator: torch.Generator on the logits' device (None: a fresh one seeded 0).
        chunk_size: positions processed at once (bounds the [chunk, V] fp32 temporaries).
        sentinel: id written into unused slots (support smaller than U); default V's
            codec sentinel 2**bit_length(V) - 1.
        stats: optional dict updated with sampler counters (rskd truncation).
        method_args: `priority`: delta (default 1/256, the heavy/light split),
            dense_fraction (0.25: above this share of heavy classes a chunk draws u for
            every class instead);
            `rskd`: num_draws (50), tau_s (1.0).

    Returns:
        ids `[P, U]` int64, weights `[P, U]` float32 (unquantized p_hat; 0 in unused
        slots), entropy `[P]` float32 (nats).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    _validate(logits, num_classes)
    allowed = {"priority": {"delta", "dense_fraction"}, "rskd": {"num_draws", "tau_s"}, "topk": set()}[method]
    unknown = set(method_args) - allowed
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)} for method {method!r}; "
                         f"allowed: {sorted(allowed)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    P, V = logits.shape
    U = num_classes
    sentinel = (1 << V.bit_length()) - 1 if sentinel is None else sentinel
    if generator is None:
        generator = torch.Generator(device=logits.device).manual_seed(0)
    delta = float(method_args.get("delta", DEFAULT_DELTA))
    dense_fraction = float(method_args.get("dense_fraction", 0.25))
    num_draws = int(method_args.get("num_draws", 50))
    tau_s = float(method_args.get("tau_s", 1.0))
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    if num_draws < 1 or tau_s <= 0:
        raise ValueError(f"rskd needs num_draws >= 1 and tau_s > 0, got {num_draws}, {tau_s}")

    ids_out = torch.empty((P, U), dtype=torch.long, device=logits.device)
    w_out = torch.empty((P, U), dtype=torch.float32, device=logits.device)
    h_out = torch.empty((P,), dtype=torch.float32, device=logits.device)
    # the block-max bound needs U+1 blocks (U+1 distinct logits)
    block = _block_size(V, U + 1) if method == "priority" else None
    for s in range(0, P, chunk_size):
        # one fp32 copy (bf16 teachers), shared below; contiguous: the block paths view it
        # as [P, V / block, block] (a column slice such as logits[:, :V] is not)
        z = logits[s:s + chunk_size].float().contiguous()
        st = softmax_stats(z, None if block else U + 1)
        p, entropy, top_idx = st.p, st.entropy, st.top_idx
        if method == "priority" and block:
            ids, w = _priority_blocks(z, st, U, generator, delta, dense_fraction, block)
        elif method == "priority":
            ids, w = _priority(p, top_idx, U, generator, delta, dense_fraction)
        elif method == "rskd":
            ids, w = _rskd(z, p, U, generator, num_draws, tau_s, stats)
        else:
            ids, w = _topk(p, top_idx, U)
        ids_out[s:s + chunk_size] = torch.where(w > 0, ids, sentinel)
        w_out[s:s + chunk_size] = w
        h_out[s:s + chunk_size] = entropy
    return ids_out, w_out, h_out

