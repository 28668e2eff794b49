"""Progress that reads well in a terminal and in a SLURM log file.

In a terminal: a rich progress bar (rate and ETA). In a log file (no TTY), rich would draw
nothing until the end, so we print a line every `every_s` seconds instead.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class StageProgress:
    """`update(steps, items)`: `steps` counts `unit_of_steps` (of `total` when known),
    `items` counts `unit` (the rate). `note(text)` adds a line's last words (validation)."""

    def __init__(self, desc: str, total: int | None, unit: str = "tokens", every_s: float = 30.0,
                 prefix: str = "", unit_of_steps: str = "steps"):
        self.desc, self.total, self.unit, self.every_s, self.prefix = desc, total, unit, every_s, prefix
        self.unit_of_steps = unit_of_steps
        self.extra = ""
        self.console = Console(stderr=True, highlight=False)
        self.done = 0
        self.items = 0
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.bar = None
        if self.console.is_terminal and sys.stderr.isatty():
            self.bar = Progress(TextColumn(f"{prefix}{desc}", markup=False), BarColumn(),
                                MofNCompleteColumn(), TextColumn(unit_of_steps, markup=False),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[note]}", markup=False),
                                console=self.console)
            self.task = self.bar.add_task(desc, total=total, rate="", note="")
            self.bar.start()

    def rate(self) -> float:
        return self.items / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, steps: int, items: int) -> None:
        self.done += steps
        self.items += items
        if self.bar is not None:
            self.bar.update(self.task, advance=steps, rate=f"{self.rate():,.0f} {self.unit}/s")
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or (self.total and self.done >= self.total):
            self.last = now
            eta = ""
            if self.total and self.done:
                eta = f", ETA {(now - self.t0) / self.done * (self.total - self.done):.0f} s"
            of = f"/{self.total:,}" if self.total else ""
            note = f"; {self.extra}" if self.extra else ""
            self.console.print(f"{self.prefix}{self.desc}: {self.done:,}{of} {self.unit_of_steps}, "
                               f"{self.rate():,.0f} {self.unit}/s{eta}{note}", markup=False)

    def note(self, text: str) -> None:
        """Words shown after the rate from now on (e.g. the latest validation numbers)."""
        self.extra = text
        if self.bar is not None:
            self.bar.update(self.task, note=text)
        else:
            self.console.print(f"{self.prefix}{self.desc}: {text}", markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
