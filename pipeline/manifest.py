"""The cache directory's manifest: settings header, per-rank parts, merge, and checks.

Layout of a cache directory:
    manifest.json              merged by rank 0 at the end of a run (the reader's entry point)
    manifest.r{rank:04d}.json  each rank's part, rewritten atomically after every shard
    cache-r{rank:04d}-{n:06d}.tar   shards; written as `*.tar.tmp` and renamed when complete

The header holds only what determines the records (teacher, tokenizer, data, T, U, sampler,
codebooks, seed): training settings never enter it, so changing a training knob never
invalidates a cache. A run into a directory whose header differs is refused, naming the
fields that differ; so is a restart with a different number of ranks (each part records the
world size that decided which windows its rank holds).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
HEADER_KEYS = ("format_version", "teacher", "teacher_dtype", "vocab_size",
               "tokenizer_fingerprint", "seq_len",
               "num_classes", "id_bits", "w_bits", "sampler", "sampler_args",
               "teacher_temperature", "seed", "dataset", "dataset_fingerprint", "max_windows",
               "weight_codebook", "entropy_codebook", "shard_samples", "chunk_positions")


def part_name(rank: int) -> str:
    return f"manifest.r{rank:04d}.json"


def shard_name(rank: int, n: int) -> str:
    return f"cache-r{rank:04d}-{n:06d}.tar"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file, fsync, rename).

    `indent=None` writes compact JSON (the per-rank parts, rewritten after every shard)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from e


def header_diff(existing: dict, header: dict) -> list[str]:
    """Human-readable differences between two headers (only the keys that determine records)."""
    diffs = []
    for k in HEADER_KEYS:
        a, b = existing.get(k), header.get(k)
        if a != b:
            sa, sb = json.dumps(a)[:120], json.dumps(b)[:120]
            diffs.append(f"{k}: cache has {sa}, this run has {sb}")
    return diffs


def check_compatible(out: Path, header: dict, rank: int) -> dict | None:
    """Refuse to mix runs: compare `header` with the merged manifest and this rank's part.

    Returns this rank's existing part (to resume from) or None.
    """
    # The merged manifest carries the header's keys at its top level; a part, under "header".
    for f, key in ((out / MANIFEST, None), (out / part_name(rank), "header")):
        if f.exists():
            existing = read_json(f)
            diffs = header_diff(existing if key is None else existing[key], header)
            if diffs:
                raise ValueError(
                    f"--out {out} holds a different cache ({f.name}); refusing to mix:\n  "
                    + "\n  ".join(diffs) + "\nUse a new --out directory (or delete this one).")
    part = out / part_name(rank)
    return read_json(part) if part.exists() else None


def check_world(out: Path, world_size: int) -> None:
    """Refuse to resume with another number of ranks.

    Window w belongs to rank w % world, and a restarted rank skips as many of its windows as
    its part records: with another world size those would be other windows (some cached
    twice, some never), and parts of ranks >= world would be silently dropped.
    """
    paths = sorted(out.glob("manifest.r[0-9][0-9][0-9][0-9].json"))
    if (out / MANIFEST).exists():
        paths.append(out / MANIFEST)
    for f in paths:
        got = read_json(f).get("world_size")
        if got != world_size:
            raise ValueError(
                f"--out {out}: {f.name} was written by a run with {got} rank(s), this run has "
                f"{world_size}; resume with {got} rank(s), or use a new --out directory")


def merge_parts(header: dict, parts: list[dict]) -> dict:
    """Rank 0: one manifest from every rank's part (shards in rank, then shard order)."""
    shards = [s for p in sorted(parts, key=lambda p: p["rank"]) for s in p["shards"]]
    stats: dict[str, Any] = {}
    for p in parts:
        for k, v in p["stats"].items():
            if isinstance(v, list):
                stats[k] = [a + b for a, b in zip(stats[k], v)] if k in stats else list(v)
            else:
                stats[k] = stats.get(k, 0) + v
    return {
        **header,
        "world_size": len(parts),
        "ranks": {str(p["rank"]): {"shards": [s["file"] for s in p["shards"]],
                                   "finished": p["finished"], "node": p.get("node")}
                  for p in parts},
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "positions": sum(s["positions"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "stats": stats,
    }


def load_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        parts = sorted(Path(cache_dir).glob("manifest.r*.json"))
        hint = (f" ({len(parts)} rank part(s) exist: the cache run did not finish; rerun "
                "`python -m pipeline.cache` with the same arguments to complete it)") if parts else ""
        raise FileNotFoundError(f"{path} does not exist{hint}")
    m = read_json(path)
    if m.get("format_version") != 1:
        raise ValueError(f"{path}: format_version {m.get('format_version')!r}; this reader knows 1")
    return m
