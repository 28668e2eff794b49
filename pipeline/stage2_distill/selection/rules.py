"""Selection rules: (scores [B,T], valid [B,T], frac, context) -> which positions, with
which weights (`RULES`); the GLS FIFO; the communicator protocol the collective rules use.
`pipeline.stage2_distill.selection` (the `Selector`) calls them; the docstring there describes each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from pipeline.common.distributed import SingleComm
from pipeline.stage2_distill.selection.config import RULE_NAMES


class Communicator(Protocol):
    """What selection needs from the process group (`pipeline.common.distributed` provides one).

    `all_gather(t)` takes a tensor of the same shape and dtype on every rank and returns
    the list of all ranks' tensors, index = rank, on `t`'s device.
    """

    world_size: int
    rank: int

    def all_gather(self, tensor: Tensor) -> list[Tensor]: ...


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


def proportional_counts(counts: list[int], budget: int) -> list[int]:
    """`budget` draws split over ranks in proportion to their `counts` (largest remainder,
    ties to the lower rank), each at most its count: a pure function of its arguments, so
    every rank computes the same split."""
    total = sum(counts)
    if total <= budget:
        return list(counts)
    exact = [budget * c / total for c in counts]
    take = [min(c, math.floor(e)) for c, e in zip(counts, exact)]
    order = sorted(range(len(counts)), key=lambda r: (-(exact[r] - math.floor(exact[r])), r))
    left = budget - sum(take)
    for r in order:
        if left == 0:
            break
        if take[r] < counts[r]:
            take[r] += 1
            left -= 1
    return take


def gather_gls_sample(comm: Communicator, x: Tensor, capacity: int, budget: int,
                      generator: torch.Generator) -> Tensor:
    """The scores one GLS step pushes, identical on every rank (rank order).

    When this step's scores of all ranks fit in the FIFO (`sum n_r <= capacity`), all of
    them (exactly `all_gather_rows`). Otherwise a uniform sample of `budget` scores without
    replacement, stratified by rank in proportion to n_r (`proportional_counts`): rank r
    draws its share from its own scores with its own generator, so the gather carries
    `budget` scores (plus padding to the largest share) whatever the world size.
    docs/ESTIMATORS.md derives the selected fraction's expectation and spread.
    """
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    counts = [x.shape[0]] if comm.world_size == 1 else [int(c.item()) for c in comm.all_gather(n)]
    if sum(counts) > capacity:
        counts = proportional_counts(counts, budget)
        mine = counts[comm.rank]
        pick = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:mine]
        x = x[pick.sort().values.to(x.device)]
    if comm.world_size == 1:
        return x
    pad = x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))
    parts = comm.all_gather(torch.cat([x, pad]))
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class RuleOutput:
    mask: Tensor               # [B,T] bool
    weights: Tensor            # [B,T] float32
    threshold: float | None
    denominator: Tensor | None = None
    """[] what a weighted sum over `mask` stands for, for a rule whose `weights` are
    importance weights (positional: the valid positions); None: every weight is 1 and a
    sum over the mask is a sum over the selected positions."""


@dataclass(frozen=True)
class RuleContext:
    """What the stateful or random rules need beyond (scores, valid, frac)."""

    generator: torch.Generator
    band: tuple[float, float] = (0.0, 100.0)
    positional_alpha: float = 1.0
    positional_floor: float = 0.1
    gls: GLSQueue | None = None
    comm: Communicator = SingleComm()


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
    return RuleOutput(mask, w, None, denominator=valid.sum())


def all_rule(scores: Tensor, valid: Tensor, frac: float, ctx: RuleContext | None = None) -> RuleOutput:
    """Every valid position, weight 1 (RS-KD on every position)."""
    return RuleOutput(valid.clone(), valid.float(), None)


class GLSQueue:
    """Global-level selection state (Wang et al., ACL 2021): the FIFO of the last Q scores.

    Holds the same values in the same order on every rank (`gather_gls_sample`, rank order):
    every score of a step while a step's scores fit in the FIFO, else a uniform sample of
    `per_step` = ceil(Q / H) of them (H = `--gls-steps`), so the FIFO keeps the score
    distribution of about the last H steps at any world size.
    `warmup`: scores (all ranks) to see before the FIFO threshold replaces per-sequence top-k.
    """

    def __init__(self, capacity: int, warmup: int, device: torch.device | str = "cpu", steps: int = 8):
        self.capacity, self.warmup = capacity, warmup
        # scores pushed per step when a step's scores outnumber the FIFO (`gather_gls_sample`)
        self.per_step = math.ceil(capacity / steps)
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
    ctx.gls.push(gather_gls_sample(ctx.comm, scores[valid].float(), ctx.gls.capacity, ctx.gls.per_step,
                                   ctx.generator))
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
assert tuple(RULES) == RULE_NAMES, "registry out of sync with pipeline.stage2_distill.selection.config"
