"""Sampled-softmax KD and CE: losses that never form a [N, V] row of logits.

`sampled_softmax_kd` computes the student's logits exactly for the cached classes of each
row and for a shared set E of `exact_ids` (by default the K classes holding the most cached
teacher mass, `frequent_classes`), and estimates the rest of the partition function from M
negatives drawn uniformly without replacement. Cost per row: U + K + M logits instead of V.
`sampled_ce` is the same estimator with one hard target. `pipeline.distill` reaches both
with `--kd-loss sampled_softmax` (`--num-negatives M`, `--exact-classes K`).

Bias and per-draw error against the exact sparse KD: BENCHMARKS.md, "Sparse KD loss".
Conventions (shapes, padding ids >= V, position weights, temperature): `pipeline.stage2_distill.losses`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from pipeline.stage2_distill.losses import (_check_linear, _check_rows, _check_targets, _check_temperature,
                             _hard_targets, _reduce, _targets)


def negatives_generator(seed: int, rank: int, step: int, micro: int,
                        device: torch.device) -> torch.Generator:
    """The negatives' random stream of one micro-step of one rank: a function of
    (seed, rank, step, micro) only, so a resumed run draws the same negatives."""
    mixed = int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(mixed)


def frequent_classes(batches, k: int, vocab: int,
                     sum_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The `k` classes with the most cached teacher mass (sum of `p_hat` over the records
    of `batches`, iterable of objects with `.ids` [B, T, U] and `.weights`), summed over
    ranks by `sum_over_ranks(tensor) -> tensor` when given, so every rank gets the same
    set. Ties go to the smaller id. Returns a sorted [min(k, vocab)] int64 tensor."""
    mass = torch.zeros(vocab, dtype=torch.float64)
    for b in batches:
        ids, w = b.ids.reshape(-1).long(), b.weights.reshape(-1).double()
        ok = ids < vocab
        mass.index_add_(0, ids[ok], w[ok])
    if sum_over_ranks is not None:
        mass = sum_over_ranks(mass)
    top = torch.argsort(-mass, stable=True)[:min(k, vocab)]   # stable: ties by id
    return torch.sort(top).values


def _draw_negatives(vocab: int, m: int, generator: torch.Generator | None,
                    exact: Tensor, device) -> Tensor:
    """M distinct classes, uniform without replacement over the classes not in `exact`;
    all of them when M reaches their number."""
    pool = torch.ones(vocab, dtype=torch.bool, device=device)
    pool[exact] = False
    pool = torch.nonzero(pool).flatten()
    if m >= pool.numel():
        return pool
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return pool[torch.randperm(pool.numel(), generator=generator, device=gen_device)[:m].to(device)]


def sampled_softmax_kd(
    hidden: Tensor,
    lm_weight: Tensor,
    ids: Tensor,
    weights: Tensor,
    num_negatives: int,
    generator: torch.Generator | None,
    position_weights: Tensor | None = None,
    lm_bias: Tensor | None = None,
    temperature: float = 1.0,
    self_normalize: bool = False,
    exact_ids: Tensor | None = None,
    return_per_position: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Sparse KD with a sampled softmax: never forms the [N, V] logits.

    Shapes: hidden [N, H] (selected rows), lm_weight [V, H], lm_bias [V] or None,
    ids [N, U] int (id >= V = padding), weights [N, U] (`p_hat`), position_weights [N] or
    None, exact_ids [K] int or None -> (loss_sum, count) as in `sparse_kd`.

    Exact logits for `S_t` (the valid, distinct ids of row t) and for `E = exact_ids` (shared
    by all rows; optional, e.g. the K most frequent classes of the cache); the rest of the
    vocabulary is represented by `M = num_negatives` negatives `Q` drawn uniformly WITHOUT
    replacement from `V \\ E`, one draw shared by all rows of the call. With
    `z = (h W^T + b) / T`, `C_t = V \\ (S_t ∪ E)` and `Q_t = Q ∩ C_t` (`M'_t` of them: a
    negative that is also in S_t is dropped, as it is already counted exactly):

        Z_hat_t = sum_{i in S_t ∪ E} e^{z_i} + (|C_t| / M'_t) * sum_{j in Q_t} e^{z_j}
        L_t     = - T**2 * sum_{i in S_t} p_hat_i * (z_i - log Z_hat_t)

    Given `M'_t`, `Q_t` is a uniform sample without replacement from `C_t`, so
    `E[Z_hat_t] = Z_t` exactly; `log Z_hat_t` is biased low (Jensen, about
    `-Var(Z_hat_t) / (2 Z_t**2)`): consistent, biased for finite M, exact once `Q_t = C_t`
    (M >= V - K). `M'_t = 0` (only when M <= |S_t|) drops the sampled term. Uniform
    negatives rarely hit the frequent classes that hold most of a Zipf-like student's mass
    outside S_t, so without E the bias is large; E = the 1,024 most frequent classes cut
    it by an order of magnitude (tools/bench_loss.py). The gradient w.r.t. lm_weight is a
    dense [V, H] tensor, zero outside the rows touched. `return_per_position=True` adds the
    per-row losses `L_t` [N] (detached, before position weights) as a third output.
    """
    n, vocab = _check_linear("sampled_softmax_kd", hidden, lm_weight, lm_bias)
    if num_negatives < 1:
        raise ValueError(f"sampled_softmax_kd: num_negatives must be >= 1, got {num_negatives}")
    _check_targets("sampled_softmax_kd", n, ids, weights)
    _check_rows("sampled_softmax_kd", n, ("position_weights", position_weights, 1))
    _check_temperature(temperature)
    if exact_ids is None:
        exact_ids = torch.empty(0, dtype=torch.long, device=hidden.device)
    elif exact_ids.dim() != 1 or bool(((exact_ids < 0) | (exact_ids >= vocab)).any()):
        raise ValueError(f"sampled_softmax_kd: exact_ids must be a 1-D tensor of class ids in "
                         f"[0, {vocab}), got shape {tuple(exact_ids.shape)}")
    exact = torch.unique(exact_ids.to(hidden.device, torch.long))  # distinct, so counted once
    idx, w, row_ok = _targets(ids, weights, vocab, self_normalize)
    u, k = idx.shape[1], exact.numel()
    shared = torch.cat([exact, _draw_negatives(vocab, num_negatives, generator, exact,
                                               hidden.device)])  # [K + M], distinct
    m = shared.numel() - k

    # One index_select for targets, exact classes and negatives: its backward is a single
    # dense [V, H] index_add, where separate lookups would allocate and sum several.
    rows = torch.cat([idx.reshape(-1), shared])
    w_rows = lm_weight.index_select(0, rows).float()  # [N*U + K + M, H]
    h = hidden.float()
    z_s = torch.bmm(w_rows[: n * u].view(n, u, h.shape[1]), h[:, :, None]).squeeze(2)  # [N, U]
    z_sh = h @ w_rows[n * u :].T  # [N, K + M]
    if lm_bias is not None:
        b = lm_bias.index_select(0, rows).float()
        z_s = z_s + b[: n * u].view(n, u)
        z_sh = z_sh + b[n * u :]
    z_s, z_sh = z_s / temperature, z_sh / temperature

    # S_t membership: valid slots, first occurrence of each id (duplicates carry target
    # weight but enter the partition once).
    valid = ids < vocab
    srt, order = torch.sort(torch.where(valid, ids, -1 - torch.arange(u, device=ids.device)), 1)
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    member = valid & ~torch.zeros_like(valid).scatter_(1, order, dup_sorted)

    # Which shared classes fall in S_t: position of every class in `shared` (-1 if absent),
    # looked up at the member ids, scattered into an [N, K + M] mask (last column: a sink).
    where_in = torch.full((vocab,), -1, dtype=torch.long, device=hidden.device)
    where_in[shared] = torch.arange(k + m, device=hidden.device)
    hit = torch.where(member, where_in[idx], -1)
    in_s = torch.zeros(n, k + m + 1, dtype=torch.bool, device=hidden.device)
    in_s = in_s.scatter_(1, torch.where(hit >= 0, hit, k + m), True)[:, : k + m]
    m_out = m - in_s[:, k:].sum(1)  # M'_t
    c_size = vocab - k - (member.sum(1) - in_s[:, :k].sum(1))  # |C_t| = |V \ (S_t ∪ E)|
    # log(|C_t| / M'_t) on the negative columns, 0 on the exact ones; clamped logs keep it
    # finite where the column is masked anyway (M'_t = 0 or C_t empty).
    log_scale = torch.log(c_size.clamp_min(1).float()) - torch.log(m_out.clamp_min(1).float())
    col_scale = torch.cat([torch.zeros(n, k, device=hidden.device),
                           log_scale[:, None].expand(n, m)], 1)
    keep = ~in_s
    keep[:, k:] &= ((m_out > 0) & (c_size > 0))[:, None]
    neg_inf = torch.tensor(float("-inf"), device=hidden.device)
    log_z = torch.logsumexp(torch.cat([torch.where(member, z_s, neg_inf),
                                       torch.where(keep, z_sh + col_scale, neg_inf)], 1), 1)
    # A row without a valid slot may have log_z = -inf; `where` keeps its loss an exact 0.
    log_z = torch.where(row_ok, log_z, 0.0)
    per_row = temperature**2 * (w.sum(1) * log_z - (w * z_s).sum(1))
    total, count = _reduce(per_row, row_ok, position_weights)
    return (total, count, per_row.detach()) if return_per_position else (total, count)


def sampled_ce(
    hidden: Tensor,
    lm_weight: Tensor,
    targets: Tensor,
    num_negatives: int,
    generator: torch.Generator | None,
    position_weights: Tensor | None = None,
    lm_bias: Tensor | None = None,
    ignore_index: int = -100,
    exact_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy with the sampled-softmax partition of `sampled_softmax_kd` (S_t = {y_t}).

    Shapes: hidden [N, H], lm_weight [V, H], targets [N] int, exact_ids [K] or None
    -> (loss_sum, count). With E = exact_ids and C_t = V \\ ({y_t} ∪ E):

        L_t = - z_{y_t} + log(sum_{i in {y_t} ∪ E} e^{z_i} + (|C_t| / M'_t) sum_{j in Q_t} e^{z_j})
    """
    ids = _hard_targets("sampled_ce", targets, lm_weight.shape[0], ignore_index)
    return sampled_softmax_kd(hidden, lm_weight, ids, torch.ones_like(ids, dtype=torch.float32),
                              num_negatives, generator, position_weights, lm_bias,
                              exact_ids=exact_ids)
