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
import re
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# teacher_parameters and teacher_weights (sha256 of every weight file) identify the teacher
# by its weights: the same path holding another model is refused, not mixed into the cache.
HEADER_KEYS = ("format_version", "teacher", "teacher_parameters", "teacher_weights",
               "teacher_dtype", "vocab_size",
               "tokenizer_fingerprint", "seq_len",
               "num_classes", "id_bits", "w_bits", "sampler", "sampler_args",
               "teacher_temperature", "seed", "dataset", "dataset_fingerprint", "max_windows",
               "weight_codebook", "entropy_codebook", "shard_samples", "chunk_positions")


def part_name(rank: int) -> str:
    return f"manifest.r{rank:04d}.json"


def shard_name(rank: int, n: int) -> str:
    return f"cache-r{rank:04d}-{n:06d}.tar"


SHARD_FILE_RULE = ("a shard `file` must be a plain file name in the cache directory, of the "
                   "form cache-r{rank:04d}-{n:06d}.tar the cache stage writes (no '/', no '\\', "
                   "not '.' or '..', not absolute, not empty)")
_SHARD_FILE_RE = re.compile(r"cache-r[0-9]{4}-[0-9]{6}\.tar")


def shard_path(cache_dir: str | Path, name: object, source: str = MANIFEST) -> Path:
    """`cache_dir / name` for a shard `file` entry of `source` (a manifest in `cache_dir`),
    after checking that it names a file inside `cache_dir` (SHARD_FILE_RULE). A manifest
    is data: an entry like `../x.tar` or `/etc/passwd` must never make a reader, a
    verifier or a repair open, hash or move a file elsewhere. Checks the name only (opens
    nothing); raises ValueError naming the manifest, the entry and the rule."""
    if not isinstance(name, str):
        problem = f"is not a string but {type(name).__name__}"
    elif not name:
        problem = "is empty"
    elif name.startswith(("/", "\\")) or Path(name).is_absolute():
        problem = "is an absolute path"
    elif "/" in name or "\\" in name:
        problem = "is a path with a directory part, not a file name"
    elif name in (".", ".."):
        problem = "is a directory reference"
    elif not _SHARD_FILE_RE.fullmatch(name):
        problem = "is not a shard name the cache stage writes"
    else:
        return Path(cache_dir) / name
    raise ValueError(f"{Path(cache_dir) / source}: shard entry {name!r} {problem}; "
                     f"{SHARD_FILE_RULE}. The manifest was edited or damaged: restore the one "
                     "the cache stage wrote, or re-cache into a new directory")


QUARANTINE = "quarantine"
"""Subfolder of a cache directory into which `tools/inspect_cache.py --verify --quarantine`
moves damaged shards (nothing is deleted); their names stay used (next_shard_number)."""


def repair_command(out: Path | str) -> str:
    """The command that moves damaged shards aside; the stage's errors name it."""
    return f"python tools/inspect_cache.py {out} --verify --quarantine"


def shard_number(name: str, rank: int) -> int | None:
    """n of `cache-r{rank:04d}-{n:06d}.tar` (or `.tar.tmp`, `.tar.*`); None for other names."""
    prefix = f"cache-r{rank:04d}-"
    if not name.startswith(prefix):
        return None
    digits, _, rest = name[len(prefix):].partition(".")
    if not (digits.isascii() and digits.isdigit()) or not (rest == "tar" or rest.startswith("tar.")):
        return None
    return int(digits)


def next_shard_number(out: Path, rank: int, part: dict) -> int:
    """1 + the highest shard number `rank` has ever used, counting its recorded entries, the
    part's `next_shard` and `quarantined` names, and its files (finished or partial) in `out`
    and in `out/quarantine/`. A shard name is never reused: a name once written (read by a
    trainer, copied, quarantined) always means the same bytes."""
    names = [s["file"] for s in part.get("shards", [])] + list(part.get("quarantined", []))
    names += [f.name for d in (out, out / QUARANTINE) if d.is_dir()
              for f in d.glob(f"cache-r{rank:04d}-*")]
    used = [n for n in (shard_number(x, rank) for x in names) if n is not None]
    return max([int(part.get("next_shard", 0))] + [n + 1 for n in used])


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
        if a != b and k == "teacher_weights":
            diffs.append(teacher_weights_diff(a, b, header.get("teacher")))
        elif a != b:
            sa, sb = json.dumps(a)[:120], json.dumps(b)[:120]
            diffs.append(f"{k}: cache has {sa}, this run has {sb}")
    return diffs


def teacher_weights_diff(cached: dict | None, now: dict | None, teacher: str | None) -> str:
    """`teacher_weights` ({file: sha256}) of the cache vs this run, naming each file that differs."""
    if not isinstance(cached, dict) or not isinstance(now, dict):
        return (f"teacher_weights: cache has {json.dumps(cached)[:120]}, this run has "
                f"{json.dumps(now)[:120]} (a cache written before teacher weights were recorded, "
                "or a teacher whose weight files cannot be found, cannot be checked against "
                "this teacher)")
    changed = []
    for name in sorted(set(cached) | set(now)):
        a, b = cached.get(name), now.get(name)
        if a == b:
            continue
        if a is None:
            changed.append(f"{teacher}/{name} is new (the cache's teacher had no such file)")
        elif b is None:
            changed.append(f"{teacher}/{name} is gone (the cache's teacher had it, sha256 "
                           f"{a[:16]}...)")
        else:
            changed.append(f"{teacher}/{name} has sha256 {b[:16]}..., the cache's teacher "
                           f"had {a[:16]}...")
    return ("teacher_weights: the teacher's weights differ from the cache's (another model at "
            "the same path?): " + "; ".join(changed))


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


def cache_identity(m: dict) -> str:
    """sha256 of what a cache's targets depend on: its header and every shard's name and
    sha256. Equal for the same cache wherever it is moved or copied (and after a rerun of
    the stage that only re-merged its parts); different after any re-cache, repair or edit
    that changes a shard. Training checkpoints record it, and a resume compares it."""
    body = {"header": {k: m.get(k) for k in HEADER_KEYS},
            "shards": [[s["file"], s["sha256"]] for s in m["shards"]]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
