"""Independent references shared by several test modules (no pipeline code inside)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np


def reference_windows(docs: list[str], tok, seq_len: int) -> np.ndarray:
    """Per-document encode (no special tokens) + EOS, concatenated, cut into windows of
    `seq_len`, the incomplete tail dropped: [n, seq_len] int64."""
    stream: list[int] = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    n = len(stream) // seq_len
    return np.asarray(stream[:n * seq_len], dtype=np.int64).reshape(n, seq_len)


def move_shard_outside(cache: Path, tmp_path: Path, index: int, entry: str) -> tuple[Path, Path, str]:
    """A copy of `cache` whose shard `index` lies outside it, in `tmp_path/outside`,
    byte-identical (its manifest sha256 and size still match), and whose manifest entry
    points at it as `../outside/NAME` (entry="relative") or by absolute path.
    Returns (the copy, the outside file, the entry written)."""
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    m = json.loads((bad / "manifest.json").read_text())
    s = m["shards"][index]
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / s["file"]
    shutil.move(bad / s["file"], target)
    data = target.read_bytes()
    assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    s["file"] = f"../outside/{target.name}" if entry == "relative" else str(target)
    (bad / "manifest.json").write_text(json.dumps(m))
    return bad, target, s["file"]
