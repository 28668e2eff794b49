"""Rank discovery, rank-aware logging, and the collectives the stages need.

One `init_distributed()` for every launcher:
- MPI (`mpiexec`, or `srun --mpi=pmi2`): mpi4py's COMM_WORLD. A launcher/MPI mismatch
  (e.g. `srun` without `--mpi=pmi2`, or an MPI library other than the one mpi4py was
  built against) silently gives every task a world of size 1, so the MPI size is checked
  against the launcher's task count and a mismatch is an error.
- torchrun / deepspeed / SLURM without MPI: RANK/WORLD_SIZE/LOCAL_RANK, or SLURM_PROCID/
  SLURM_NTASKS/SLURM_LOCALID.
- otherwise a single process.
MPI_Init runs under a watchdog (`SAMPLEDKD_MPI_INIT_TIMEOUT`, default 300 s): Slurm's pmi2
plugin was seen to garble one rank's PMI message during the two-node address exchange and
leave every rank in MPI_Init forever. The watchdog (faulthandler's C thread: MPI_Init holds
the GIL) prints where it hung and exits 1, so the job fails instead of hanging and
slurm/cache.sh can launch the resumable stage again.
The stage-2 trainer uses torch.distributed (through DeepSpeed); `TorchComm` adapts it to the
small communicator interface that selection (GLS, the learned selector) expects, and
`SingleComm` is that interface for one process, for every stage.

A rank that fails under MPI must end the whole job (`mpiexec` leaves the other ranks waiting
in their next collective forever) without losing its error: `abort_job_on_error` writes the
traceback to `OUT/errors/rank{rank:04d}.txt` and to stderr, gives mpiexec's proxy time to
forward it, then calls MPI_Abort. This module imports only the standard library when it is
imported (rich when `log` first prints, mpi4py in `init_distributed`, torch in `TorchComm`):
the MPI tests launch it alone, and position selection can take `SingleComm` from here
without importing more than it does.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID",
            "PMI_FD")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str          # "mpi", "torchrun", "slurm" or "single"
    node: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class MPIComm:
    """gather/barrier over mpi4py (the cache stage's manifest merge)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    def gather_object(self, obj: Any) -> list[Any] | None:
        return self.comm.gather(obj, root=0)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def bcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (JSON-like data: the pickle stays inside the job)."""
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()


class SingleComm:
    """The communicator of a single process (rank 0 of 1): every collective returns this
    rank's own value. `init_distributed` gives it to a process without a launcher; it also
    meets position selection's `Communicator` protocol (`all_gather`, `rank`, `world_size`)."""

    rank = 0
    world_size = 1

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def bcast_object(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def all_gather(self, tensor):
        """[`tensor`]: the list of every rank's tensor, index = rank."""
        return [tensor]


class TorchComm:
    """torch.distributed behind the communicator interface (GLS, learned selector)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather(self, tensor):
        out = [tensor.new_empty(tensor.shape) for _ in range(self.world_size)]
        self.dist.all_gather(out, tensor.contiguous())
        return out

    def gather_object(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out if self.rank == 0 else None

    def allgather_object(self, obj: Any) -> list[Any]:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def bcast_object(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()


def _launcher_world() -> tuple[str, int] | None:
    if "SLURM_STEP_NUM_TASKS" in os.environ or ("SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ):
        return "SLURM_NTASKS", int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ["SLURM_NTASKS"]))
    if "PMI_SIZE" in os.environ:
        return "PMI_SIZE", int(os.environ["PMI_SIZE"])
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        return "OMPI_COMM_WORLD_SIZE", int(os.environ["OMPI_COMM_WORLD_SIZE"])
    return None


def init_distributed(use_mpi: bool | None = None) -> tuple[DistInfo, Any]:
    """Discover this process's place in the job. Returns `(info, comm)`.

    `use_mpi=None` picks MPI when an MPI launcher's variables are present.
    """
    env = os.environ
    node = env.get("SLURMD_NODENAME") or os.uname().nodename
    if use_mpi is None:
        use_mpi = any(k in env for k in _MPI_ENV) and "RANK" not in env
    if use_mpi:
        timeout = float(env.get("SAMPLEDKD_MPI_INIT_TIMEOUT", "300"))
        if timeout > 0:   # on expiry: "Timeout (h:mm:ss)!", this stack, exit code 1
            faulthandler.dump_traceback_later(timeout, exit=True)
        try:
            from mpi4py import MPI   # MPI_Init
        finally:
            if timeout > 0:
                faulthandler.cancel_dump_traceback_later()

        comm = MPI.COMM_WORLD
        expected = _launcher_world()
        if expected is not None and comm.Get_size() != expected[1]:
            raise RuntimeError(
                f"MPI world size {comm.Get_size()} != {expected[0]}={expected[1]}: the launcher "
                "and MPI do not match (under SLURM use `srun --mpi=pmi2` with the mpich that "
                "mpi4py was installed with; check `srun --mpi=list`)")
        local = int(env.get("MPI_LOCALRANKID", env.get("SLURM_LOCALID", env.get("PMI_LOCAL_RANK", 0))))
        return DistInfo(comm.Get_rank(), comm.Get_size(), local, "mpi", node), MPIComm(comm)
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        "torchrun", node)
        return info, None
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        info = DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                        int(env.get("SLURM_LOCALID", 0)), "slurm", node)
        return info, None
    return DistInfo(0, 1, 0, "single", node), SingleComm()


@functools.cache
def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def log(msg: str, info: DistInfo | None = None, all_ranks: bool = False) -> None:
    """Print on rank 0 (or every rank with a rank prefix when `all_ranks`)."""
    rank = info.rank if info is not None else int(os.environ.get("RANK", 0))
    # markup=False: a message's own brackets ("[ledger] ...", paths, lists) are text
    if all_ranks:
        _console().print(f"[rank {rank}] {msg}", markup=False)
    elif rank == 0:
        _console().print(msg, markup=False)


def print0(msg: str) -> None:
    log(msg)


# ---------------------------------------------------------------- errors under MPI
ERRORS_DIR = "errors"
ABORT_GRACE_S = 1.5
"""Seconds a failing rank waits between writing its error and MPI_Abort (report_and_abort)."""


def error_file(out_dir: str | Path, rank: int) -> Path:
    """Where rank `rank` of a stage writing to `out_dir` leaves the traceback it died with."""
    return Path(out_dir) / ERRORS_DIR / f"rank{rank:04d}.txt"


def _write_fd2(text: str) -> None:
    """All of `text` to file descriptor 2, past any replacement of sys.stderr."""
    data = text.encode("utf-8", errors="replace")
    while data:
        data = data[os.write(2, data):]


def report_and_abort(info: DistInfo, comm: MPIComm, stage: str,
                     out_dir: str | Path | None) -> NoReturn:
    """Call in an `except` block on a rank of a multi-rank MPI job: report the exception
    being handled so that it reaches the user, then abort every rank (exit code 1).

    1. The traceback goes to `out_dir/errors/rank{rank:04d}.txt` (directory created,
       file written to a temporary name and renamed). When that fails (read-only or full
       disk, no `out_dir`), stderr says so and the report goes on.
    2. The traceback goes to sys.stderr, flushed; then one line with the exception and one
       naming the error file are written with os.write to file descriptor 2 itself (they
       reach the launcher even if sys.stderr was replaced or is broken). They are the last
       lines this rank prints.
    3. A pause of ABORT_GRACE_S seconds, then MPI_Abort, whatever happened before (a
       rank that does not abort leaves the others waiting forever).
    """
    from pipeline.common.errors import Refusal, debug, is_expected, one_line

    try:
        exc = sys.exc_info()[1]
        expected = is_expected(exc) and not debug()
        if expected and isinstance(exc, Refusal):
            # Refused before touching the output (a launch refused because another runs
            # there): one line, nothing written into the cache directory.
            out_dir = None
        head = f"[rank {info.rank}] {stage} failed on {info.node}"
        # An expected error (bad data, bad input) is its message, not a traceback.
        text = (f"{one_line(stage, exc, info.rank)}\n" if expected
                else f"{head}:\n{traceback.format_exc()}")
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip() if exc else "?"
        notes = ""
        if out_dir is None:
            where = ("nothing written (refused before the stage began)" if isinstance(exc, Refusal)
                     else "no error file (no output directory)")
        else:
            path = error_file(out_dir, info.rank)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(text)
                os.replace(tmp, path)
                where = f"{'error' if expected else 'traceback'} in {path}"
            except OSError as e:
                notes = f"[rank {info.rank}] could not write the error file {path}: {e}\n"
                where = f"no error file ({path}: {e.strerror or e})"
        try:
            if not expected:          # the one line below says it all for an expected error
                sys.stderr.write(text + notes)
                sys.stderr.flush()
            elif notes:
                sys.stderr.write(notes)
                sys.stderr.flush()
        except (OSError, ValueError) as e:        # closed or broken sys.stderr
            where += f"; sys.stderr failed ({e!r})"
        try:
            first = one_line(stage, exc, info.rank) if expected else f"{head}: {summary}"
            _write_fd2(f"{first}\n[rank {info.rank}] {stage}: {where}\n")
        except OSError:
            pass   # fd 2 itself is gone: nothing can carry the text; the error file has it
        # Why wait: what a rank writes to stderr sits in a pipe until mpiexec's proxy
        # (hydra_pmi_proxy) reads it and forwards it to mpiexec. MPI_Abort makes mpiexec
        # kill the proxies and ranks; when that happened before the proxy had read the
        # pipe, the text was lost and the job exited 1 silently (2 runs in 100 on a loaded
        # 2-core machine). The pause lets the proxy drain the pipe and mpiexec print it.
        time.sleep(ABORT_GRACE_S)
    finally:
        comm.comm.Abort(1)
    raise SystemExit(1)   # not reached: MPI_Abort ends the process


@contextmanager
def abort_job_on_error(info: DistInfo, comm: Any, stage: str,
                       out_dir: str | Path | None) -> Iterator[None]:
    """`with abort_job_on_error(info, comm, "pipeline.cache", cfg.out): ...`

    Under MPI with more than one rank an exception (or KeyboardInterrupt) escaping the block
    ends the whole job through `report_and_abort`: a rank that raised would otherwise leave
    the others blocked in their next collective (mpiexec does not stop the job when one
    rank exits with an error). Otherwise the exception propagates unchanged.
    """
    try:
        yield
    except BaseException:
        if isinstance(comm, MPIComm) and info.world_size > 1:
            report_and_abort(info, comm, stage, out_dir)
        raise
