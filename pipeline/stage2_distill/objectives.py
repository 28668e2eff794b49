"""The loss of one micro-batch, one small function per training mode (the table of modes,
`pipeline.stage2_distill.modes`, names each mode's function).

Each function takes the student's hidden states and the batch's targets (`StepInputs`),
the run's fixed loss settings (`LossSettings`) and returns `Terms`: the loss to
backpropagate, `kd_weight * KD + ce_weight * CE`, each term a global mean (its local sum
over its count summed over ranks: one all-reduce of two numbers, `StepInputs.sum_over_ranks`),
and the local sums and counts it came from (the trainer's metrics).

    no_kd            CE on every position; lm_head on all rows
    dense_kd         the online teacher's full distribution at every position (and CE)
    cached_kd        the cached classes at the selected rows (sampledkd, rskd_all) with
                     `--kd-loss` (`KD_LOSSES`), and the KL estimate from the cached entropy:
    sparse             `--kd-head fused` makes lm_head's logits chunk by chunk with their
                       gradients; with CE at other rows, ONE lm_head pass serves both
    sampled_softmax    the cached classes plus K exact classes and M sampled negatives per
                       row (`pipeline.stage2_distill.sampled_softmax`): no [n, V] logits
                       anywhere; its CE (if any) is the sampled CE on the same draws

Under ZeRO-3 lm_head's weight is partitioned outside its module's forward and backward; a
loss that reads the weight itself runs *as lm_head's forward* (`forward_replaced`), so
ZeRO-3's hooks gather it for the forward and again when the gradient arrives.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.stage2_distill import losses
from pipeline.stage2_distill.sampled_softmax import sampled_ce, sampled_softmax_kd


@dataclass(frozen=True)
class LossSettings:
    """What the loss functions need of the run's configuration and models."""

    vocab: int                          # the student's logits dimension (>= cache_vocab)
    cache_vocab: int
    kd_temperature: float = 1.0
    self_normalize: bool = False
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    ce_positions: str = "selected"      # selected | all | unselected
    kd_head: str = "fused"              # fused | logits
    teacher_temperature: float = 1.0
    num_negatives: int = 1024
    exact_ids: Tensor | None = None
    kd_loss: str = "sparse"             # sparse | sampled_softmax (KD_LOSSES), for cached_kd


@dataclass
class StepInputs:
    """One micro-batch as the losses see it: hidden [B, T, H], labels [B, T] (next tokens,
    -100 at the end), the selection mask [B, T] and, for the cached modes, the records."""

    h: Tensor
    labels: Tensor
    mask: Tensor
    ids: Tensor | None = None             # [B, T, U]
    weights: Tensor | None = None         # [B, T, U]
    position_weights: Tensor | None = None  # [B, T] a weighting selection's (`Selection.loss_weights`)
    input_ids: Tensor | None = None
    generator: torch.Generator | None = None
    kd_denominator: Tensor | None = None    # local KD count when not the rows' (`Selection.loss_denominator`)
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None  # a tensor summed over ranks (None: one process)
    entropy: Tensor | None = None         # [B, T] the cached teacher entropy (cached_kd's KL estimate)
    teacher_logits: Tensor | None = None  # [B*T, V] the online teacher's (`teacher_logits`; dense_kd)


@dataclass
class Terms:
    """One micro-batch's loss. `loss`: the scalar to backpropagate (global means, weighted).
    The local terms it came from: sums carry gradients, counts do not; `kl`: the local sum of
    the KL estimate (cached modes; 0 else). `per_position`: the KD loss of each selected row
    (for the learned selector)."""

    kd_sum: Tensor
    kd_cnt: Tensor
    ce_sum: Tensor
    ce_cnt: Tensor
    per_position: Tensor | None = None
    loss: Tensor | None = None    # set by every objective before it returns
    kl: Tensor = field(default_factory=lambda: torch.zeros(()))


def weighted_loss(kd_weight: float, ce_weight: float, kd, ce, kd_count: float = 1.0,
                  ce_count: float = 1.0):
    """`kd_weight * kd / kd_count + ce_weight * ce / ce_count`, each count floored at 1: the
    loss of every mode, of sums and their global counts (the objectives) or of means with
    counts 1 (the metrics' `loss`). Tensors or floats."""
    return kd_weight * kd / max(kd_count, 1.0) + ce_weight * ce / max(ce_count, 1.0)


def _finish(t: Terms, x: StepInputs, s: LossSettings) -> Terms:
    """`t` with its loss: each term's sum over its count summed over ranks (one all-reduce of
    the two counts; this process's counts when `x.sum_over_ranks` is None), weighted."""
    counts = torch.stack([t.kd_cnt, t.ce_cnt]).float()
    if x.sum_over_ranks is not None:
        counts = x.sum_over_ranks(counts)
    kd_count, ce_count = counts.tolist()
    t.loss = weighted_loss(s.kd_weight, s.ce_weight, t.kd_sum, t.ce_sum, kd_count, ce_count)
    return t


def _zero(h: Tensor) -> tuple[Tensor, Tensor]:
    z = h.sum() * 0.0                      # attached: every parameter gets a (zero) gradient
    return z, z.detach()


def head_params(head: torch.nn.Module) -> list[torch.nn.Parameter]:
    """lm_head's weight and, where it has one, its bias."""
    return [p for p in (head.weight, head.bias) if p is not None]


def head_logits(head: torch.nn.Module):
    """`rows -> lm_head(rows)` without the module's hooks, for no-grad student-side scores
    inside a gather: the logits KD and CE see, lm_head's bias included."""
    return lambda rows: F.linear(rows, head.weight, head.bias)


@contextmanager
def forward_replaced(module: torch.nn.Module, fn):
    """Calls of `module(...)` run `fn(...)` inside the module's hooks (ZeRO-3's gather and
    release), for the duration of the block. `fn` may use the module's parameters."""
    module.forward = fn                    # an instance attribute shadows the class method
    try:
        yield module
    finally:
        del module.forward


def no_kd(head, x: StepInputs, s: LossSettings) -> Terms:
    """CE on every row (the mode selects `all`); no KD term."""
    logits = head(x.h.reshape(-1, x.h.shape[-1]))
    return _finish(Terms(*_zero(x.h), *losses.ce(logits, x.labels.reshape(-1))), x, s)


@torch.no_grad()
def teacher_logits(teacher, input_ids: Tensor, s: LossSettings) -> Tensor:
    """The online teacher's [B*T, student V] logits over the cache's classes: the logits of
    the V tokenizer classes (padded ones dropped); a padded student's extra classes get
    p = 0 (-1e9: exp underflows to 0 for any sane T, where -inf gives 0 * -inf = NaN)."""
    t_logits = teacher(input_ids=input_ids).logits
    t_logits = t_logits.reshape(-1, t_logits.shape[-1])[:, :s.cache_vocab]
    if t_logits.shape[1] < s.vocab:
        t_logits = F.pad(t_logits, (0, s.vocab - t_logits.shape[1]), value=-1e9)
    return t_logits


def dense_kd(head, x: StepInputs, s: LossSettings) -> Terms:
    """Full KD against `x.teacher_logits` (`teacher_logits`) at the selected rows (every
    trainable position: the mode selects `all`) and CE there if weighted."""
    h, labels, m = x.h.reshape(-1, x.h.shape[-1]), x.labels.reshape(-1), x.mask.reshape(-1)
    t_logits = x.teacher_logits
    if not bool(m.all()):                    # a chat cache's masked positions: no row copy otherwise
        h, labels, t_logits = h[m], labels[m], t_logits[m]
    logits = head(h)
    # The teacher distribution is the one the cache holds: softmax(y / T_teacher).
    kd = losses.dense_kd(logits, t_logits, s.kd_temperature, teacher_temperature=s.teacher_temperature)
    ce = losses.ce(logits, labels) if s.ce_weight else _zero(x.h)
    return _finish(Terms(*kd, *ce), x, s)


def _kd_count(x: StepInputs, rows_count: Tensor) -> Tensor:
    """The KD term's local count: the selected rows' (weighted) count, or for `positional`
    the rule's expected count (the estimator divides by it, not by the weights it drew)."""
    return (x.kd_denominator if x.kd_denominator is not None else rows_count).detach().float()


def _kd_rows(x: StepInputs):
    m = x.mask
    pw = x.position_weights[m] if x.position_weights is not None else None
    return x.ids[m], x.weights[m], pw


def sparse(head, x: StepInputs, s: LossSettings) -> Terms:
    """Sparse KD on the cached classes at the selected rows (and CE where asked)."""
    ids, w, pw = _kd_rows(x)
    if (s.ce_weight and s.kd_head == "fused" and s.ce_positions == "unselected"
            and s.kd_temperature == 1.0 and not s.self_normalize and x.sum_over_ranks is not None):
        return _fused_ce_and_kd(head, x, s, ids, w, pw)
    m, ce = x.mask, _zero(x.h)
    if s.ce_weight == 0 and s.kd_head == "fused":
        def fused(rows):
            return losses.sparse_kd_linear(rows, head.weight, ids, w, pw, s.kd_temperature,
                                           s.self_normalize, lm_bias=head.bias,
                                           return_per_position=True)

        with forward_replaced(head, fused):
            kd_sum, cnt, per_pos = head(x.h[m])
        return _finish(Terms(kd_sum, _kd_count(x, cnt), *ce, per_position=per_pos), x, s)
    if s.ce_weight and s.ce_positions != "selected":
        # CE needs (nearly) every row's logits: run lm_head once and take the KD rows from
        # them, instead of a second lm_head pass over the selected rows.
        all_logits = head(x.h.reshape(-1, x.h.shape[-1]))                   # [B*T, V]
        flat = m.reshape(-1)
        ce_rows = None if s.ce_positions == "all" else ~flat                # no row copy
        ce = losses.ce(all_logits, x.labels.reshape(-1), position_weights=ce_rows)
        logits = all_logits[flat]                                           # [n, V]
    else:
        logits = head(x.h[m])                                               # [n, V]
        if s.ce_weight:
            ce = losses.ce(logits, x.labels[m])
    per_pos = losses.sparse_kd_per_position(logits, ids, w, s.kd_temperature, s.self_normalize)
    r = ((ids < s.vocab).any(1)).float() * (1.0 if pw is None else pw)
    return _finish(Terms((per_pos * r).sum(), _kd_count(x, r.sum()), *ce, per_position=per_pos.detach()),
                   x, s)


def sampled_softmax(head, x: StepInputs, s: LossSettings) -> Terms:
    """`sampled_softmax_kd` at the selected rows; CE (if weighted) with `sampled_ce` at
    `ce_positions`, on the same negatives. lm_head's weight is read at U + K + M rows."""
    ids, w, pw = _kd_rows(x)
    flat_h = x.h.reshape(-1, x.h.shape[-1])
    m = x.mask.reshape(-1)
    ce_rows = {"selected": m, "all": torch.ones_like(m), "unselected": ~m}[s.ce_positions]
    # The negatives are drawn once per call and shared by the KD and CE terms.
    gen_state = x.generator.get_state() if x.generator is not None else None

    def fn(rows):
        kd = sampled_softmax_kd(rows[m], head.weight, ids, w, s.num_negatives, x.generator, pw,
                                head.bias, s.kd_temperature, s.self_normalize, s.exact_ids,
                                return_per_position=True)
        if not s.ce_weight:
            return (*kd, *_zero(rows))
        if gen_state is not None:
            x.generator.set_state(gen_state)
        ce = sampled_ce(rows[ce_rows], head.weight, x.labels.reshape(-1)[ce_rows],
                        s.num_negatives, x.generator, lm_bias=head.bias, exact_ids=s.exact_ids)
        return (*kd, *ce)

    with forward_replaced(head, fn):
        kd_sum, kd_cnt, per_pos, ce_sum, ce_cnt = head(flat_h)
    return _finish(Terms(kd_sum, _kd_count(x, kd_cnt), ce_sum, ce_cnt.detach(), per_position=per_pos),
                   x, s)


def _fused_ce_and_kd(head, x: StepInputs, s: LossSettings, ids, w, pw) -> Terms:
    """CE at the unselected rows and sparse KD at the selected ones in ONE fused lm_head
    pass over every row, with no [rows, V] logits: a CE row is a sparse-KD row whose one
    target is its label with weight 1, so `sparse_kd_linear` computes both (at T = 1).
    Its gradients are made during the forward, so each row's weight in the final loss,
    `kd_weight * pw_t / global KD count` or `ce_weight / global CE count`, is needed up
    front: the two counts are summed over ranks first (one small all-reduce)."""
    m, labels = x.mask.reshape(-1), x.labels.reshape(-1)
    rows, u = m.numel(), ids.shape[1]
    kd_rows_ok = (ids < s.vocab).any(1)
    kd_r = kd_rows_ok.float() * (1.0 if pw is None else pw.float())
    ce_rows = ~m & (labels >= 0) & (labels < s.vocab)
    kd_cnt = _kd_count(x, kd_r.sum())
    local = torch.stack([kd_cnt, ce_rows.sum().float()])
    kd_g, ce_g = x.sum_over_ranks(local).clamp_min(1.0).tolist()
    all_ids = torch.full((rows, u), s.vocab, dtype=ids.dtype, device=ids.device)
    all_w = torch.zeros(rows, u, dtype=torch.float32, device=ids.device)
    all_ids[m], all_w[m] = ids, w.float()
    all_ids[ce_rows, 0], all_w[ce_rows, 0] = labels[ce_rows].to(ids.dtype), 1.0
    r = torch.zeros(rows, dtype=torch.float32, device=ids.device)
    r[m] = kd_r * (s.kd_weight / kd_g)
    r[ce_rows] = s.ce_weight / ce_g

    def fused(hidden):
        return losses.sparse_kd_linear(hidden, head.weight, all_ids, all_w, r, lm_bias=head.bias,
                                       return_per_position=True)

    with forward_replaced(head, fused):
        total, _, per_row = head(x.h.reshape(-1, x.h.shape[-1]))
    kd_per = per_row[m]
    # `total` is the loss already: its rows carry their weights over the global counts.
    return Terms((kd_per * kd_r).sum(), kd_cnt, per_row[ce_rows].sum(),
                 ce_rows.sum().float(), per_position=kd_per, loss=total)


KD_LOSSES = {"sparse": sparse, "sampled_softmax": sampled_softmax}   # --kd-loss


def cached_kd(head, x: StepInputs, s: LossSettings) -> Terms:
    """The cached modes' loss: `--kd-loss` (`KD_LOSSES`) on the cached classes at the selected
    rows, and `kl`, the KL estimate of those rows from the cached entropy
    (`losses.sparse_kl_estimate`)."""
    t = KD_LOSSES[s.kd_loss](head, x, s)
    ids, _, pw = _kd_rows(x)
    t.kl = losses.sparse_kl_estimate(t.kd_sum, x.entropy[x.mask], ids, s.vocab, pw, s.kd_temperature)
    return t
