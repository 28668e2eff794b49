"""Position selection (the Y axis): which positions of a micro-batch get a KD loss.

How the distillation loop uses it (every rank, every micro-batch, same order of calls):

    sel_cfg = SelectionConfig(...); sel_cfg.validate(has_targets=...)
    selector = Selector(sel_cfg, comm=comm, device=device, seed=seed)  # comm: `Communicator`
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
unbiased estimate of the all-positions sum; the number selected otherwise), `weighted`
(the rule's weights are importance weights: `positional`). A loss reads `loss_weights` and
`loss_denominator` (None for a rule that does not weight) and never the rule's name.

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

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from pipeline.common.distributed import SingleComm
from pipeline.stage2_distill.selection.config import (SCORE_NAMES, SIGNAL_NAMES, Curriculum,
                                                      SelectionConfig)
from pipeline.stage2_distill.selection.learned import LearnedSelector, make_features
from pipeline.stage2_distill.selection.rules import (RULES, Communicator, GLSQueue, RuleContext,
                                                     RuleOutput, all_gather_rows, k_per_row,
                                                     percentile_band_rule, positional_probs,
                                                     positional_rule, topk_rule)

__all__ = ["SelectionConfig", "Curriculum", "Selector", "Selection", "SelectionInputs",
           "Communicator", "SCORES", "RULES", "compute_scores",
           "compute_signals", "next_token_labels", "all_gather_rows", "RuleContext", "RuleOutput",
           "k_per_row", "topk_rule", "percentile_band_rule", "positional_rule", "positional_probs"]

SIGNALS = SIGNAL_NAMES
STUDENT_SIGNALS = frozenset({"student_entropy", "student_ce", "kl"})


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
    weighted: bool = False
    """True when `weights` are importance weights (positional): a loss weights its selected
    rows by them and divides by `denominator`, not by its own count of rows."""

    @property
    def loss_weights(self) -> Tensor | None:
        """[B,T] the per-position weights a loss applies; None when every weight is 1."""
        return self.weights if self.weighted else None

    @property
    def loss_denominator(self) -> Tensor | None:
        """[] what a loss's weighted sum divides by; None: the loss's own count of rows (the
        selected rows that have a target)."""
        return self.denominator if self.weighted else None


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


assert tuple(SCORES) == SCORE_NAMES, "registry out of sync with pipeline.stage2_distill.selection.config"


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
                 device: torch.device | str = "cpu", seed: int = 0):
        self.cfg, self.comm, self.device = cfg, comm or SingleComm(), torch.device(device)
        self.curriculum = Curriculum.parse(cfg.curriculum, cfg.select_frac)
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed(seed, self.comm.rank))
        warm = cfg.gls_queue if cfg.gls_warmup is None else cfg.gls_warmup
        self.gls = GLSQueue(cfg.gls_queue, warm, self.device, cfg.gls_steps) if cfg.select == "gls" else None
        self.learned = (LearnedSelector(cfg.learned_kind, cfg.resolved_explore(), seed, self.device)
                        if cfg.select == "learned" else None)
        self.signals = cfg.signals()

    @property
    def needs_student_logits(self) -> bool:
        """True when `select` runs the no-grad chunked lm_head pass (and needs hidden)."""
        return bool(self.signals & STUDENT_SIGNALS)

    def select(self, inputs: SelectionInputs, lm_head: Callable[[Tensor], Tensor] | None,
               step: int) -> Selection:
        cfg, valid = self.cfg, inputs.valid
        frac = self.curriculum(step)
        sig, vocab = _signals(self.signals, inputs, lm_head, cfg.select_chunk)
        features = None
        if cfg.select == "all":
            scores = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        elif cfg.select == "learned":
            features = make_features(sig["teacher_entropy"], sig["student_entropy"],
                                     sig["student_ce"], max(vocab, 2))
            scores = self.learned.scores(features, valid, frac, self.generator)
        else:
            scores = SCORES[cfg.select_score].fn(sig, valid, self.generator, cfg.combined_weights)
        ctx = RuleContext(self.generator, tuple(cfg.select_band), cfg.positional_alpha,
                          cfg.positional_floor, self.gls, self.comm)
        out = RULES[cfg.select](scores, valid, frac, ctx)
        weighted = out.denominator is not None
        denom = out.denominator if weighted else out.mask.sum()
        return Selection(out.mask, out.weights, out.threshold, torch.where(valid, scores, 0.0),
                         denom.float(), frac, features, weighted)

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
        return {"version": 1, "rule": self.cfg.select,
                "generator": self.generator.get_state(),
                "gls": self.gls.state_dict() if self.gls else None,
                "learned": self.learned.state_dict() if self.learned else None}

    def load_state_dict(self, sd: dict) -> None:
        if sd["version"] != 1 or sd["rule"] != self.cfg.select:
            raise ValueError(f"selection state (version {sd['version']}, rule {sd['rule']!r}) "
                             f"does not match --select {self.cfg.select!r}")
        self.generator.set_state(sd["generator"].cpu())
        if self.gls:
            self.gls.load_state_dict(sd["gls"])
        if self.learned:
            self.learned.load_state_dict(sd["learned"])
