"""Expected errors end in one line; unexpected ones keep their traceback.

An *expected* error is one the pipeline raises on purpose to refuse bad input: a bad flag or
configuration file, data that does not fit, a refused resume or launch. Our code raises
those as `ValueError` (or `FileNotFoundError`) with a message that names the file, flag or
value and what would fix it, so the rule is mechanical: a `ValueError`/`FileNotFoundError`
raised by a `raise` statement in this package is expected; the same types raised inside a
library (numpy, torch, ...) are bugs or surprises and keep their traceback. Expected errors
print `STAGE: error: MESSAGE` (with `[rank r]` on ranks other than 0) and exit 1;
`SAMPLEDKD_DEBUG=1` shows the traceback of every error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]     # pipeline/: errors raised by our own code
EXPECTED_TYPES = (ValueError, FileNotFoundError)


class Refusal(ValueError):
    """An expected error raised before the stage touched its output (e.g. a launch refused
    because another runs on the same cache): nothing may be written there, no error file."""


def debug() -> bool:
    return os.environ.get("SAMPLEDKD_DEBUG", "") not in ("", "0")


def is_expected(exc: BaseException | None) -> bool:
    """Whether `exc` is a refusal raised on purpose by this package (module docstring)."""
    if not isinstance(exc, EXPECTED_TYPES):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve()
    return PACKAGE in where.parents


def env_rank() -> int:
    """This process's rank from the launcher's environment (torchrun, MPI, SLURM), else 0."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def one_line(stage: str, exc: BaseException, rank: int = 0) -> str:
    prefix = f"[rank {rank}] " if rank else ""
    return f"{prefix}{stage}: error: {exc}"


@contextmanager
def alike_on_every_rank() -> Iterator[None]:
    """Marks an expected error raised inside as one every rank meets alike (a bad flag or
    configuration file): `clean_errors` prints it on rank 0 only."""
    try:
        yield
    except EXPECTED_TYPES as e:
        e.alike_on_every_rank = True
        raise


@contextmanager
def clean_errors(stage: str, rank: int | None = None) -> Iterator[None]:
    """`if __name__ == "__main__": with clean_errors("pipeline.distill"): main()` -- an
    expected error becomes one line on stderr and exit status 1 (`SystemExit`), anything
    else propagates unchanged. `main()` itself raises (tests call it). An error marked
    `alike_on_every_rank` is printed by rank 0 only; the other ranks exit 1 quietly."""
    try:
        yield
    except EXPECTED_TYPES as e:
        if debug() or not is_expected(e):
            raise
        r = env_rank() if rank is None else rank
        if r == 0 or not getattr(e, "alike_on_every_rank", False):
            print(one_line(stage, e, r), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
