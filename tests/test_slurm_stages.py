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

from tests.hooks import hook_env

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


def _unit_documents(data: Path, plan: dict) -> dict[int, list[str]]:
    """Independent reference of the unit plan of one .jsonl file: unit u's documents are the
    lines that start in its byte range [start, end)."""
    raw = data.read_bytes()
    starts, pos = [], 0
    for line in raw.splitlines(keepends=True):
        starts.append((pos, line))
        pos += len(line)
    return {u["unit"]: [json.loads(line)["text"] for at, line in starts
                        if u["start"] <= at < u["end"] and line.strip()]
            for u in plan["units"]}


@pytest.mark.slurm
@pytest.mark.slow
def test_cache_sh_two_nodes_then_one_node_resumes_the_same_cache(cluster, tmp_path):
    """sbatch on 2 nodes, cancelled once some units are cached; a second submission with one
    task resumes the same cache (its units, not the ranks, define the work); the result
    equals one local process's records, key by key, and each unit's tokens equal a
    tokenization of exactly its documents."""
    import time

    from transformers import AutoTokenizer

    from pipeline.demo.tiny import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", vocab_size=4096, hidden=32, layers=1)
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, int(rng.integers(1, 50)))) for _ in range(120)]
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = AutoTokenizer.from_pretrained(teacher)
    common = dict(TEACHER=str(teacher), DATA=str(data), SEQ_LEN=str(T), SEED="3",
                  UNIT_BYTES="1500", LEASE_S="2", EXTRA_ARGS="--shard-samples 3 --batch-size 2")

    log = tmp_path / "cache-%j.out"
    cache = tmp_path / "cache"
    first = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={log}",
                            str(REPO / "slurm" / "cache.sh")],
                           env=hook_env(_job_env(CACHE_DIR=str(cache), LAUNCH_ATTEMPTS="1",
                                                 SAMPLEDKD_TEST_SLOW_RANK="*:0.5", **common)),
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    job = first.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 600
    while len(list((cache / "ledger").glob("unit-*.done.json"))) < 2:
        assert time.monotonic() < deadline, "no unit cached by the 2-node job"
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True, timeout=60)
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    before = {p.name: p.read_bytes() for p in cache.glob("cache-u*.tar")}
    assert not (cache / "manifest.json").exists(), "the 2-node job finished before the cancel"

    proc = subprocess.run(["sbatch", "--wait", "--nodes=1", f"--output={log}",
                           str(REPO / "slurm" / "cache.sh")],
                          env=_job_env(CACHE_DIR=str(cache), **common), capture_output=True,
                          text=True, timeout=900)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("cache-*.out"))
    assert proc.returncode == 0, f"job failed ({proc.returncode}): {proc.stderr}\n{logs}"

    m = json.loads((cache / "manifest.json").read_text())
    assert m["world_size"] == 1 and len(m["launches"]) == 2, m["launches"]
    nodes = {r["node"] for ranks in m["launches"].values() for r in ranks.values()}
    assert nodes <= NODES and len(nodes) >= 1
    kept = {s["file"] for s in m["shards"]}
    for name, data_before in before.items():     # finished before the cancel: kept, unchanged
        if name in kept:
            assert (cache / name).read_bytes() == data_before, name
    samples = _read_shards(cache)
    plan = json.loads((cache / "units.json").read_text())
    unit_docs = _unit_documents(data, plan)
    for u, udocs in unit_docs.items():
        stream = [t for d in udocs for t in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]
        want = [stream[k * T:(k + 1) * T] for k in range(len(stream) // T)]
        got = sorted((k, s) for k, s in samples.items() if k.startswith(f"u{u:07d}-"))
        assert [k for k, _ in got] == [f"u{u:07d}-w{k:07d}" for k in range(len(want))], u
        for (_, s), w in zip(got, want):
            np.testing.assert_array_equal(np.frombuffer(s["tokens.u32"], "<u4"), w)

    # The same script without SLURM (one local process) writes byte-identical records.
    local = tmp_path / "local"
    proc = subprocess.run(["bash", str(REPO / "slurm" / "cache.sh")],
                          env=_job_env(CACHE_DIR=str(local), NTASKS="1", **common),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = _read_shards(local)
    assert one.keys() == samples.keys()
    for key in one:
        assert one[key] == samples[key], f"{key}: records differ between the resumed job and 1 process"
