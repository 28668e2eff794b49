"""The local two-node SLURM cluster and the slurm/*.sh job scripts, run for real.

Start the cluster first: `bash scripts/slurm_cluster.sh start`. Without a reachable cluster
the `slurm` tests skip, unless SAMPLEDKD_REQUIRE_SLURM=1 (CI), where they fail. The job
scripts run the stand-in stages of tests/slurm_jobs/ (REPO_DIR points there), so these
tests check placement, arguments, signals and chaining, not the stages themselves.
`-m "slurm and not slow"` runs the quick ones (about 20 s); the requeue test takes about 90 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
FAKE_REPO = Path(__file__).resolve().parent / "slurm_jobs"
NODES = {"node1", "node2"}


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 180,
         ) -> subprocess.CompletedProcess[str]:
    # From the repo root: under sbatch a job script finds slurm/common.sh through the submit
    # directory (REPO_DIR points at the stand-ins, which have no slurm/).
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for slurm/*.sh running the fake stages, paths under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(REPO_DIR=str(FAKE_REPO), PYTHON=sys.executable, TEACHER="teacher-id",
               DATA=str(tmp_path / "data.jsonl"), CACHE_DIR=str(tmp_path / "cache"),
               STUDENT=str(tmp_path / "student-init"), RUN_DIR=str(tmp_path / "run"),
               EVAL_DIR=str(tmp_path / "eval"), TASKS="quick", DS_CONFIG="",
               LOG_DIR=str(tmp_path / "logs"))
    env.update(extra)
    (tmp_path / "logs").mkdir(exist_ok=True)  # sbatch does not create the --output folder
    return env


def _records(directory: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob(pattern))]


def _job_field(job: str, name: str) -> str:
    out = _run(["scontrol", "show", "job", job], timeout=30).stdout
    for word in out.split():
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return ""


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


def _log(tmp_path: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted((tmp_path / "logs").glob("*")))


@pytest.mark.slurm
def test_sbatch_wait_two_nodes_and_exit_code(cluster, tmp_path):
    out = tmp_path / "ok.out"
    proc = _run(["sbatch", "--wait", "--nodes=2", f"--output={out}",
                 "--wrap", "srun bash -c 'echo $SLURMD_NODENAME'"])
    assert proc.returncode == 0, proc.stderr + out.read_text()
    assert set(out.read_text().split()) == NODES

    proc = _run(["sbatch", "--wait", f"--output={tmp_path / 'fail.out'}", "--wrap", "exit 3"])
    assert proc.returncode == 3, proc.stderr  # sbatch --wait returns the job's exit code


@pytest.mark.slurm
def test_srun_pmi2_gives_mpi4py_one_world_across_nodes(cluster):
    code = ("import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print(c.size, c.rank, os.environ['SLURMD_NODENAME'])")
    proc = _run(["srun", "--mpi=pmi2", "-N2", "-n2", sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    rows = sorted(line.split() for line in proc.stdout.splitlines())
    assert [(size, rank) for size, rank, _ in rows] == [("2", "0"), ("2", "1")], proc.stdout
    assert {node for _, _, node in rows} == NODES


@pytest.mark.slurm
def test_cache_sh_one_rank_per_node_with_exact_arguments(cluster, tmp_path):
    env = _job_env(tmp_path, SEQ_LEN="128", SAMPLER="rskd", EXTRA_ARGS="--max-windows 3")
    proc = _run(["sbatch", "--wait", "--nodes=2", f"--output={tmp_path / 'logs' / 'cache.out'}",
                 str(SLURM / "cache.sh")], env=env)
    assert proc.returncode == 0, proc.stderr + _log(tmp_path)
    recs = _records(tmp_path / "cache", "rank*.json")
    assert [(r["rank"], r["size"]) for r in recs] == [(0, 2), (1, 2)]
    assert {r["env"]["SLURMD_NODENAME"] for r in recs} == NODES
    assert all(r["cwd"] == str(FAKE_REPO) for r in recs)
    assert recs[0]["argv"] == ["--teacher", "teacher-id", "--data", str(tmp_path / "data.jsonl"),
                               "--out", str(tmp_path / "cache"), "--seq-len", "128",
                               "--sampler", "rskd", "--max-windows", "3"]


@pytest.mark.slurm
@pytest.mark.slow
def test_distill_sh_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "rank0.json").write_text("{}")
    env = _job_env(tmp_path, FAKE_WAIT_USR1="1", STEPS="5", EXTRA_ARGS="--log-every 1")
    proc = _run(["sbatch", "--parsable", "--nodes=2", f"--output={tmp_path / 'logs' / 'distill.out'}",
                 str(SLURM / "distill.sh")], env=env)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    run = tmp_path / "run"
    try:
        _wait_for(lambda: len(list(run.glob("start0-rank*.json"))) == 2, "both workers to start")
        # What --signal=B:USR1@120 does at the time limit: signal the batch shell only.
        assert _run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
        _wait_for(lambda: _job_field(job, "Restarts") == "1", "the requeue")
        # A requeued job restarts once its old credential expired (cred_expire=30 s here;
        # forcing an earlier start fails with "Job credential revoked").
        _wait_for(lambda: _job_field(job, "JobState") not in ("PENDING", "RUNNING", "COMPLETING"),
                  "the second run", timeout=180)
    finally:
        _run(["scancel", job])
    assert _job_field(job, "JobState") == "COMPLETED", _log(tmp_path)

    usr1 = _records(run, "usr1-rank*.json")
    assert [r["signals"] >= 1 for r in usr1] == [True, True], _log(tmp_path)
    for restart in (0, 1):
        starts = _records(run, f"start{restart}-rank*.json")
        assert [(s["rank"], s["world"], s["rank_sum"]) for s in starts] == [(0, 2, 1), (1, 2, 1)]
        assert {s["env"]["SLURMD_NODENAME"] for s in starts} == NODES
        assert {s["env"]["MASTER_ADDR"] for s in starts} == {"node1"}
    done = _records(run, "done-rank*.json")
    assert len(done) == 2 and all(d["env"]["SLURM_RESTART_COUNT"] == "1" for d in done)
    assert done[0]["argv"] == ["--student", str(tmp_path / "student-init"),
                               "--cache", str(tmp_path / "cache"), "--out", str(run),
                               "--resume", "--steps", "5",
                               "--log-every", "1"]


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_sh_chains_three_jobs_and_waits(cluster, tmp_path):
    env = _job_env(tmp_path, WAIT="1", NODES="2", POLL_S="0.5")
    proc = _run(["bash", str(SLURM / "pipeline.sh")], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + _log(tmp_path)
    assert len(_records(tmp_path / "cache", "rank*.json")) == 2
    assert len(_records(tmp_path / "run", "done-rank*.json")) == 2
    (result,) = _records(tmp_path / "eval", "results.json")
    assert result["argv"][:2] == ["--model", str(tmp_path / "run" / "export")]
    # Each stage was its own job, submitted with --chdir to the repo.
    assert len({r["env"]["SLURM_JOB_ID"] for r in (*_records(tmp_path / "cache", "rank*.json"),
                                                   *_records(tmp_path / "run", "done-*.json"),
                                                   result)}) == 3


@pytest.mark.slurm
def test_pipeline_sh_failed_stage_cancels_the_rest_and_fails(cluster, tmp_path):
    env = _job_env(tmp_path, WAIT="1", FAKE_FAIL="cache", POLL_S="0.5")
    proc = _run(["bash", str(SLURM / "pipeline.sh")], env=env, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "sampledkd-cache FAILED exit 7:0" in proc.stdout, proc.stdout
    assert "sampledkd-eval CANCELLED" in proc.stdout, proc.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_pipeline_sh_local_without_slurm(tmp_path):
    """LOCAL=1: cache under the venv's mpiexec, distill under torchrun --standalone."""
    env = _job_env(tmp_path, LOCAL="1", NTASKS="2", NPROC_PER_NODE="2")
    proc = _run(["bash", str(SLURM / "pipeline.sh")], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r["rank"], r["size"]) for r in _records(tmp_path / "cache", "rank*.json")] == [(0, 2), (1, 2)]
    starts = _records(tmp_path / "run", "start0-rank*.json")
    assert [(s["rank"], s["world"], s["rank_sum"]) for s in starts] == [(0, 2, 1), (1, 2, 1)]
    assert len(_records(tmp_path / "eval", "results.json")) == 1
