"""Fake stage 1: report the MPI world each rank sees."""

from pathlib import Path

from mpi4py import MPI

from pipeline._fake import fail_if_asked, flag, record

comm = MPI.COMM_WORLD
record(Path(flag("--out")) / f"rank{comm.rank}.json", rank=comm.rank, size=comm.size)
fail_if_asked("cache")
