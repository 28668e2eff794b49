"""The venv's MPICH for the tests that launch `mpiexec` (the cache stage's MPI tests,
tests/test_mpi_errors.py), and the environment of their `python -m pipeline.cache` ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.hooks import hook_env

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def require_mpiexec(mpiexec: Path = MPIEXEC) -> None:
    """Skip a test that needs the venv's `mpiexec` when it is absent, but fail under CI
    (CI=true), where scripts/test.sh installs it: the MPI path must not go untested there."""
    if not Path(mpiexec).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{mpiexec} not found under CI: scripts/setup_env.sh installs mpich and mpi4py")
        pytest.skip(f"{mpiexec} not found (pip install mpich mpi4py into the venv)")


def mpi_env(**extra: str) -> dict[str, str]:
    """This environment for the ranks, plus `extra`. A stage-1 test hook asked for by name,
    `mpi_env(SAMPLEDKD_TEST_SLOW_RANK="1:0.5")` or `SAMPLEDKD_TEST_STATIC_UNITS="1"`, reaches
    the ranks through tests/hooks (its sitecustomize goes on PYTHONPATH): the stage itself
    reads no test variable."""
    # One BLAS thread per rank (16 ranks on two cores), wide rich output (greppable logs).
    return hook_env({**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                     "COLUMNS": "300", **extra})
