"""Configuration of position selection: `SelectionConfig`, its CLI flags, `Curriculum`.

Imports nothing of ours; `pipeline.selection` re-exports both classes. Flags:

    --select RULE  --select-score SCORE  --select-frac F  --select-band LO HI
    --gls-queue Q  --gls-warmup N  --positional-alpha A  --positional-floor F  --learned-kind KIND
    --learned-explore E  --curriculum SPEC  --combined-weights WT WS WC WK
    --select-chunk ROWS  --select-seed S
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

RULE_NAMES = ("topk", "percentile_band", "gls", "positional", "learned", "all")
SCORE_NAMES = ("teacher_entropy", "student_entropy", "student_ce", "kl", "combined", "random")
SIGNAL_NAMES = ("teacher_entropy", "student_entropy", "student_ce", "kl")
LEARNED_KINDS = ("linucb", "mlp")
LEARNED_DEFAULT_EXPLORE = {"linucb": 1.0, "mlp": 0.1}
CURRICULUM_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Curriculum:
    """The selected fraction as a function of the optimizer step.

    Spec strings: `constant` (always `--select-frac`); `linear:A:B:N` (A at step 0 to B at
    step N, straight line, B afterwards); `cosine:A:B:N` (`B + (A-B)(1+cos(pi s/N))/2`).
    """

    kind: str
    start: float
    end: float
    steps: int

    @staticmethod
    def parse(spec: str, frac: float) -> Curriculum:
        parts = spec.split(":")
        if parts[0] == "constant" and len(parts) == 1:
            return Curriculum("constant", frac, frac, 1)
        if parts[0] in ("linear", "cosine") and len(parts) == 4:
            try:
                return Curriculum(parts[0], float(parts[1]), float(parts[2]), int(parts[3]))
            except ValueError:
                pass  # falls through to the error below, which names the expected form
        raise ValueError(f"--curriculum {spec!r}: expected 'constant', 'linear:A:B:N' or "
                         "'cosine:A:B:N' (A, B fractions in (0, 1], N steps > 0)")

    def problems(self) -> list[str]:
        out = [f"--curriculum fraction {v} must be in (0, 1]"
               for v in (self.start, self.end) if not 0 < v <= 1]
        if self.steps <= 0:
            out.append(f"--curriculum steps {self.steps} must be > 0")
        return out

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.steps) / self.steps
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * t)) / 2
        return self.start


@dataclass(frozen=True)
class SelectionConfig:
    """Which positions get a KD loss. `validate()` before use."""

    rule: str = "topk"
    """--select: topk | percentile_band | gls | positional | learned | all."""
    score: str = "teacher_entropy"
    """--select-score: teacher_entropy | student_entropy | student_ce | kl | combined | random
    (ignored by `learned`, which ranks by predicted loss, and by `all`)."""
    frac: float = 0.25
    """--select-frac: fraction of valid positions to keep, in (0, 1] (topk, gls, positional,
    learned); the `constant` curriculum's value."""
    band_lo: float = 50.0
    """--select-band LO: lower percentile (0..100) for percentile_band."""
    band_hi: float = 100.0
    """--select-band HI: upper percentile (0..100) for percentile_band; LO < HI."""
    gls_queue: int = 30_000
    """--gls-queue: FIFO length Q (scores, all ranks together); >= one step's positions."""
    gls_warmup: int | None = None
    """--gls-warmup: scores to see before the global threshold replaces per-sequence top-k;
    None: until the FIFO is full (Q)."""
    positional_alpha: float = 1.0
    """--positional-alpha: sampling probability ~ max(score**alpha, floor * row mean of
    score**alpha); 0 = uniform."""
    positional_floor: float = 0.1
    """--positional-floor: positional's floor on q_t = score**alpha, relative to the row's mean
    q, in (0, 1] (default 0.1). Bounds every position weight by (1 + F) / (F * frac) (44 at
    0.1 and frac 0.25) and adds no bias (the weights are 1 / the inclusion probability); a
    smaller F picks low-score positions more rarely with larger weights (heavier tails), a
    larger one spends more of K on them (BENCHMARKS.md, "Positional weights")."""
    learned_kind: str = "linucb"
    """--learned-kind: linucb | mlp."""
    explore: float | None = None
    """--learned-explore: linucb: UCB bonus coefficient (>= 0, default 1); mlp: epsilon, the
    expected share of chosen positions picked at random (in [0, 1], default 0.1)."""
    curriculum: str = "constant"
    """--curriculum: constant | linear:A:B:N | cosine:A:B:N (fraction over steps)."""
    combined_weights: tuple[float, float, float, float] = (0.0, 1.0, 1.0, 1.0)
    """--combined-weights: weights of the z-scored teacher_entropy, student_entropy,
    student_ce, kl in `combined` (>= 0, not all 0)."""
    chunk_size: int = 512
    """--select-chunk: rows per no-grad lm_head chunk ([rows, V] fp32 = rows*V*4 bytes)."""
    seed: int = 0
    """--select-seed: seed of the random streams (per rank) and of the learned model (shared)."""

    def resolved_explore(self) -> float:
        return LEARNED_DEFAULT_EXPLORE[self.learned_kind] if self.explore is None else self.explore

    def signals(self) -> frozenset[str]:
        """The per-position signals `select` computes (see `pipeline.selection.SIGNALS`)."""
        if self.rule == "all":
            return frozenset()
        if self.rule == "learned":
            return frozenset({"teacher_entropy", "student_entropy", "student_ce"})
        if self.score == "combined":
            return frozenset(n for n, w in zip(SIGNAL_NAMES, self.combined_weights) if w)
        return frozenset({self.score}) if self.score in SIGNAL_NAMES else frozenset()

    def validate(self, *, has_targets: bool = True, positions_per_step: int | None = None) -> None:
        """Raise one ValueError listing every problem.

        has_targets: the run reads the teacher cache (ids, weights, entropy); False for
        `no_kd`. positions_per_step: B*T*world, the most scores GLS pushes per step.
        """
        p: list[str] = []
        if self.rule not in RULE_NAMES:
            p.append(f"--select {self.rule!r} must be one of {RULE_NAMES}")
        if self.score not in SCORE_NAMES:
            p.append(f"--select-score {self.score!r} must be one of {SCORE_NAMES}")
        if not (isinstance(self.frac, (int, float)) and 0 < self.frac <= 1):
            p.append(f"--select-frac {self.frac} must be in (0, 1]")
        if not (0 <= self.band_lo < self.band_hi <= 100):
            p.append(f"--select-band {self.band_lo} {self.band_hi}: need 0 <= LO < HI <= 100")
        if self.gls_queue < 1:
            p.append(f"--gls-queue {self.gls_queue} must be >= 1")
        elif self.rule == "gls" and positions_per_step is not None and self.gls_queue < positions_per_step:
            p.append(f"--gls-queue {self.gls_queue} is smaller than one step's positions "
                     f"(B*T*world = {positions_per_step}); raise it to at least that")
        if self.gls_warmup is not None and self.gls_warmup < 0:
            p.append(f"--gls-warmup {self.gls_warmup} must be >= 0")
        if not (math.isfinite(self.positional_alpha) and self.positional_alpha >= 0):
            p.append(f"--positional-alpha {self.positional_alpha} must be finite and >= 0")
        if not (math.isfinite(self.positional_floor) and 0 < self.positional_floor <= 1):
            p.append(f"--positional-floor {self.positional_floor} must be in (0, 1]")
        if self.learned_kind not in LEARNED_KINDS:
            p.append(f"--learned-kind {self.learned_kind!r} must be one of {LEARNED_KINDS}")
        elif self.explore is not None:
            hi = 1.0 if self.learned_kind == "mlp" else math.inf
            if not 0 <= self.explore <= hi:
                p.append(f"--learned-explore {self.explore} must be in [0, {hi}] for "
                         f"--learned-kind {self.learned_kind}")
        try:
            p += Curriculum.parse(self.curriculum, self.frac).problems()
        except ValueError as e:
            p.append(str(e))
        w = self.combined_weights
        if len(w) != 4 or any(not math.isfinite(x) or x < 0 for x in w) or not any(w):
            p.append(f"--combined-weights {' '.join(map(str, w))}: need 4 weights >= 0, not all 0 "
                     "(teacher_entropy student_entropy student_ce kl)")
        if self.chunk_size < 1:
            p.append(f"--select-chunk {self.chunk_size} must be >= 1")
        if self.seed < 0:
            p.append(f"--select-seed {self.seed} must be >= 0")
        if self.rule == "positional" and self.score == "combined":
            p.append("--select positional needs nonnegative scores; --select-score combined "
                     "(z-scores) is not: pick teacher_entropy, student_entropy, student_ce, kl or random")
        if not has_targets and self.rule != "all":
            missing = self.signals() & {"teacher_entropy", "kl"}
            if missing:
                what = f"--select {self.rule}" if self.rule == "learned" else f"--select-score {self.score}"
                p.append(f"{what} needs {sorted(missing)} from the teacher cache, which this run "
                         "does not read (no_kd): use student_entropy, student_ce or random")
        if p:
            raise ValueError("invalid selection settings:\n  " + "\n  ".join(p))

    # -- CLI ---------------------------------------------------------------------------
    @staticmethod
    def add_arguments(ap: argparse.ArgumentParser) -> None:
        """Add the selection flags (defaults = the dataclass defaults)."""
        d = SelectionConfig()
        g = ap.add_argument_group("position selection")
        g.add_argument("--select", default=d.rule, choices=RULE_NAMES)
        g.add_argument("--select-score", default=d.score, choices=SCORE_NAMES)
        g.add_argument("--select-frac", type=float, default=d.frac)
        g.add_argument("--select-band", type=float, nargs=2, metavar=("LO", "HI"),
                       default=(d.band_lo, d.band_hi))
        g.add_argument("--gls-queue", type=int, default=d.gls_queue)
        g.add_argument("--gls-warmup", type=int, default=d.gls_warmup)
        g.add_argument("--positional-alpha", type=float, default=d.positional_alpha)
        g.add_argument("--positional-floor", type=float, default=d.positional_floor,
                       help="positional: floor on q = score**alpha relative to the sequence's "
                            f"mean q, in (0, 1] (default {d.positional_floor}); position weights "
                            "<= (1 + F) / (F * frac), no bias")
        g.add_argument("--learned-kind", default=d.learned_kind, choices=LEARNED_KINDS)
        g.add_argument("--learned-explore", type=float, default=d.explore)
        g.add_argument("--curriculum", default=d.curriculum)
        g.add_argument("--combined-weights", type=float, nargs=4, default=d.combined_weights,
                       metavar=("WT", "WS", "WC", "WK"))
        g.add_argument("--select-chunk", type=int, default=d.chunk_size)
        g.add_argument("--select-seed", type=int, default=d.seed)

    @staticmethod
    def from_args(ns: argparse.Namespace) -> SelectionConfig:
        return SelectionConfig(
            rule=ns.select, score=ns.select_score, frac=ns.select_frac,
            band_lo=ns.select_band[0], band_hi=ns.select_band[1], gls_queue=ns.gls_queue,
            gls_warmup=ns.gls_warmup, positional_alpha=ns.positional_alpha,
            positional_floor=ns.positional_floor,
            learned_kind=ns.learned_kind, explore=ns.learned_explore, curriculum=ns.curriculum,
            combined_weights=tuple(ns.combined_weights), chunk_size=ns.select_chunk, seed=ns.select_seed)
