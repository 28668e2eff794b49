"""Wall time per named phase of a training step, for benchmarks and profiling.

    timer = PhaseTimer(enabled=True, device=device)
    with timer("body_fwd"):
        h = decoder(ids)
    timer.pop()            # {"body_fwd": 0.42, ...} seconds summed since the last pop

Disabled (the default in training), a phase costs one attribute check. Enabled on CUDA,
each phase boundary synchronizes the device, so the times are the phases' own (and the
step is slower than without the timer: compare steps timed the same way).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch


class PhaseTimer:
    def __init__(self, enabled: bool = False, device: torch.device | None = None):
        self.enabled = enabled
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, name: str):
        return self._phase(name) if self.enabled else nullcontext()

    @contextmanager
    def _phase(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        """The phase totals since the last pop (and reset them)."""
        out = dict(self.totals)
        self.totals.clear()
        return out
