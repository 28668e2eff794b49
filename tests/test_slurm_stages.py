"""The real stages through the real sbatch scripts on the local two-node SLURM cluster.

Start the cluster first: `bash scripts/slurm_cluster.sh start`. Without a reachable cluster
these tests skip, unless SAMPLEDKD_REQUIRE_SLURM=1 (CI), where they fail. Unlike
tests/test_slurm_cluster.py (stand-in stages), the jobs here run `pipeline.cache` itself
on a tiny teacher, one MPI rank per node (`srun --mpi=pmi2`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NODES = {"node1", "node2"}
T = 64
WINDOWS = 14
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "42", "answer", "question", "because"]


def _job_env(**extra: str) -> dict[str, str]:
    """This environment minus any enclosing job's SLURM_* variables, plus the script's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(REPO_DIR=str(REPO), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def _read_shards(cache: Path) -> dict[str, dict[str, bytes]]:
    """key -> {"tokens.u32", "kd.bin"} read with tarfile; a key twice is an error."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(cache.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in out.setdefault(key, {}), f"{key}.{ext} twice"
                out[key][ext] = tf.extractfile(m).read()
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_cache_sh_two_nodes_real_stage(cluster, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.tiny import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", vocab_size=4096, hidden=32, layers=1)
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, int(rng.integers(1, 50)))) for _ in range(120)]
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = AutoTokenizer.from_pretrained(teacher)
    stream = [t for d in docs for t in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]
    assert len(stream) // T >= WINDOWS
    common = dict(TEACHER=str(teacher), DATA=str(data), SEQ_LEN=str(T), SEED="3",
                  MAX_WINDOWS=str(WINDOWS), EXTRA_ARGS="--shard-samples 3 --batch-size 2")

    log = tmp_path / "cache-%j.out"
    cache = tmp_path / "cache"
    proc = subprocess.run(["sbatch", "--wait", "--nodes=2", f"--output={log}",
                           str(REPO / "slurm" / "cache.sh")],
                          env=_job_env(CACHE_DIR=str(cache), **common), capture_output=True,
                          text=True, timeout=900)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("cache-*.out"))
    assert proc.returncode == 0, f"job failed ({proc.returncode}): {proc.stderr}\n{logs}"

    m = json.loads((cache / "manifest.json").read_text())
    assert m["world_size"] == 2
    assert {r["node"] for r in m["ranks"].values()} == NODES, m["ranks"]
    assert all(r["finished"] for r in m["ranks"].values())
    samples = _read_shards(cache)
    windows = sorted(int(k.split("-")[1]) for k in samples)
    assert windows == list(range(WINDOWS)), "a window is missing or stored twice"
    for key, s in samples.items():
        rank, w = (int(x) for x in key.split("-"))
        assert rank == w % 2
        np.testing.assert_array_equal(np.frombuffer(s["tokens.u32"], "<u4"),
                                      stream[w * T:(w + 1) * T])

    # The same script without SLURM (one local process) writes byte-identical records.
    local = tmp_path / "local"
    proc = subprocess.run(["bash", str(REPO / "slurm" / "cache.sh")],
                          env=_job_env(CACHE_DIR=str(local), NTASKS="1", **common),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = {int(k.split("-")[1]): s for k, s in _read_shards(local).items()}
    two = {int(k.split("-")[1]): s for k, s in samples.items()}
    assert one.keys() == two.keys()
    for w in one:
        assert one[w] == two[w], f"window {w}: records differ between 2 nodes and 1 process"
