"""Stage 1's test hooks (`pipeline.stage1_cache.run.Hooks`) for `python -m pipeline.cache`
processes a test or benchmark starts (under mpiexec, srun or sbatch), whose `main` the test
cannot call itself.

The stage reads no test variable from the environment. `hook_env(env)` puts this folder
on PYTHONPATH when `env` asks for a hook; Python then imports `sitecustomize` (this
folder's) at start-up, which reads the variables below and hands the hooks to the stage's
`main` as its `hooks` argument:

    SAMPLEDKD_TEST_SLOW_RANK="R:SECONDS"   rank R sleeps SECONDS after each teacher batch
                                           ("*:SECONDS": every rank)
    SAMPLEDKD_TEST_STATIC_UNITS=1          unit u goes to rank u % world (no claiming)
"""

from __future__ import annotations

import os
from pathlib import Path

HOOKS_DIR = Path(__file__).resolve().parent
SLOW_RANK = "SAMPLEDKD_TEST_SLOW_RANK"
STATIC_UNITS = "SAMPLEDKD_TEST_STATIC_UNITS"


def hook_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this folder first on PYTHONPATH when it sets a hook variable (unchanged
    otherwise: a run without hooks starts exactly as production does)."""
    if not any(env.get(k) for k in (SLOW_RANK, STATIC_UNITS)):
        return env
    path = [str(HOOKS_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path)}
