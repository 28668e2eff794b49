"""The training modes (`--mode`) as one table: what each one's loss is, the loss weights it
brings, the selection it forces, and what it reads besides the student.

    mode       objective   kd  ce  select   cache classes  online teacher
    sampledkd  cached_kd   1   0   --select yes            no    the product
    no_kd      no_kd       0   1   all      no             no    CE only: no teacher
    dense_kd   dense_kd    1   0   all      no             yes   full vocabulary, every position
    rskd_all   cached_kd   1   0   all      yes            no    RS-KD: the cache at every position

`DistillConfig` takes its `--mode` choices, default weights, forced selection and the
checks of its flags from `MODES`; the trainer takes the objective and whether to load and
run the teacher from it. Neither names a mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.stage2_distill import objectives


@dataclass(frozen=True)
class Mode:
    objective: Callable[..., objectives.Terms]
    """(lm_head, StepInputs, LossSettings) -> Terms with the loss to backpropagate."""
    kd_weight: float
    """The KD term's weight when --kd-weight is not given."""
    ce_weight: float
    """The next-token CE term's weight when --ce-weight is not given."""
    select: str | None
    """The selection rule the mode runs whatever --select says; None: --select's."""
    reads_cache: bool
    """The loss reads the cache's sampled classes (ids, weights) and its entropy."""
    online_teacher: bool
    """The loss runs --teacher on every micro-batch."""

    @property
    def distils(self) -> bool:
        """A teacher signal enters the loss (the cache's or the online teacher's); a mode
        without one trains on CE only."""
        return self.reads_cache or self.online_teacher


MODES: dict[str, Mode] = {
    # cache targets at the positions --select picks: the product
    "sampledkd": Mode(objectives.cached_kd, 1.0, 0.0, None, reads_cache=True, online_teacher=False),
    # cross-entropy on every position, no teacher (the baseline without KD)
    "no_kd": Mode(objectives.no_kd, 0.0, 1.0, "all", reads_cache=False, online_teacher=False),
    # the online teacher's full distribution at every position (the online baseline)
    "dense_kd": Mode(objectives.dense_kd, 1.0, 0.0, "all", reads_cache=False, online_teacher=True),
    # cache targets at every position (RS-KD)
    "rskd_all": Mode(objectives.cached_kd, 1.0, 0.0, "all", reads_cache=True, online_teacher=False),
}
