"""Helpers shared by the fake stages: argument lookup and JSON records."""

import json
import os
import sys
from pathlib import Path


def flag(name: str) -> str:
    """The value after `--name` on the command line; a clear error when it is missing."""
    argv = sys.argv[1:]
    if name not in argv:
        sys.exit(f"fake {Path(sys.argv[0]).stem}: missing {name} in {argv}")
    return argv[argv.index(name) + 1]


def record(path: Path, **extra: object) -> None:
    """Write argv, the SLURM placement and `extra` as JSON to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: os.environ.get(k) for k in ("SLURMD_NODENAME", "SLURM_JOB_ID", "SLURM_NTASKS",
                                           "SLURM_RESTART_COUNT", "RANK", "WORLD_SIZE",
                                           "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    path.write_text(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env, **extra}))


def fail_if_asked(stage: str) -> None:
    """Exit 7 when FAKE_FAIL names this stage (to test failure propagation)."""
    if os.environ.get("FAKE_FAIL") == stage:
        sys.exit(7)
