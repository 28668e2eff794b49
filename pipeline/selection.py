"""Position selection (the Y axis): which positions of a micro-batch get a KD loss.

How the distillation loop uses it (every rank, every micro-batch, same order of calls):

    sel_cfg = SelectionConfig(...); sel_cfg.validate(has_targets=..., positions_per_step=B*T*world)
    selector = Selector(sel_cfg, comm=comm, device=device)      # comm: see `Communicator`
    h = model.model(input_ids).last_hidden_state                # [B,T,H], with grad
    inp = SelectionInputs(valid, hidden=h, labels=next_token_labels(input_ids),
                          teacher_entropy=entropy, ids=ids, weights=p_hat)
    sel = selector.select(inp, lm_head=head_fn, step=step)      # collective for gls; head_fn below
    rows = h[sel.mask]                                          # [n_sel,H], row-major order
    per_pos = sparse_kd_per_position(model.lm_head(rows), ids[sel.mask], p_hat[sel.mask])
    loss_sum = (per_pos * sel.weights[sel.mask]).sum();  count = sel.denominator
    selector.observe(sel, per_pos.detach())                     # collective for learned
    ... checkpoint: selector.state_dict() / selector.load_state_dict(sd), PER RANK: the GLS
    FIFO and the learned model are identical on every rank, the RNG state is not.

All `SelectionInputs` tensors live on `device`. Under ZeRO-3 do not pass the `lm_head`
module itself: its forward hooks all-gather the weight on every call, and ranks with
different numbers of valid rows make different numbers of chunked calls (a hang). Gather
once and pass a plain function instead (without ZeRO-3, `head_fn = model.lm_head`):
    with deepspeed.zero.GatheredParameters([lm_head.weight]):
        sel = selector.select(inp, lambda x: F.linear(x, lm_head.weight), step)
Cost: student-side scores add one no-grad lm_head forward over ALL valid rows (4x the rows
the loss uses at frac 0.25); teacher_entropy / random scores cost no lm_head call at all.

`Selection`: `mask [B,T]` bool (never a padded position), `weights [B,T]` float32 (0 off
the mask; 1 except for `positional`), `threshold` (gls: the global threshold, identical on
every rank; else None), `scores [B,T]`, `denominator` (what the weighted sum estimates
the total over: the number of valid positions for `positional`, whose weighted sum is an
unbiased estimate of the all-positions sum; the number selected otherwise).

Scores (`SCORES`), higher = more worth distilling; student-side ones come from one no-grad
pass of `lm_head` over the valid positions, `chunk_size` rows at a time, never `[B,T,V]`:
- `teacher_entropy`: the cached entropy (free).  `random`: U[0,1) (per-rank stream).
- `student_entropy`: `H(s_t) = lse(z) - sum_v s_v z_v`.
- `student_ce`: `lse(z) - z[label]` against the next token; a valid position with no label
  (the window's last one) gets the student's expected CE under itself, `H(s_t)`.
- `kl`: `L_t - H_t` with `L_t = -sum_{i in S_t} p_hat_i log s_t(i)` and `H_t` the cached
  exact entropy. Unbiased for `KL(p_t || s_t)` since `E[L_t] = CE(p_t, s_t)` (may be < 0 on
  one draw). The other form, `sum p_hat (log p_hat - log s)`, is biased (log of an
  estimate) and is not used.
- `combined`: `sum_j w_j z_j` over (teacher_entropy, student_entropy, student_ce, kl),
  each z-scored per sequence over its valid positions; `--combined-weights`.
Rules (`RULES`): `topk`, `percentile_band`, `gls`, `positional`, `learned`, `all`; see each
function. `learned` ranks by `selection_learned.LearnedSelector` predictions instead of
`--select-score`. The fraction follows `--curriculum` (`Curriculum`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.selection_config import (RULE_NAMES, SCORE_NAMES, SIGNAL_NAMES, Curriculum,
                                       SelectionConfig)
from pipeline.selection_learned import LearnedSelector, make_features

__all__ = ["SelectionConfig", "Curriculum", "Selector", "Selection", "SelectionInputs",
           "Communicator", "SingleProcess", "SCORES", "RULES", "compute_scores",
           "compute_signals", "next_token_labels", "all_gather_rows"]

SIGNALS = SIGNAL_NAMES
STUDENT_SIGNALS = frozenset({"student_entropy", "student_ce", "kl"})


class Communicator(Protocol):
    """What selection needs from the process group (`pipeline.distributed` provides one).

    `all_gather(t)` takes a tensor of the same shape and dtype on every rank and returns
    the list of all ranks' tensors, index = rank, on `t`'s device.
    """

    world_size: int
    rank: int

    def all_gather(self, tensor: Tensor) -> list[Tensor]: ...


class SingleProcess:
    """The default communicator: one rank."""

    world_size = 1
    rank = 0

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]


def all_gather_rows(comm: Communicator, x: Tensor) -> Tensor:
    """`x [n_r, ...]` on each rank -> `[sum_r n_r, ...]`, rank order, identical everywhere.

    Ranks hold different n_r: gather the counts, pad every rank to the largest, gather,
    cut each rank's padding off (two small collectives).
    """
    if comm.world_size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    counts = [int(c.item()) for c in comm.all_gather(n)]
    pad = x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))
    parts = comm.all_gather(torch.cat([x, pad]))
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@dataclass(frozen=True)
class SelectionInputs:
    """One micro-batch as selection sees it. Optional fields may be None if unused."""

    valid: Tensor
    """[B,T] bool: the position has a target (padding false)."""
    hidden: Tensor | None = None
    """[B,T,H] the student's final hidden states (may carry grad; read under no_grad)."""
    labels: Tensor | None = None
    """[B,T] int64 next token per position, < 0 where there is none (`next_token_labels`)."""
    teacher_entropy: Tensor | None = None
    """[B,T] float32 cached teacher entropy (nats)."""
    ids: Tensor | None = None
    """[B,T,U] int cached class ids; >= V (the sentinel) marks an unused slot."""
    weights: Tensor | None = None
    """[B,T,U] float32 unbiased target weights p_hat."""


@dataclass(frozen=True)
class Selection:
    mask: Tensor          # [B,T] bool, subset of valid
    weights: Tensor       # [B,T] float32, 0 where not selected
    threshold: float | None
    scores: Tensor        # [B,T] float32 (0 at invalid positions)
    denominator: Tensor   # [] float32: positions the weighted sum stands for
    frac: float           # the fraction in force at this step
    features: Tensor | None = None  # [B,T,F] learned-selector features, else None


def next_token_labels(input_ids: Tensor, ignore: int = -100) -> Tensor:
    """`[B,T]` -> `[B,T]` labels: `input_ids[:, t+1]`, `ignore` at the last position."""
    labels = torch.full_like(input_ids, ignore, dtype=torch.int64)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


# ---------------------------------------------------------------------------- scores
def compute_signals(names: frozenset[str] | set[str], inputs: SelectionInputs,
                    lm_head: Callable[[Tensor], Tensor] | None, chunk_size: int) -> dict[str, Tensor]:
    """The requested per-position signals, each `[B,T]` float32 (0 at invalid positions).

    Student-side signals come from ONE pass of `lm_head` over the valid rows, `chunk_size`
    rows at a time; every signal needed is derived from the same `[chunk, V]` logits.
    """
    return _signals(names, inputs, lm_head, chunk_size)[0]


@torch.no_grad()
def _signals(names: frozenset[str] | set[str], inputs: SelectionInputs,
             lm_head: Callable[[Tensor], Tensor] | None, chunk_size: int) -> tuple[dict[str, Tensor], int]:
    """`compute_signals` plus V, the lm_head's output width (0 if it was not run)."""
    valid = inputs.valid
    vocab = 0
    out: dict[str, Tensor] = {}
    if "teacher_entropy" in names or "kl" in names:
        if inputs.teacher_entropy is None:
            raise ValueError("score needs the cached teacher entropy, but inputs have none")
        if "teacher_entropy" in names:
            out["teacher_entropy"] = torch.where(valid, inputs.teacher_entropy.float(), 0.0)
    need = STUDENT_SIGNALS & set(names)
    if not need:
        return out, vocab
    if inputs.hidden is None or lm_head is None:
        raise ValueError(f"scores {sorted(need)} need the student's hidden states and lm_head")
    if "student_ce" in need and inputs.labels is None:
        raise ValueError("score student_ce needs labels (next_token_labels(input_ids))")
    if "kl" in need and (inputs.ids is None or inputs.weights is None):
        raise ValueError("score kl needs the cached targets (ids, weights)")
    rows = inputs.hidden.detach()[valid]                          # [N,H]
    flat = {k: [] for k in need}
    labels = inputs.labels[valid] if "student_ce" in need else None
    if "kl" in need:                                              # gathered once, sliced per chunk
        ids_v, w_v = inputs.ids[valid].long(), inputs.weights[valid].float()
        ent_v = inputs.teacher_entropy[valid].float()
    for s in range(0, rows.shape[0], chunk_size):
        z = lm_head(rows[s:s + chunk_size]).float()               # [c,V]
        vocab = z.shape[-1]
        # One exp pass serves both: e = exp(z - max), lse = max + log sum e,
        # H(s) = lse - E_s[z] = lse - sum(e z) / sum(e)   (e <= 1: no overflow)
        m = z.amax(dim=-1, keepdim=True)
        e = (z - m).exp_()                                        # [c,V], the one temporary
        se = e.sum(-1)
        lse = m.squeeze(-1) + se.log()                            # [c]
        ent = None
        if "student_entropy" in need or (labels is not None and (labels[s:s + chunk_size] < 0).any()):
            ent = lse - e.mul_(z).sum(-1) / se
        del e
        if "student_entropy" in need:
            flat["student_entropy"].append(ent)
        if labels is not None:
            lab = labels[s:s + chunk_size]
            ce = lse - z.gather(1, lab.clamp_min(0)[:, None]).squeeze(1)
            flat["student_ce"].append(torch.where(lab >= 0, ce, ent) if ent is not None else ce)
        if "kl" in need:
            ids = ids_v[s:s + chunk_size]                         # [c,U]
            used = ids < z.shape[-1]                              # sentinel slots drop out
            logs = z.gather(1, torch.where(used, ids, 0)) - lse[:, None]
            w = torch.where(used, w_v[s:s + chunk_size], 0.0)
            flat["kl"].append(-(w * logs).sum(-1) - ent_v[s:s + chunk_size])
    for k, parts in flat.items():
        full = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        if parts:
            full[valid] = torch.cat(parts)
        out[k] = full
    return out, vocab


def zscore_rows(x: Tensor, valid: Tensor) -> Tensor:
    """Per-row `(x - mean) / (std + 1e-6)` over the valid entries; 0 elsewhere."""
    n = valid.sum(1, keepdim=True).clamp_min(1)
    xv = torch.where(valid, x, 0.0)
    mean = xv.sum(1, keepdim=True) / n
    var = (torch.where(valid, x - mean, 0.0) ** 2).sum(1, keepdim=True) / n
    return torch.where(valid, (x - mean) / (var.sqrt() + 1e-6), 0.0)


def _combined(sig: dict[str, Tensor], valid: Tensor, w: tuple[float, ...]) -> Tensor:
    out = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    for name, wj in zip(SIGNALS, w):
        if wj:
            out += wj * zscore_rows(sig[name], valid)
    return out


@dataclass(frozen=True)
class ScoreSpec:
    signals: Callable[[tuple[float, ...]], frozenset[str]]
    """combined weights -> the signals this score needs."""
    fn: Callable[[dict[str, Tensor], Tensor, torch.Generator, tuple[float, ...]], Tensor]
    """(signals, valid, generator, combined weights) -> scores [B,T]."""
    nonnegative: bool
    """Scores are >= 0 up to estimator noise (positional's q_t needs it)."""


SCORES: dict[str, ScoreSpec] = {
    **{n: ScoreSpec(lambda w, n=n: frozenset({n}), lambda s, v, g, w, n=n: s[n], True)
       for n in SIGNALS},
    "combined": ScoreSpec(lambda w: frozenset(n for n, wj in zip(SIGNALS, w) if wj),
                          lambda s, v, g, w: _combined(s, v, w), False),
    "random": ScoreSpec(lambda w: frozenset(),
                        lambda s, v, g, w: torch.where(
                            v, torch.rand(v.shape, generator=g, device=v.device), 0.0), True),
}


def compute_scores(name: str, inputs: SelectionInputs, lm_head: Callable[[Tensor], Tensor] | None,
                   chunk_size: int, generator: torch.Generator,
                   combined_weights: tuple[float, float, float, float] = (0.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Scores `[B,T]` float32 of score source `name` (0 at invalid positions)."""
    spec = SCORES[name]
    sig = compute_signals(spec.signals(combined_weights), inputs, lm_head, chunk_size)
    return spec.fn(sig, inputs.valid, generator, combined_weights)


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class RuleOutput:
    mask: Tensor               # [B,T] bool
    weights: Tensor            # [B,T] float32
    threshold: float | None


@dataclass(frozen=True)
class RuleContext:
    """What the stateful or random rules need beyond (scores, valid, frac)."""

    generator: torch.Generator
    band: tuple[float, float] = (0.0, 100.0)
    positional_alpha: float = 1.0
    positional_floor: float = 0.1
    gls: GLSQueue | None = None
    comm: Communicator = SingleProcess()


def k_per_row(valid: Tensor, frac: float) -> Tensor:
    """`[B]` int64: `ceil(frac * n_valid)`, with 1e-9 slack so 0.1*30 gives 3, not 4."""
    n = valid.sum(1).double()
    return torch.minimum(torch.ceil(n * frac - 1e-9).clamp_min(1), n).long()


def _rank_desc(keys: Tensor, valid: Tensor) -> Tensor:
    """`[B,T]` rank of each position in its row by descending key, valid ones first."""
    k = torch.nan_to_num(keys.double(), nan=-1e300, posinf=1e300, neginf=-1e300)
    k = torch.where(valid, k, -math.inf)
    order = torch.argsort(k, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k.shape[1], device=k.device).expand_as(order))
    return rank


def topk_rule(scores: Tensor, valid: Tensor, frac: float, ctx: RuleContext | None = None) -> RuleOutput:
    """Per sequence, exactly `ceil(frac * n_valid)` highest-score valid positions (ties: earlier)."""
    mask = (_rank_desc(scores, valid) < k_per_row(valid, frac)[:, None]) & valid
    return RuleOutput(mask, mask.float(), None)


def row_quantile(scores: Tensor, valid: Tensor, q: float) -> Tensor:
    """`[B]` float64 per-row quantile (numpy 'linear') over the valid entries."""
    s = torch.sort(torch.where(valid, scores.double(), math.inf), dim=1).values
    n = valid.sum(1)
    pos = (n - 1).clamp_min(0).double() * q
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp_min(0))
    g = pos - lo.double()
    a, b = s.gather(1, lo[:, None]).squeeze(1), s.gather(1, hi[:, None]).squeeze(1)
    return torch.where(g >= 0.5, b - (b - a) * (1 - g), a + (b - a) * g)


def percentile_band_rule(scores: Tensor, valid: Tensor, frac: float, ctx: RuleContext) -> RuleOutput:
    """Keep positions whose score lies in [q_lo, q_hi], the per-sequence percentiles
    `--select-band LO HI` (0..100) of the valid scores. Keeps about (HI-LO)% (frac unused)."""
    lo, hi = ctx.band
    s = scores.double()
    mask = (valid & (s >= row_quantile(scores, valid, lo / 100)[:, None])
            & (s <= row_quantile(scores, valid, hi / 100)[:, None]))
    return RuleOutput(mask, mask.float(), None)


def positional_probs(scores: Tensor, valid: Tensor, k: Tensor, alpha: float,
                     floor: float) -> tuple[Tensor, Tensor]:
    """Inclusion probabilities of `positional`: `(pi [B,T], q [B,T])`, float64, 0 off `valid`.

    `q0_t = max(score_t, 0)**alpha` (alpha = 0: uniform), `m = mean_t q0_t` over the row's
    valid positions, `q_t = max(q0_t, floor * m)` (a row whose q0 are all 0: uniform), and
    `pi_t = min(1, q_t / tau)` with `tau` the solution of `sum_t min(1, q_t / tau) = K`:
    sort q descending, cap the j largest at 1 for the smallest j in [0, K) with
    `q_(j+1) * (K - j) <= sum_{i > j} q_(i)`, then `tau = sum_{i > j} q_(i) / (K - j)`
    (j = K-1 always qualifies, and the smallest qualifying j has `q_(j) > tau`).
    """
    s = torch.nan_to_num(scores.double(), nan=0.0).clamp_min(0.0)
    q0 = torch.where(valid, s ** alpha, 0.0)                       # 0**0 = 1: alpha 0 is uniform
    n = valid.sum(1)
    mean = q0.sum(1) / n.clamp_min(1)
    q = torch.where(valid, torch.maximum(q0, (floor * mean)[:, None]), 0.0)
    q = torch.where((mean > 0)[:, None], q, valid.double())
    qs = torch.sort(q, dim=1, descending=True).values              # invalid (0) last
    tail = qs.flip(1).cumsum(1).flip(1)                            # tail[:, j] = sum_{i >= j} qs[:, i]
    j = torch.arange(q.shape[1], device=q.device)
    kk = k[:, None]
    ok = (j < kk) & (qs * (kk - j) <= tail)
    j0 = ok.int().argmax(1)                                        # first qualifying j
    tau = tail.gather(1, j0[:, None]).squeeze(1) / (k - j0).clamp_min(1)
    pi = torch.where(valid & (k > 0)[:, None], (q / tau.clamp_min(1e-300)[:, None]).clamp_max(1.0), 0.0)
    return pi, q


def positional_rule(scores: Tensor, valid: Tensor, frac: float, ctx: RuleContext) -> RuleOutput:
    """Importance-sample exactly K = ceil(frac*n) positions per sequence; weight 1/pi_t.

    Inclusion probabilities (`positional_probs`): `q_t = max(score_t**alpha, floor * mean_t
    score**alpha)` with `floor` = `--positional-floor` (default 0.1), `pi_t = min(1,
    q_t/tau)`, `sum_t pi_t = K`. Sampling: the positions with `pi_t = 1` are kept; the others
    are put in a random order and systematic sampling keeps those whose interval
    `[C_{t-1}, C_t)` of the running sum of pi contains one of the points `u, u+1, ...`,
    `u ~ U[0,1)`: exactly K in all, each with probability exactly `pi_t`. Weight
    `w_t = 1/pi_t = max(1, tau/q_t)` (Horvitz-Thompson): `sum_{t in S} w_t x_t` is unbiased
    for `sum_t x_t` for any x, with or without the floor (sampling and weights use the
    same floored q; the floor moves variance, never the mean). Divide by n_valid, not K.

    Bound: `q_t >= f = floor * m` (m = mean of q0) and `Q = sum_t q_t <= n m (1 + floor)`;
    `K = sum_t min(1, q_t/tau) <= Q/tau` gives `tau <= Q/K`, so
        `w_t <= max(1, Q / (K f)) <= n (1 + floor) / (K floor) <= (1 + floor) / (floor * frac)`
    (44 at the default floor 0.1 and frac 0.25; 404 at floor 0.01). The former rule (priority
    sampling over `max(score, 1e-6)`, whose tau is random as well) gave an entropy byte of 0
    weights of ~1e5-1e6: unbiased only through rare spikes (BENCHMARKS.md, "Positional
    weights"). Scale-free in the scores (multiplying them changes nothing).
    """
    k = k_per_row(valid, frac)
    pi, _ = positional_probs(scores, valid, k, ctx.positional_alpha, ctx.positional_floor)
    capped = valid & (pi >= 1.0)
    unc = valid & ~capped
    m = (k - capped.sum(1)).clamp_min(0).double()                 # draws left for the others
    # Uncapped positions first, in a random order; systematic sampling along their pi.
    keys = torch.rand(scores.shape, generator=ctx.generator, device=scores.device, dtype=torch.float64)
    order = torch.argsort(torch.where(unc, keys, 2.0), dim=1)
    p = torch.where(unc, pi, 0.0).gather(1, order)
    c = p.cumsum(1)
    total = c[:, -1:]
    c = c * torch.where(total > 0, m[:, None] / total.clamp_min(1e-300), 0.0)
    last = torch.arange(c.shape[1], device=c.device) >= (unc.sum(1, keepdim=True) - 1)
    c = torch.where(last, m[:, None], torch.minimum(c, m[:, None]))   # ends exactly at m
    c_prev = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], 1)
    u = torch.rand((scores.shape[0], 1), generator=ctx.generator, device=scores.device,
                   dtype=torch.float64)                            # [0, 1)
    hit = (torch.floor(c - u) > torch.floor(c_prev - u)) & (p > 0)
    mask = capped | torch.zeros_like(unc).scatter(1, order, hit)
    w = torch.where(mask, 1.0 / pi.clamp_min(1e-300), 0.0).float()
    return RuleOutput(mask, w, None)


def all_rule(scores: Tensor, valid: Tensor, frac: float, ctx: RuleContext | None = None) -> RuleOutput:
    """Every valid position, weight 1 (RS-KD on every position)."""
    return RuleOutput(valid.clone(), valid.float(), None)


class GLSQueue:
    """Global-level selection state (Wang et al., ACL 2021): the FIFO of the last Q scores.

    Holds the same values in the same order on every rank (`all_gather_rows` in rank order).
    `warmup`: scores (all ranks) to see before the FIFO threshold replaces per-sequence top-k.
    """

    def __init__(self, capacity: int, warmup: int, device: torch.device | str = "cpu"):
        self.capacity, self.warmup = capacity, warmup
        self.buf = torch.empty(0, dtype=torch.float32, device=device)  # oldest -> newest
        self.seen = 0

    def push(self, values: Tensor) -> None:
        self.buf = torch.cat([self.buf, values.float().to(self.buf.device)])[-self.capacity:]
        self.seen += int(values.shape[0])

    def quantile(self, q: float) -> float:
        """numpy 'linear' quantile of the FIFO, computed in float64 on the host."""
        s = torch.sort(self.buf).values
        pos = (s.shape[0] - 1) * q
        lo = math.floor(pos)
        g = pos - lo
        a, b = float(s[lo].item()), float(s[min(lo + 1, s.shape[0] - 1)].item())
        return b - (b - a) * (1 - g) if g >= 0.5 else a + (b - a) * g

    def state_dict(self) -> dict:
        return {"buf": self.buf.cpu().clone(), "seen": self.seen, "capacity": self.capacity}

    def load_state_dict(self, sd: dict) -> None:
        if sd["buf"].shape[0] > self.capacity:
            raise ValueError(f"checkpoint GLS FIFO holds {sd['buf'].shape[0]} scores, "
                             f"more than --gls-queue {self.capacity}")
        self.buf = sd["buf"].to(self.buf.device, torch.float32).clone()
        self.seen = int(sd["seen"])


def gls_rule(scores: Tensor, valid: Tensor, frac: float, ctx: RuleContext) -> RuleOutput:
    """Global threshold: all-gather this step's valid scores, push them (rank order), keep
    positions with `score > thr`, `thr = quantile_{1-frac}(FIFO)`, and each position with
    `score == thr` with probability `p = (frac * |FIFO| - #{FIFO > thr}) / #{FIFO == thr}`
    (clipped to [0, 1]), so the kept fraction of the FIFO's distribution is `frac` even when
    many scores tie at the threshold: cached entropies are bytes (256 levels), and a rule
    keeping every tie selected 100% of a cache whose positions shared one level. Before
    `warmup` scores: per-sequence top-k, threshold None. Collective: every rank calls it
    every step; the threshold is identical on all ranks, the tie draws are per rank."""
    assert ctx.gls is not None, "gls rule needs a GLSQueue in the context"
    ctx.gls.push(all_gather_rows(ctx.comm, scores[valid].float()))
    if ctx.gls.seen < ctx.gls.warmup or ctx.gls.buf.numel() == 0:
        return topk_rule(scores, valid, frac)
    thr = ctx.gls.quantile(1.0 - frac)
    s, fifo = scores.double(), ctx.gls.buf.double()
    mask = valid & (s > thr)
    tie = valid & (s == thr)
    if bool(tie.any()):
        tied = int((fifo == thr).sum())
        p = min(1.0, max(0.0, (frac * fifo.numel() - int((fifo > thr).sum())) / max(tied, 1)))
        if p >= 1.0:
            mask |= tie
        elif p > 0.0:
            u = torch.rand(s.shape, generator=ctx.generator, device=s.device, dtype=torch.float64)
            mask |= tie & (u < p)
    return RuleOutput(mask, mask.float(), thr)


RuleFn = Callable[[Tensor, Tensor, float, RuleContext], RuleOutput]
RULES: dict[str, RuleFn] = {
    "topk": topk_rule,
    "percentile_band": percentile_band_rule,
    "gls": gls_rule,
    "positional": positional_rule,
    "learned": topk_rule,   # the Selector swaps in the learned selector's scores
    "all": all_rule,
}
assert tuple(RULES) == RULE_NAMES and tuple(SCORES) == SCORE_NAMES, "registries out of sync with config"


# -------------------------------------------------------------------------- selector
def rank_seed(seed: int, rank: int) -> int:
    """A well-mixed 63-bit seed for rank `rank`'s own random stream."""
    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, np.uint64)[0] >> 1)


class Selector:
    """Stateful front end: config -> scores -> rule -> `Selection`. One per rank.

    Collective calls (every rank, same steps): `select` when the rule is `gls`,
    `observe` when it is `learned`. Randomness: a per-rank generator seeded from
    (seed, rank) for `random` scores, positional draws and exploration.
    """

    def __init__(self, cfg: SelectionConfig, comm: Communicator | None = None,
                 device: torch.device | str = "cpu"):
        self.cfg, self.comm, self.device = cfg, comm or SingleProcess(), torch.device(device)
        self.curriculum = Curriculum.parse(cfg.curriculum, cfg.frac)
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed(cfg.seed, self.comm.rank))
        warm = cfg.gls_queue if cfg.gls_warmup is None else cfg.gls_warmup
        self.gls = GLSQueue(cfg.gls_queue, warm, self.device) if cfg.rule == "gls" else None
        self.learned = (LearnedSelector(cfg.learned_kind, cfg.resolved_explore(), cfg.seed, self.device)
                        if cfg.rule == "learned" else None)
        self.signals = cfg.signals()

    @property
    def needs_student_logits(self) -> bool:
        """True when `select` runs the no-grad chunked lm_head pass (and needs hidden)."""
        return bool(self.signals & STUDENT_SIGNALS)

    def select(self, inputs: SelectionInputs, lm_head: Callable[[Tensor], Tensor] | None,
               step: int) -> Selection:
        cfg, valid = self.cfg, inputs.valid
        frac = self.curriculum(step)
        sig, vocab = _signals(self.signals, inputs, lm_head, cfg.chunk_size)
        features = None
        if cfg.rule == "all":
            scores = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        elif cfg.rule == "learned":
            features = make_features(sig["teacher_entropy"], sig["student_entropy"],
                                     sig["student_ce"], max(vocab, 2))
            scores = self.learned.scores(features, valid, frac, self.generator)
        else:
            scores = SCORES[cfg.score].fn(sig, valid, self.generator, cfg.combined_weights)
        ctx = RuleContext(self.generator, (cfg.band_lo, cfg.band_hi), cfg.positional_alpha,
                          cfg.positional_floor, self.gls, self.comm)
        out = RULES[cfg.rule](scores, valid, frac, ctx)
        denom = valid.sum() if cfg.rule == "positional" else out.mask.sum()
        return Selection(out.mask, out.weights, out.threshold, torch.where(valid, scores, 0.0),
                         denom.float(), frac, features)

    def observe(self, selection: Selection, losses: Tensor) -> None:
        """Per-position KD losses `[n_sel]` at `selection.mask` (row-major, i.e. the order
        of `h[selection.mask]`), detached. Trains the learned selector (collective); a no-op
        for the other rules."""
        if self.learned is None:
            return
        n = int(selection.mask.sum())
        if losses.shape != (n,):
            raise ValueError(f"observe: losses has shape {tuple(losses.shape)}, expected ({n},) "
                             "= one loss per selected position in h[selection.mask] order")
        self.learned.observe(selection.features[selection.mask], losses,
                             lambda x: all_gather_rows(self.comm, x.to(self.device)))

    def state_dict(self) -> dict:
        """FIFO, learned-selector parameters and this rank's RNG state (tensors/ints only)."""
        return {"version": 1, "rule": self.cfg.rule,
                "generator": self.generator.get_state(),
                "gls": self.gls.state_dict() if self.gls else None,
                "learned": self.learned.state_dict() if self.learned else None}

    def load_state_dict(self, sd: dict) -> None:
        if sd["version"] != 1 or sd["rule"] != self.cfg.rule:
            raise ValueError(f"selection state (version {sd['version']}, rule {sd['rule']!r}) "
                             f"does not match --select {self.cfg.rule!r}")
        self.generator.set_state(sd["generator"].cpu())
        if self.gls:
            self.gls.load_state_dict(sd["gls"])
        if self.learned:
            self.learned.load_state_dict(sd["learned"])
