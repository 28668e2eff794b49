"""Allocated U: how many class records each position of a window gets, under a budget.

Priority sampling keeps every class with p_i >= tau exactly and estimates the tail, so its
error lives in the tail and grows with tau: a peaked position spends most of a fixed U on
crumbs while a flat one gets too few. Allocation gives each position t its own U_t, a
deterministic function of the teacher's exact distributions of the window (so every class
weight stays unbiased: for a fixed k, the top-k priorities of one draw are a priority sample
of size k), with sum_t U_t = the window's budget (`--class-budget B`: round(B x T) records).

The rule (docs/ESTIMATORS.md, "Allocated U"): minimise the window's total estimator variance
sum_t V_t(U_t) with V_t(k) = sum_i Var[p_hat_i] of a size-k priority sample, approximated by
its threshold form

    V_t(k) = sum_{i: p_i < tau_k} p_i (tau_k - p_i),   sum_i min(1, p_i / tau_k) = k

(tau_k: the inclusion threshold at which k classes are expected, Duffield, Lund & Thorup
2007; the classes above it are kept exactly and add nothing). V_t is decreasing and convex in
k, so the greedy allocation (give the next record to the position whose variance falls most)
is optimal and is computed at once: every position starts at the floor U_min, and the
round(B x T) - U_min x T largest marginal gains V_t(k) - V_t(k + 1), k in [U_min, U_max),
are taken over the window. Floor 1: a position with no record would estimate p_i by 0
(biased). Ceiling U_max (default 4 B): the sampler draws U_max + 1 priorities per position
and the reader's arrays are [T, U_max].

Everything here needs only each position's U_max + 1 largest probabilities and its sum of
squared probabilities (one pass over V), never a sort over V.
"""

from __future__ import annotations

import math

import torch

from pipeline.stage1_cache.class_sampler import (DEFAULT_CHUNK, DEFAULT_DELTA, _block_size, _priority,
                                                 _priority_blocks, _rowdot, _validate, softmax_stats)

DEFAULT_CEILING_FACTOR = 4


def budget_records(budget: float, positions: int) -> int:
    """The records a window of `positions` may hold at an average of `budget` per position."""
    return int(round(budget * positions))


def check_budget(budget: float, u_min: int, u_max: int, method: str = "priority") -> None:
    """Refuse what cannot be allocated, naming the value and the allowed range."""
    if method != "priority":
        raise ValueError(f"--class-budget allocates priority samples only; --sampler {method} keeps a "
                         "fixed U (use --num-classes)")
    if not (isinstance(u_min, int) and isinstance(u_max, int) and 1 <= u_min <= u_max):
        raise ValueError(f"class allocation needs 1 <= floor <= ceiling, got floor {u_min}, ceiling {u_max}")
    if not (math.isfinite(budget) and u_min <= budget <= u_max):
        raise ValueError(f"--class-budget {budget} must be in [{u_min}, {u_max}] (the floor of {u_min} "
                         f"record(s) a position and the ceiling of {u_max})")


def variance_curves(top_p: torch.Tensor, sum_sq: torch.Tensor, u_max: int) -> torch.Tensor:
    """V_t(k) for k = 1..u_max (module docstring), [P, u_max] float64.

    top_p: [P, >= u_max] each position's largest probabilities, sorted descending;
    sum_sq: [P] sum_i p_i^2 over the whole vocabulary.
    """
    q = top_p[:, :u_max].double()
    P = q.shape[0]
    zero = torch.zeros(P, 1, dtype=torch.float64, device=q.device)
    head = torch.cat([zero, torch.cumsum(q, dim=1)], dim=1)              # [P, u_max+1]: sum_{i<=j}
    head_sq = torch.cat([zero, torch.cumsum(q * q, dim=1)], dim=1)
    total = torch.ones(P, dtype=torch.float64, device=q.device)
    out = torch.empty(P, u_max, dtype=torch.float64, device=q.device)
    nxt = torch.cat([q, torch.zeros(P, 1, dtype=torch.float64, device=q.device)], dim=1)  # q_{j+1}
    for k in range(1, u_max + 1):
        j = torch.arange(k, device=q.device, dtype=torch.float64)
        rest = (total[:, None] - head[:, :k]).clamp_min(0.0)            # R_j, j = 0..k-1
        tau = rest / (k - j)                                            # [P, k]
        # the certain classes: the smallest j whose next class falls below its threshold
        below = nxt[:, :k] < tau
        below[:, -1] = True                                             # j = k-1 always ends it
        jj = torch.argmax(below.to(torch.int8), dim=1)                  # first True
        t = tau.gather(1, jj[:, None]).squeeze(1)
        r = rest.gather(1, jj[:, None]).squeeze(1)
        tail_sq = (sum_sq.double() - head_sq.gather(1, jj[:, None]).squeeze(1)).clamp_min(0.0)
        out[:, k - 1] = (t * r - tail_sq).clamp_min(0.0)
    return out


def allocate(curves: torch.Tensor, records: int, u_min: int, u_max: int) -> torch.Tensor:
    """U_t [P] int64 with u_min <= U_t <= u_max and sum U_t = records: the greedy allocation
    of `records` over the positions by the marginal variance falls of `curves` ([P, >= u_max],
    column k-1 = V_t(k)). Deterministic in its inputs (ties: the lower position first)."""
    P = curves.shape[0]
    if not u_min * P <= records <= u_max * P:
        raise ValueError(f"{records} records cannot give {P} positions between {u_min} and {u_max} each")
    U = torch.full((P,), u_min, dtype=torch.long, device=curves.device)
    extra = records - u_min * P
    if extra == 0 or u_max == u_min:
        return U
    gains = (curves[:, u_min - 1:u_max - 1] - curves[:, u_min:u_max]).clamp_min(0.0)  # [P, u_max-u_min]
    # the largest gains; a stable sort resolves ties by (position, k) on every device
    n = gains.shape[1]
    idx = torch.sort(-gains.flatten(), stable=True).indices[:extra]
    U += torch.bincount(idx // n, minlength=P)
    return U


def priority_sample_sizes(p: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator,
                          sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A priority sample of `sizes[t]` classes at each position of `p` [P, V] (one uniform per
    class: the exact, dense reference; the blocked sampler of pipeline.stage1_cache.class_sampler draws only
    the candidates). Returns ids [P, max size] (sentinel-padded) and weights p_hat =
    max(p_i, tau_t), tau_t = the (sizes[t]+1)-th largest priority (0 in padded slots)."""
    P, V = p.shape
    K = int(sizes.max().item())
    u = 1.0 - torch.rand(p.shape, generator=generator, device=p.device)   # (0, 1]
    prio = torch.where(p > 0, p / u, -math.inf)
    top_prio, top_cols = torch.topk(prio, min(K + 1, V), dim=-1, sorted=True)
    if top_prio.shape[1] < K + 1:
        pad = K + 1 - top_prio.shape[1]
        top_prio = torch.cat([top_prio, torch.full((P, pad), -math.inf, device=p.device)], 1)
        top_cols = torch.cat([top_cols, torch.full((P, pad), -1, device=p.device)], 1)
    tau = top_prio.gather(1, sizes[:, None]).squeeze(1)
    tau = torch.where(torch.isfinite(tau), tau, 0.0)
    slot = torch.arange(K, device=p.device)[None, :]
    keep = (slot < sizes[:, None]) & torch.isfinite(top_prio[:, :K])
    ids = top_cols[:, :K]
    p_sel = torch.gather(p, 1, ids.clamp_min(0))
    w = torch.where(keep & (p_sel > 0), torch.maximum(p_sel, tau[:, None]), 0.0)
    return torch.where(w > 0, ids, sentinel), w


def sample_allocated(logits: torch.Tensor, records: int, ceiling: int,
                     generator: torch.Generator | None = None, *, chunk_size: int = DEFAULT_CHUNK,
                     sentinel: int | None = None, delta: float = DEFAULT_DELTA,
                     dense_fraction: float = 0.25):
    """Allocated U (format 4): `records` class records over the P positions of `logits`
    [P, V], U_t in [1, ceiling] per position, chosen from the teacher's exact distributions
    (`allocate`: the greedy allocation of the threshold-form
    variance), then a priority sample of U_t classes at each position.

    U_t is a deterministic function of the positions' probabilities, never of the draws,
    so every weight stays unbiased (for a fixed size, priority sampling is). Two passes: the
    first computes every position's softmax statistics, its `ceiling` largest probabilities
    (from the `ceiling` largest block maxima: those blocks hold them) and sum p^2, and keeps
    them; the allocation runs on all P positions at once; the second draws from the kept
    statistics (no second softmax).

    Returns ids [P, ceiling] (sentinel past U_t), weights [P, ceiling] float32, entropy [P],
    sizes [P] int64 (U_t, summing to `records`).
    """
    _validate(logits, ceiling)
    P, V = logits.shape
    if not P <= records <= ceiling * P:
        raise ValueError(f"{records} records cannot give {P} positions 1 to {ceiling} each")
    if chunk_size < 1 or not 0.0 < delta < 1.0:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 and delta={delta} in (0, 1)")
    sentinel = (1 << V.bit_length()) - 1 if sentinel is None else sentinel
    if generator is None:
        generator = torch.Generator(device=logits.device).manual_seed(0)
    K = ceiling
    block = _block_size(V, K + 1)
    kept, top_p, sum_sq = [], [], []
    for s in range(0, P, chunk_size):
        z = logits[s:s + chunk_size].float().contiguous()
        st = softmax_stats(z, None if block else K + 1)
        n = z.shape[0]
        if block:
            nb = V // block
            bmax = z.view(n, nb, block).amax(dim=-1)
            top_blocks = torch.topk(bmax, K, dim=-1).indices                   # hold the top K
            cand = st.p.view(n, nb, block).gather(1, top_blocks[:, :, None].expand(n, K, block))
            top = torch.topk(cand.reshape(n, K * block), K, dim=-1, sorted=True).values
        else:
            bmax = None
            top = torch.gather(st.p, 1, st.top_idx[:, :K])
        kept.append((z, st, bmax))
        top_p.append(top)
        sum_sq.append(_rowdot(st.p, st.p))
    sizes = allocate(variance_curves(torch.cat(top_p), torch.cat(sum_sq), K), records, 1, K)
    ids_out = torch.empty((P, K), dtype=torch.long, device=logits.device)
    w_out = torch.empty((P, K), dtype=torch.float32, device=logits.device)
    h_out = torch.empty((P,), dtype=torch.float32, device=logits.device)
    for i, (z, st, bmax) in enumerate(kept):
        s = i * chunk_size
        sz = sizes[s:s + z.shape[0]]
        if block:
            ids, w = _priority_blocks(z, st, K, generator, delta, dense_fraction, block, sz, bmax)
        else:
            ids, w = _priority(st.p, st.top_idx, K, generator, delta, dense_fraction, sz)
        ids_out[s:s + z.shape[0]] = torch.where(w > 0, ids, sentinel)
        w_out[s:s + z.shape[0]] = w
        h_out[s:s + z.shape[0]] = st.entropy
        kept[i] = None                                   # free this chunk's statistics
    return ids_out, w_out, h_out, sizes
