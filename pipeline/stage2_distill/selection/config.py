"""Configuration of position selection: `SelectionConfig` (a section of `DistillConfig`,
its flags `--select*`, `--gls-*`, `--positional-*`, `--learned-*`, `--curriculum`,
`--combined-weights`) and `Curriculum`. Imports nothing of ours but `pipeline.common.config`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.common.config import opt

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
    """Position selection: which positions get a KD loss. `validate()` before use.

    The field names are the flags (`select_frac` <-> `--select-frac`) and the YAML keys.
    """

    select: str = opt("topk", "position-selection rule", choices=RULE_NAMES)
    select_score: str = opt("teacher_entropy", "score the rule ranks by (ignored by `learned`, "
                            "which ranks by predicted loss, and by `all`)", choices=SCORE_NAMES)
    select_frac: float = opt(0.25, "fraction of valid positions to keep, in (0, 1] (topk, gls, "
                             "positional, learned); the `constant` curriculum's value")
    select_band: list[float] = opt([50.0, 100.0], "percentile_band: LO HI percentiles (0..100), "
                                   "LO < HI")
    gls_queue: int = opt(30_000, "gls: FIFO length Q (scores, all ranks together); >= one "
                         "step's positions")
    gls_steps: int = opt(8, "gls: when one step's valid scores (all ranks) outnumber --gls-queue, each "
                         "step pushes a uniform sample of ceil(Q/H) of them (each rank its share, in "
                         "proportion to its scores), so the FIFO keeps about the last H steps whatever "
                         "the world size; a step whose scores fit pushes all of them")
    gls_warmup: int | None = opt(None, "gls: scores to see before the global threshold replaces "
                                 "per-sequence top-k (default: the queue length)")
    positional_alpha: float = opt(1.0, "positional: sampling probability ~ score**alpha; 0 = uniform")
    positional_floor: float = opt(0.1, "positional: q_t floored at this fraction of the sequence's "
                                  "mean q, in (0, 1]; bounds every position weight by "
                                  "(1 + floor) / (floor * frac), 44 at 0.1 and frac 0.25, no bias "
                                  "(BENCHMARKS.md, 'Positional weights')")
    learned_kind: str = opt("linucb", "learned selector", choices=LEARNED_KINDS)
    learned_explore: float | None = opt(None, "learned: linucb's UCB bonus (>= 0, default 1) or "
                                        "mlp's epsilon (in [0, 1], default 0.1)")
    curriculum: str = opt("constant", "fraction schedule: constant | linear:A:B:N | cosine:A:B:N")
    combined_weights: list[float] = opt([0.0, 1.0, 1.0, 1.0], "combined: weights of the z-scored "
                                        "teacher_entropy student_entropy student_ce kl (>= 0, not "
                                        "all 0)")
    select_chunk: int = opt(512, "rows per no-grad lm_head chunk for student-side scores "
                            "([rows, V] fp32 = rows*V*4 bytes)")

    def resolved_explore(self) -> float:
        return LEARNED_DEFAULT_EXPLORE[self.learned_kind] if self.learned_explore is None else self.learned_explore

    def signals(self) -> frozenset[str]:
        """The per-position signals `select` computes (see `pipeline.stage2_distill.selection.SIGNALS`)."""
        if self.select == "all":
            return frozenset()
        if self.select == "learned":
            return frozenset({"teacher_entropy", "student_entropy", "student_ce"})
        if self.select_score == "combined":
            return frozenset(n for n, w in zip(SIGNAL_NAMES, self.combined_weights) if w)
        return frozenset({self.select_score}) if self.select_score in SIGNAL_NAMES else frozenset()

    def validate(self, *, has_targets: bool = True) -> None:
        """Raise one ValueError listing every problem.

        has_targets: the run reads the teacher cache (ids, weights, entropy); False for
        `no_kd`.
        """
        p: list[str] = []
        if self.select not in RULE_NAMES:
            p.append(f"--select {self.select!r} must be one of {RULE_NAMES}")
        if self.select_score not in SCORE_NAMES:
            p.append(f"--select-score {self.select_score!r} must be one of {SCORE_NAMES}")
        if not (isinstance(self.select_frac, (int, float)) and 0 < self.select_frac <= 1):
            p.append(f"--select-frac {self.select_frac} must be in (0, 1]")
        band = list(self.select_band)
        if len(band) != 2 or not 0 <= band[0] < band[1] <= 100:
            p.append(f"--select-band {' '.join(map(str, band))}: need LO HI with 0 <= LO < HI <= 100")
        if self.gls_queue < 1:
            p.append(f"--gls-queue {self.gls_queue} must be >= 1")
        elif not 1 <= self.gls_steps <= self.gls_queue:
            p.append(f"--gls-steps {self.gls_steps} must be in [1, --gls-queue {self.gls_queue}]: the "
                     f"FIFO of {self.gls_queue} scores cannot hold {self.gls_steps} steps' samples of "
                     "at least one score")
        if self.gls_warmup is not None and self.gls_warmup < 0:
            p.append(f"--gls-warmup {self.gls_warmup} must be >= 0")
        if not (math.isfinite(self.positional_alpha) and self.positional_alpha >= 0):
            p.append(f"--positional-alpha {self.positional_alpha} must be finite and >= 0")
        if not (math.isfinite(self.positional_floor) and 0 < self.positional_floor <= 1):
            p.append(f"--positional-floor {self.positional_floor} must be in (0, 1]")
        if self.learned_kind not in LEARNED_KINDS:
            p.append(f"--learned-kind {self.learned_kind!r} must be one of {LEARNED_KINDS}")
        elif self.learned_explore is not None:
            hi = 1.0 if self.learned_kind == "mlp" else math.inf
            if not 0 <= self.learned_explore <= hi:
                p.append(f"--learned-explore {self.learned_explore} must be in [0, {hi}] for "
                         f"--learned-kind {self.learned_kind}")
        try:
            p += Curriculum.parse(self.curriculum, self.select_frac).problems()
        except ValueError as e:
            p.append(str(e))
        w = self.combined_weights
        if len(w) != 4 or any(not math.isfinite(x) or x < 0 for x in w) or not any(w):
            p.append(f"--combined-weights {' '.join(map(str, w))}: need 4 weights >= 0, not all 0 "
                     "(teacher_entropy student_entropy student_ce kl)")
        if self.select_chunk < 1:
            p.append(f"--select-chunk {self.select_chunk} must be >= 1")
        if self.select == "positional" and self.select_score == "combined":
            p.append("--select positional needs nonnegative scores; --select-score combined "
                     "(z-scores) is not: pick teacher_entropy, student_entropy, student_ce, kl or random")
        if not has_targets and self.select != "all":
            missing = self.signals() & {"teacher_entropy", "kl"}
            if missing:
                what = f"--select {self.select}" if self.select == "learned" else f"--select-score {self.select_score}"
                p.append(f"{what} needs {sorted(missing)} from the teacher cache, which this run "
                         "does not read (no_kd): use student_entropy, student_ce or random")
        if p:
            raise ValueError("invalid selection settings:\n  " + "\n  ".join(p))
