"""The venv's MPICH for the tests that launch `mpiexec` (tests/test_cache.py,
tests/test_mpi_errors.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def require_mpiexec(mpiexec: Path = MPIEXEC) -> None:
    """Skip a test that needs the venv's `mpiexec` when it is absent, but fail under CI
    (CI=true), where scripts/test.sh installs it: the MPI path must not go untested there."""
    if not Path(mpiexec).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{mpiexec} not found under CI: scripts/setup_env.sh installs mpich and mpi4py")
        pytest.skip(f"{mpiexec} not found (pip install mpich mpi4py into the venv)")
