"""File helpers every stage uses: a file's sha256 and an atomic JSON write."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file, fsync, rename).

    `indent=None` writes compact JSON (the per-rank parts, rewritten after every shard)."""
    # Host and pid and a random part: two hosts writing one shared directory never collide.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{os.uname().nodename}.{os.urandom(4).hex()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
