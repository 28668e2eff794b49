"""The tiny cache and the independent helpers shared by tests/test_inspect_cache.py (the
report) and tests/test_inspect_cache_verify.py (--verify, --quarantine, version 1): every
expected number is recomputed from the files themselves (os.stat, the tar members, the 24-bit
records decoded by hand), never taken from the tool's or the format's own code.

`shared_stage` runs the cache stage once per session, whichever module asks first; each
module wraps it in its own `stage` and `cache` fixtures, and no test writes into it (a test
that damages a cache copies it first).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "inspect_cache.py"
T, U, WINDOWS, SHARD_SAMPLES, UNIT_BYTES = 64, 12, 10, 3, 1000
TEACHER_LOGITS = 512            # the teacher's output layer, padded past its tokenizer's classes
WORDS = ("the quick brown fox jumps over lazy dog knowledge distillation teacher student "
         "number answer question because").split()
SHARD_NAME = re.compile(r"^cache-u(\d{7})-l(\d{6})-(\d{4})\.tar$")   # docs/CACHE_FORMAT.md
KEY = re.compile(r"^u(\d{7})-w(\d{7})$")

_SHARED: dict = {}


def shared_stage(tmp_path_factory) -> SimpleNamespace:
    """10 windows of 64 tokens from a tiny llama whose 512 logits are padded past its
    tokenizer's classes (the cache's V); teacher temperature 0.1 spreads the entropies over
    0 .. ln V; the rskd sampler with 14 draws pads most positions (fewer than U=12 distinct
    draws) and truncates some (more than 12). Units of ~1000 bytes of jsonl cut the corpus
    into several units, and 3 windows per shard give some units more than one shard.
    `args`: the stage's arguments without --out (a rerun uses them). Built once per session."""
    if "stage" in _SHARED:
        return _SHARED["stage"]
    from pipeline.stage1_cache.run import main as cache_main
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("inspect")
    teacher = build_tiny_model(root / "teacher", arch="llama", hidden=32,
                               vocab_size=TEACHER_LOGITS)
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(60):
            words = rng.choice(WORDS, size=int(rng.integers(20, 200)))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    out = root / "cache"
    args = ["--teacher", str(teacher), "--data", str(root / "data.jsonl"), "--seq-len", str(T),
            "--max-windows", str(WINDOWS), "--shard-samples", str(SHARD_SAMPLES),
            "--unit-bytes", str(UNIT_BYTES), "--batch-size", "2", "--sampler", "rskd",
            "--rskd-draws", "14", "--teacher-temperature", "0.1"]
    cache_main([*args, "--out", str(out)])
    _SHARED["stage"] = SimpleNamespace(cache=out, args=args, teacher=teacher)
    return _SHARED["stage"]


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def read_json(*args) -> dict:
    proc = run_tool(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def shard_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("cache-u*.tar"))


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {"tokens.u32": bytes, "kd.bin": bytes}} of one shard, in member order (tarfile)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def all_samples(cache: Path, files: list[Path] | None = None) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for p in files if files is not None else shard_files(cache):
        for key, members in tar_samples(p).items():
            assert key not in out, f"{key} in two shards"
            out[key] = members
    return out


def decoded_records(cache: Path, V: int, files: list[Path] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """(entropy codes [N], non-sentinel ids per position [N], samples) decoded by hand:
    bytes 3k..3k+2 of a position are record k (LE), its low bit_length(V) bits the id."""
    id_bits = V.bit_length()
    sentinel = (1 << id_bits) - 1
    ecodes, distinct, samples = [], [], 0
    for path in files if files is not None else shard_files(cache):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".kd.bin"):
                    samples += 1
                    a = np.frombuffer(tf.extractfile(m).read(), np.uint8).reshape(T, 3 * U + 1)
                    r = a[:, :3 * U].reshape(T, U, 3).astype(np.int64)
                    ids = (r[..., 0] + 256 * r[..., 1] + 65536 * r[..., 2]) % (1 << id_bits)
                    distinct.append((ids != sentinel).sum(1))
                    ecodes.append(a[:, 3 * U].astype(np.int64))
    return np.concatenate(ecodes), np.concatenate(distinct), samples


def units_on_disk(cache: Path) -> dict[int, list[tuple[str, list[str]]]]:
    """{unit: [(shard name, its keys), ...] in shard order}, from the names and tar members."""
    out: dict[int, list] = {}
    for p in shard_files(cache):
        m = SHARD_NAME.match(p.name)
        assert m, p.name
        out.setdefault(int(m.group(1)), []).append((p.name, list(tar_samples(p))))
    return out


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> SimpleNamespace:
    """The tiny cache of inspect_tool (built once per session) and the stage's arguments."""
    return shared_stage(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(stage) -> Path:
    return stage.cache
