import os

# Deterministic, quiet CPU runs for every test process (children inherit the environment).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------- the local SLURM cluster
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

SLURM_NODES = {"node1", "node2"}


def _cluster_problem() -> str | None:
    """None when sinfo shows node1 and node2 responding, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo is not installed (run: bash scripts/slurm_cluster.sh start)"
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        return (f"sinfo cannot reach a cluster: {proc.stderr.strip()} "
                "(run: bash scripts/slurm_cluster.sh start)")
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    up = {"idle", "mixed", "allocated", "completing"}
    if not all(states.get(n) in up for n in SLURM_NODES):
        return f"nodes not up: {states} (run: bash scripts/slurm_cluster.sh start)"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    """The two-node cluster of scripts/slurm_cluster.sh: skip without one, unless
    SAMPLEDKD_REQUIRE_SLURM=1 (CI), where a missing cluster fails the test."""
    problem = _cluster_problem()
    if problem is None:
        # Jobs inherit this: a rank stuck in MPI_Init (Slurm's pmi2 garbling the address
        # exchange, seen under CI load) gives up after 60 s and cache.sh launches again,
        # instead of the 300 s a production launch allows.
        os.environ.setdefault("SAMPLEDKD_MPI_INIT_TIMEOUT", "60")
        # and the cause: MPICH's UCX netmod sends a ~4.5 KB address per rank through PMI in
        # 9 segments, which Slurm 22.05's PMI1 reader mis-frames; OFI over TCP needs one
        # short put per rank (README, troubleshooting)
        os.environ.setdefault("MPIR_CVAR_CH4_NETMOD", "ofi")
        os.environ.setdefault("FI_PROVIDER", "tcp")
        return
    if os.environ.get("SAMPLEDKD_REQUIRE_SLURM") == "1":
        pytest.fail(f"SAMPLEDKD_REQUIRE_SLURM=1 but {problem}")
    pytest.skip(problem)


# ---------------------------------------------------------------- shared 2-rank distill runs
@pytest.fixture(scope="session")
def distill_runs(tmp_path_factory) -> dict:
    """The one torchrun launch of tests/distill_runs.py (tiny models, run A, the baselines,
    the bad-input cases), shared by tests/test_distill.py and tests/test_export.py."""
    from distill_runs import shared_runs

    return shared_runs(tmp_path_factory)
