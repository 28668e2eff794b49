"""slurm/cache.sh then slurm/distill.sh for real on the local two-node cluster (CPU, gloo).

`sbatch --wait --nodes=2` runs the real stages (not the stand-ins of tests/slurm_jobs/):
the cache over MPI (one rank per node, `srun --mpi=pmi2`), then one torchrun per node
rendezvousing on node1, ZeRO-3 over 2 ranks with ds_configs/zero3_test.json, export.
Start the cluster first (`bash scripts/slurm_cluster.sh start`); without one the test
skips, unless SAMPLEDKD_REQUIRE_SLURM=1, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _sbatch(script: str, env: dict, log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sbatch", "--wait", "--nodes=2", f"--output={log}", str(REPO / "slurm" / script)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slurm
@pytest.mark.dist
@pytest.mark.slow
def test_sbatch_cache_then_distill_on_two_nodes_exports(cluster, tmp_path):
    from pipeline.demo.tiny import build_tiny_model

    texts = [f"The quick brown fox {i} jumps over the lazy dog, {3 * i} times." for i in range(300)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kw = dict(arch="llama", hidden=32, layers=1, heads=4, texts=texts)
    teacher = build_tiny_model(tmp_path / "teacher", seed=0, **kw)
    student = build_tiny_model(tmp_path / "student", seed=1, **kw)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TEACHER=str(teacher), STUDENT=str(student),
               DATA=str(tmp_path / "data.jsonl"), CACHE_DIR=str(tmp_path / "cache"),
               RUN_DIR=str(tmp_path / "run"), SEQ_LEN="64", MAX_WINDOWS="32", STEPS=str(STEPS),
               DS_CONFIG="ds_configs/zero3_test.json", UNIT_BYTES="3000",
               EXTRA_ARGS="--shard-samples 4")
    # The rest are the pipeline's defaults (the scripts pass no flag whose variable is unset);
    # one worker per CPU node (NPROC_PER_NODE unset, no GPUs).
    env.pop("NPROC_PER_NODE", None)
    env["MICRO_BATCH"] = "2"
    proc = _sbatch("cache.sh", env, tmp_path / "cache.out")
    assert proc.returncode == 0, proc.stderr + (tmp_path / "cache.out").read_text()[-4000:]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["samples"] == 32
    (ranks,) = manifest["launches"].values()                   # both MPI ranks cached units
    assert manifest["world_size"] == 2 and all(r["units"] >= 1 for r in ranks.values()), ranks

    env["EXTRA_ARGS"] = "--checkpoint-every 2"
    proc = _sbatch("distill.sh", env, tmp_path / "distill.out")
    log = (tmp_path / "distill.out").read_text()
    assert proc.returncode == 0, proc.stderr + log[-6000:]
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    micro = json.loads((run / "config.json").read_text())["micro_batch"]
    assert all(len(r["keys"]) == 2 * micro for r in recs)    # a global batch from 2 ranks
    assert (run / "ckpt" / "latest").read_text().strip() == f"step{STEPS:08d}"
    meta = json.loads((run / "ckpt" / f"step{STEPS:08d}" / "sampledkd_meta.json").read_text())
    assert meta["world_size"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "export")
    assert model.config.vocab_size == manifest["vocab_size"]
