"""Pure tensor losses for distillation from a sparse teacher cache (DESIGN.md section 5).

Every loss returns `(loss_sum, count)`, two 0-d float32 tensors, so the caller normalizes
once (after summing over micro-batches and ranks): `loss = loss_sum / count`.

Conventions shared by every function here
- Rows are positions. `N` = rows handed in (the selected positions), `V` = vocabulary,
  `U` = cached slots per position (12), `H` = hidden size.
- Math is float32 whatever the input dtype (bf16 logits are upcast chunk by chunk, never
  all at once); gradients come back in the input's dtype.
- Cache slots whose id is `>= V` are padding (the codec's sentinel is `2**id_bits - 1 >= V`):
  weight 0, never gathered. A row with no valid slot contributes nothing, not even to
  `count`.
- `position_weights [N]` (float, or a bool mask): row t's loss is multiplied by `r_t`,
  and `count = sum of r_t over the contributing rows` (rows with `r_t != 0` and at least one
  valid slot), i.e. `loss_sum / count` is the `r`-weighted mean, as for torch's `nll_loss`
  with class weights. Without position weights `count` is the number of contributing rows.
  All rows masked -> `(0, 0)`; the zero sum stays attached to the graph so every
  parameter still receives a (zero) gradient.
- KD temperature `T` is applied to the student only (the teacher's temperature was fixed
  when the cache was written) and the loss is multiplied by `T**2` (Hinton et al., 2015), so
  the gradient w.r.t. the logits is `T * (...)` rather than `(...) / T`: raising `T` does
  not shrink the gradient. At `T = 1` nothing changes.
- Targets (`weights`, teacher logits) are constants: no gradient flows into them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ce",
    "dense_kd",
    "sparse_kd",
    "sparse_kd_linear",
    "sparse_kd_per_position",
    "sparse_kl_estimate",
]

# Rows per chunk are chosen so that one float32 chunk of logits holds about this many
# elements: 2**23 * 4 B = 32 MiB, i.e. 55 rows at V = 151,936. On the 2-core CPU, sparse_kd
# fwd+bwd over [256, 151936] took 1.68 / 1.01 / 1.39 / 1.14 s with 27 / 55 / 110 / 256-row
# chunks (interleaved medians): larger chunks are no faster, and peak memory grows with them.
_CHUNK_ELEMENTS = 2**23


# The fused head adds each chunk's [V, H] weight-gradient term with one addmm that reads
# and writes all of grad_W: with few rows per chunk that traffic, not the matmuls, sets the
# time. At V=151,936, H=512, N=256 on the 2-core CPU (medians of 5): 32 / 55 / 128 / 256
# rows took 1.38 / 1.32 / 0.92 / 0.85 s against 1.06 s for lm_head + sparse_kd. 128 rows
# (a 74 MiB chunk at that V) is the knee: faster than materialized logits, far less memory.
_FUSED_MIN_ROWS = 128


def _chunk_rows(vocab_size: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return chunk_rows


def _scaled(x: Tensor, t: float) -> Tensor:
    """`x.float() / t` without a copy when it is a no-op: read the result, never write it."""
    x = x.float()
    return x if t == 1.0 else x / t


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_rows(name: str, rows: int, *named: tuple[str, Tensor | None, int]) -> None:
    """Every `(name, tensor, ndim)` must have `ndim` dims and `rows` rows (None = absent)."""
    for tname, t, ndim in named:
        if t is not None and (t.dim() != ndim or t.shape[0] != rows):
            raise ValueError(
                f"{name}: {tname} must be {ndim}-D with {rows} rows (one per position), "
                f"got shape {tuple(t.shape)}"
            )


def _check_targets(name: str, rows: int, ids: Tensor, weights: Tensor) -> None:
    _check_rows(name, rows, ("ids", ids, 2))
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name}: ids must be an integer tensor, got {ids.dtype}")
    if weights.shape != ids.shape:
        raise ValueError(
            f"{name}: weights {tuple(weights.shape)} must have the shape of ids {tuple(ids.shape)}"
        )


def _check_linear(name: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int]:
    """hidden [N, H], weight [V, H], bias [V] or None -> (N, V)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden [N, H] and lm_weight [V, H] must agree on H, "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name}: lm_bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    return hidden.shape[0], weight.shape[0]


def _targets(ids: Tensor, weights: Tensor, vocab_size: int, self_normalize: bool):
    """Mask sentinel slots. Returns gather-safe ids [N,U], fp32 weights [N,U] (0 at padding)
    and the per-row "has a valid slot" mask [N]."""
    valid = ids < vocab_size
    idx = torch.where(valid, ids, torch.zeros_like(ids))  # negative ids still fail in gather
    w = torch.where(valid, weights.float(), 0.0)
    if self_normalize:
        # p_hat / sum(p_hat): biased (a ratio of estimators) but lower variance.
        w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return idx, w, valid.any(1)


def _reduce(per_row: Tensor, row_ok: Tensor, position_weights: Tensor | None):
    """(sum_t r_t * l_t, sum_t r_t) over rows with row_ok, r = position weights or 1."""
    r = row_ok.float()
    if position_weights is not None:
        r = r * position_weights.float()
    # `where` and not a product: a row that is masked must not turn a nan/inf into the sum.
    loss_sum = torch.where(r != 0, per_row * r, 0.0).sum()
    return loss_sum, r.sum()


class _SparseCE(torch.autograd.Function):
    """Per-row `l_t = T**2 * (W_t * lse_t - sum_i w_i z_i / T)`, `lse_t = logsumexp(z_t / T)`,
    `W_t = sum_i w_i`; gradient `T * g_t * (W_t * softmax(z_t / T) - w)`.

    Written by hand because autograd through `logsumexp` + `gather` holds three [N, V]
    tensors in backward (softmax, the scattered gather gradient, their sum); this holds
    one (the gradient itself, written in place) plus a chunk, and saves only `lse` [N].
    """

    @staticmethod
    def forward(ctx, logits: Tensor, idx: Tensor, w: Tensor, temperature: float, rows: int):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for a in range(0, n, rows):
            lse[a : a + rows] = torch.logsumexp(_scaled(logits[a : a + rows], temperature), 1)
        z_target = logits.gather(1, idx).float() / temperature  # [N, U]
        w_sum = w.sum(1)
        per_row = temperature**2 * (w_sum * lse - (w * z_target).sum(1))
        ctx.save_for_backward(logits, idx, w, lse, w_sum)
        ctx.temperature, ctx.rows = temperature, rows
        return per_row

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        logits, idx, w, lse, w_sum = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        coef = t * grad_rows.float()  # d(per_row)/dz = T * (W s - w)
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[0], rows):
            sl = slice(a, a + rows)
            # fp32: compute straight into the output; otherwise in an fp32 chunk, then cast.
            into_grad = logits.dtype == torch.float32
            g = torch.sub(_scaled(logits[sl], t), lse[sl, None], out=grad[sl] if into_grad else None)
            g.exp_().mul_((coef[sl] * w_sum[sl])[:, None])
            g.scatter_add_(1, idx[sl], -coef[sl, None] * w[sl])
            if not into_grad:
                grad[sl] = g
        return grad, None, None, None, None


def _sparse_rows(name, logits, ids, weights, temperature, self_normalize, chunk_rows):
    """Validate, then (per-row loss [N], row has a valid slot [N]) for the sparse losses."""
    if logits.dim() != 2:
        raise ValueError(f"{name}: student_logits must be [N, V], got {tuple(logits.shape)}")
    n, vocab = logits.shape
    _check_targets(name, n, ids, weights)
    _check_temperature(temperature)
    idx, w, row_ok = _targets(ids, weights, vocab, self_normalize)
    rows = _chunk_rows(vocab, chunk_rows)
    return _SparseCE.apply(logits, idx, w, float(temperature), rows), row_ok


def sparse_kd_per_position(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    temperature: float = 1.0,
    self_normalize: bool = False,
    chunk_rows: int | None = None,
) -> Tensor:
    """Per-position sparse KD loss, no reduction (for the learned selector and `sparse_kd`).

    Shapes: student_logits [N, V] (any float dtype), ids [N, U] int, weights [N, U] -> [N] fp32.

        l_t = - T**2 * sum_{i in S_t} p_hat_i * log softmax(z_t / T)_i

    `S_t` = the slots with `ids < V`; rows without one give 0. Differentiable w.r.t. the
    logits: `dl_t/dz_t = T * (softmax(z_t / T) * sum_i p_hat_i - p_hat)` (scattered over V);
    call it under `torch.no_grad()` when only observing.
    """
    return _sparse_rows("sparse_kd_per_position", student_logits, ids, weights,
                        temperature, self_normalize, chunk_rows)[0]


def sparse_kd(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    position_weights: Tensor | None = None,
    temperature: float = 1.0,
    self_normalize: bool = False,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sparse KD from cached teacher samples: full softmax over V at the given rows only.

    Shapes: student_logits [N, V] (the lm_head applied to the selected rows `h[sel]`),
    ids [N, U] int (slots with id >= V are padding), weights [N, U] (`p_hat`),
    position_weights [N] or None -> (loss_sum, count), 0-d fp32.

        L_t = - T**2 * sum_{i in S_t} p_hat_i * log softmax(z_t / T)_i
        loss_sum = sum_t r_t * L_t,    count = sum_t r_t   (module docstring)

    `p_hat` is unbiased (`E[p_hat_i] = p_i`, sum only close to 1), so `E[L_t]` is
    `T**2 * CE(p_t, softmax(z_t / T))` and the gradient `T * (s_t * sum(p_hat) - p_hat)`
    has the expectation `T * (s_t - p_t)` of full KD. `self_normalize=True` uses
    `p_hat / sum(p_hat)` instead: biased, lower variance. `L_t - T**2 * H_t` estimates
    `T**2 * KL(p_t || s_t)`; see `sparse_kl_estimate`.

    Memory: one [chunk_rows, V] fp32 buffer in forward (logsumexp, then a gather of the U
    target logits: never a full log_softmax); backward allocates only the [N, V] gradient.
    The logits must be finite (a masked row's nan would reach its gradient).
    """
    per_row, row_ok = _sparse_rows("sparse_kd", student_logits, ids, weights,
                                   temperature, self_normalize, chunk_rows)
    _check_rows("sparse_kd", per_row.shape[0], ("position_weights", position_weights, 1))
    return _reduce(per_row, row_ok, position_weights)


class _SparseCELinear(torch.autograd.Function):
    """`sum_t r_t l_t` of `_SparseCE` with the logits `h W^T + b` made chunk by chunk.

    The gradients are computed in forward, while each [rows, V] chunk of logits exists
    (as Liger-Kernel's fused linear cross-entropy does): three matmuls, as unfused, and
    neither the [N, V] logits nor their gradient ever exist. Backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, idx, w, r, temperature: float, rows: int, grads: bool):
        # `grads`: grad mode at the call (inside forward it is always off, and
        # needs_input_grad ignores no_grad): no gradient work for a no_grad call.
        t, grads = temperature, grads and any(ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if grads and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if grads and ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias) if grads and ctx.needs_input_grad[2] else None
        w_sum = w.sum(1)
        z = e = g = None
        for a in range(0, hidden.shape[0], rows):
            sl = slice(a, a + rows)
            # Drop the last chunk before making the next: otherwise two [rows, V] buffers
            # coexist while F.linear runs (measured: 446 instead of 371 MiB at V=151,936).
            z = e = g = None
            z = torch.nn.functional.linear(hidden[sl], weight, bias).float()
            if t != 1.0:
                z.div_(t)
            z_target = z.gather(1, idx[sl])
            # logsumexp by hand, in place: z becomes e = exp(z - max), which is also the
            # unnormalized softmax the gradient needs; the chunk is the only [rows, V] buffer.
            mx = z.amax(1, keepdim=True)
            e = z.sub_(mx).exp_()
            e_sum = e.sum(1)
            lse = mx.squeeze(1) + e_sum.log()
            per_row = t * t * (w_sum[sl] * lse - (w[sl] * z_target).sum(1))
            losses[sl] = per_row
            total += torch.where(r[sl] != 0, r[sl] * per_row, 0.0).sum()
            if not grads:
                continue
            coef = t * r[sl]  # d(r_t l_t)/dz_t = r_t T (W_t s_t - w_t), s_t = e / e_sum
            g = e.mul_((coef * w_sum[sl] / e_sum)[:, None])
            g = g.scatter_add_(1, idx[sl], -coef[:, None] * w[sl]).to(weight.dtype)
            if grad_h is not None:
                grad_h[sl] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.T, hidden[sl])
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(losses)
        return total, losses

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_losses: Tensor | None):
        grads, ctx.grads = ctx.grads, None  # drop our reference: autograd may then steal
        out = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        return (*out, None, None, None, None, None, None)


def sparse_kd_linear(
    hidden: Tensor,
    lm_weight: Tensor,
    ids: Tensor,
    weights: Tensor,
    position_weights: Tensor | None = None,
    temperature: float = 1.0,
    self_normalize: bool = False,
    lm_bias: Tensor | None = None,
    chunk_rows: int | None = None,
    return_per_position: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """`sparse_kd(hidden @ lm_weight.T + lm_bias, ...)` without the [N, V] logits.

    Shapes: hidden [N, H] (selected rows), lm_weight [V, H], lm_bias [V] or None,
    ids/weights [N, U], position_weights [N] or None -> (loss_sum, count), as `sparse_kd`:

        L_t = - T**2 * sum_{i in S_t} p_hat_i * log softmax((h_t W^T + b) / T)_i

    Same value and gradients as `sparse_kd` on `lm_head(h[sel])`, but peak memory is the
    [V, H] weight gradient plus one [chunk_rows, V] chunk (default: at least 128 rows, see
    `_FUSED_MIN_ROWS`; 2**23 elements when V is small): the [N, V] logits and their
    gradient never exist. Needs the full weight tensor (under ZeRO-3: gathered), as
    `sampled_softmax_kd` does. Gradients are computed during forward (when grad is
    enabled), so call backward once per call. `return_per_position=True` adds a third
    output: the per-row losses `L_t` [N] (no gradient; before position weights), what
    `sparse_kd_per_position` gives on the same rows.
    """
    n, vocab = _check_linear("sparse_kd_linear", hidden, lm_weight, lm_bias)
    _check_targets("sparse_kd_linear", n, ids, weights)
    _check_rows("sparse_kd_linear", n, ("position_weights", position_weights, 1))
    _check_temperature(temperature)
    idx, w, row_ok = _targets(ids, weights, vocab, self_normalize)
    r = row_ok.float() if position_weights is None else row_ok * position_weights.float()
    rows = chunk_rows if chunk_rows is not None else max(_FUSED_MIN_ROWS, _chunk_rows(vocab, None))
    rows = _chunk_rows(vocab, rows)
    total, per_row = _SparseCELinear.apply(hidden, lm_weight, lm_bias, idx, w, r, float(temperature),
                                           rows, torch.is_grad_enabled())
    return (total, r.sum(), per_row) if return_per_position else (total, r.sum())


def sparse_kl_estimate(
    loss_sum: Tensor,
    entropy: Tensor,
    ids: Tensor,
    vocab_size: int,
    position_weights: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """The logged KL: `sum_t r_t * (L_t - T**2 * H_t)`, 0-d fp32, detached.

    Shapes: loss_sum 0-d (from `sparse_kd` on the same rows), entropy [N] (the cache's
    teacher entropy `H_t`, nats), ids [N, U], position_weights [N] or None. Since
    `E[L_t] = T**2 * CE(p_t, s_t) = T**2 * (KL(p_t || s_t) + H_t)`, this is an unbiased
    estimate of `sum_t r_t * T**2 * KL(p_t || s_t)`; divide by the same `count`.
    """
    _check_rows("sparse_kl_estimate", ids.shape[0], ("entropy", entropy, 1))
    h_sum, _ = _reduce(entropy.float(), (ids < vocab_size).any(1), position_weights)
    return loss_sum.detach() - temperature**2 * h_sum


def _hard_targets(name: str, targets: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    """targets [N] -> ids [N, 1] with `ignore_index` mapped to the padding sentinel V."""
    if targets.dim() != 1:
        raise ValueError(f"{name}: targets must be [N], got shape {tuple(targets.shape)}")
    keep = targets != ignore_index
    bad = keep & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"{name}: target {int(targets[bad][0])} is outside [0, {vocab_size}) and is not "
            f"ignore_index={ignore_index}; fix the labels or the vocabulary size"
        )
    return torch.where(keep, targets, vocab_size)[:, None]


def ce(
    logits: Tensor,
    targets: Tensor,
    position_weights: Tensor | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy on hard labels, fp32 and chunked (it is `sparse_kd` with U = 1, p_hat = 1).

    Shapes: logits [N, V], targets [N] int (`ignore_index` rows are masked),
    position_weights [N] or None -> (loss_sum, count).

        L_t = - log softmax(z_t)_{y_t},   loss_sum = sum_t r_t L_t,   count = sum_t r_t
    """
    ids = _hard_targets("ce", targets, logits.shape[-1], ignore_index)
    return sparse_kd(logits, ids, torch.ones_like(ids, dtype=torch.float32),
                     position_weights, chunk_rows=chunk_rows)


class _DenseKL(torch.autograd.Function):
    """Per-row `T**2 * KL(p_t || s_t)` with `p = softmax(y / T_teacher)`, `s = softmax(z / T)`;
    gradient `T * g_t * (s_t - p_t)`. Saves two [N] log-partitions, recomputes the rest."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor, t: float, t_teacher: float, rows: int):
        n = z.shape[0]
        lse_s = torch.empty(n, dtype=torch.float32, device=z.device)
        lse_p = torch.empty_like(lse_s)
        per_row = torch.empty_like(lse_s)
        for a in range(0, n, rows):
            sl = slice(a, a + rows)
            xs, xp = _scaled(z[sl], t), _scaled(y[sl], t_teacher)
            lse_s[sl] = torch.logsumexp(xs, 1)
            lse_p[sl] = torch.logsumexp(xp, 1)
            # KL = sum_i p_i (xp_i - lse_p - xs_i + lse_s) = <p, xp - xs> - lse_p + lse_s
            p = torch.sub(xp, lse_p[sl, None]).exp_()
            per_row[sl] = torch.linalg.vecdot(p, xp - xs) - lse_p[sl] + lse_s[sl]
        ctx.save_for_backward(z, y, lse_s, lse_p)
        ctx.t, ctx.t_teacher, ctx.rows = t, t_teacher, rows
        return per_row * t**2

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        z, y, lse_s, lse_p = ctx.saved_tensors
        t, coef = ctx.t, ctx.t * grad_rows.float()
        grad = torch.empty_like(z)
        for a in range(0, z.shape[0], ctx.rows):
            sl = slice(a, a + ctx.rows)
            s = torch.sub(_scaled(z[sl], t), lse_s[sl, None]).exp_()
            p = torch.sub(_scaled(y[sl], ctx.t_teacher), lse_p[sl, None]).exp_()
            grad[sl] = s.sub_(p).mul_(coef[sl, None])
        return grad, None, None, None, None


def dense_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    position_weights: Tensor | None = None,
    teacher_temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Full-vocabulary KD: the reference, and the online-teacher baseline. KL form.

    Shapes: student_logits [N, V], teacher_logits [N, V] (a constant), position_weights [N]
    (float or bool mask) or None -> (loss_sum, count).

        p_t = softmax(y_t / T_teacher),   s_t = softmax(z_t / T)
        L_t = T**2 * KL(p_t || s_t) = T**2 * sum_i p_ti (log p_ti - log s_ti)
        loss_sum = sum_t r_t L_t,   count = sum_t r_t

    KL, not cross-entropy: it is 0 at the optimum and it is what `sparse_kl_estimate`
    estimates from the cache. The CE form is `L_t + T**2 * H(p_t)`; both have the gradient
    `T * (s_t - p_t)`. Chunked over positions: besides the [N, V] gradient only
    [chunk_rows, V] temporaries exist; backward recomputes the softmaxes.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"dense_kd: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must both be [N, V]"
        )
    _check_temperature(temperature)
    _check_temperature(teacher_temperature)
    n, vocab = student_logits.shape
    _check_rows("dense_kd", n, ("position_weights", position_weights, 1))
    per_row = _DenseKL.apply(student_logits, teacher_logits.detach(), float(temperature),
                             float(teacher_temperature), _chunk_rows(vocab, chunk_rows))
    row_ok = torch.ones(n, dtype=torch.bool, device=student_logits.device)
    return _reduce(per_row, row_ok, position_weights)
