"""The demo's asset cache on disk: checksummed artifact folders, assets.json, the lock.

An artifact (teacher, corpus, student-L...) is a folder built by a builder function into
`<cache>/.tmp-<name>` and renamed to `<cache>/<name>` only when complete; `assets.json`
records its build params, the sha256 of every file and the versions used, so `ensure`
reuses a matching artifact and rebuilds a changed, corrupted or half-written one. What the
artifacts are and how they are built is pipeline.demo.assets'.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from pipeline.common.files import sha256_file

log = logging.getLogger("sampledkd.assets")

MANIFEST = "assets.json"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-"


class AssetError(RuntimeError):
    """An asset could not be fetched or built; the message says what to do."""


def hash_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`, sorted."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def check_tree(root: Path, files: dict[str, str]) -> list[str]:
    """Problems of `root` against its recorded {path: sha256}; empty if it matches."""
    if not root.is_dir():
        return ["folder missing"]
    problems = []
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"file {rel} missing")
        elif sha256_file(p) != want:
            problems.append(f"file {rel} sha256 mismatch")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    problems += [f"unexpected file {rel}" for rel in sorted(present - set(files))]
    return problems


def load_manifest(cache: Path) -> dict:
    """`<cache>/assets.json`, or an empty manifest (everything gets rebuilt) if unusable."""
    path = cache / MANIFEST
    empty = {"format": MANIFEST_FORMAT, "artifacts": {}}
    if not path.exists():
        return empty
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        log.warning("%s is not valid JSON (%s); every asset will be checked by rebuilding", path, e)
        return empty
    if m.get("format") != MANIFEST_FORMAT:
        log.warning("%s has format %r, expected %d; rebuilding all assets",
                    path, m.get("format"), MANIFEST_FORMAT)
        return empty
    return m


def save_manifest(cache: Path, manifest: dict) -> None:
    tmp = cache / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / MANIFEST)  # atomic: a crash leaves the old or the new manifest


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "safetensors", "gguf", "mwparserfromhell", "pip"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


@contextlib.contextmanager
def locked(cache: Path):
    """One preparer per cache at a time (so no run deletes another's temp dirs)."""
    with open(cache / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s; waiting for it", cache)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure(cache: Path, manifest: dict, name: str, params: dict, force: bool,
            build: Callable[[Path], None]) -> Path:
    """Reuse artifact `name` if its recorded params and checksums match, else rebuild it.

    The builder writes into `<cache>/.tmp-<name>`; only a complete build is renamed to
    `<cache>/<name>` and recorded in the manifest.
    """
    target = cache / name
    entry = manifest["artifacts"].get(name)
    if not force and entry is not None:
        if entry["params"] != params:
            log.info("asset %s was built with %s, now %s: rebuilding", name, entry["params"], params)
        else:
            problems = check_tree(target, entry["files"])
            if not problems:
                log.info("asset %s ok (%d files verified)", name, len(entry["files"]))
                return target
            log.warning("asset %s corrupted: %s, rebuilding", name, "; ".join(problems))
    elif not force and target.exists():
        log.warning("asset %s has no checksums in %s (interrupted run?), rebuilding", name, MANIFEST)
    tmp = cache / f"{TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    build(tmp)
    files = hash_tree(tmp)
    if target.exists():
        old = cache / f"{TMP_PREFIX}old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        shutil.rmtree(old)
    tmp.rename(target)
    seconds = round(time.perf_counter() - t0, 1)
    manifest["artifacts"][name] = {"params": params, "files": files, "seconds": seconds,
                                   "versions": versions()}
    save_manifest(cache, manifest)
    size = sum((target / f).stat().st_size for f in files)
    log.info("asset %s built in %.1f s: %d files, %.1f MB", name, seconds, len(files), size / 1e6)
    return target


def stale_temps(cache: Path) -> list[Path]:
    """Temp files and folders of builds or downloads that never finished."""
    return sorted(cache.glob(f"{TMP_PREFIX}*")) + sorted(cache.glob(f"wheels/{TMP_PREFIX}*"))
