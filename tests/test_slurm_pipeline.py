"""`slurm/pipeline.sh` on the local two-node SLURM cluster: cache -> distill -> eval as three
real jobs chained with afterok, tiny models, CPU/gloo. The test fails if any job fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_pipeline_sh_runs_three_chained_jobs(cluster, tmp_path):
    from pipeline.demo.tiny import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", "llama", hidden=32, layers=1, seed=0)
    student = build_tiny_model(tmp_path / "student", "llama", hidden=32, layers=1, seed=1)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"Document {i}: the quick brown fox jumps over "
                                        f"the lazy dog {i} times, because {i * 7} is a number."}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, TEACHER=str(teacher), STUDENT=str(student), DATA=str(data),
               CACHE_DIR=str(tmp_path / "cache"), RUN_DIR=str(tmp_path / "run"),
               EVAL_DIR=str(tmp_path / "eval"), SEQ_LEN="64", MAX_WINDOWS="16", STEPS="2",
               MICRO_BATCH="2", SELECT="topk", DS_CONFIG="ds_configs/zero3_test.json",
               TASKS="quick", EVAL_DATA_DIR=str(REPO / "pipeline/stage3_evaluate/tasks/fixtures"), LIMIT="1",
               NODES="2", WAIT="1", POLL_S="1", LOG_DIR=str(tmp_path / "logs"),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               CACHE_ARGS="--shard-samples 4 --unit-bytes 1500")
    proc = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.out")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs

    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["samples"] == 16
    keys = []
    import tarfile
    for s in manifest["shards"]:
        with tarfile.open(tmp_path / "cache" / s["file"]) as t:
            keys += sorted({m.name.split(".")[0] for m in t.getmembers()})
    assert len(keys) == len(set(keys)) == 16                               # each window once
    by_unit = {u["unit"]: u["windows"] for u in manifest["units"]}
    assert sorted(keys) == sorted(f"u{u:07d}-w{k:07d}" for u, n in by_unit.items() for k in range(n))
    (ranks,) = manifest["launches"].values()
    assert sorted(ranks) == ["0", "1"] and all(r["units"] >= 1 for r in ranks.values())  # two ranks
    recs = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(recs) == 2
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {"arc_easy", "piqa", "hellaswag"} <= set(res["results"])
