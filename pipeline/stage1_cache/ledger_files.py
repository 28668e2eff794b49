"""The ledger's files (pipeline.stage1_cache.ledger has the protocol): names, statuses, atomic writes.

Everything the launch (pipeline.stage1_cache.lease) and claim (pipeline.stage1_cache.ledger) logic does to OUT/ledger/
goes through these: the canonical file names and the regexes that recognise them, the
statuses of a launch file, creation of a complete file under a new name (`write_new`:
O_CREAT|O_EXCL; `link_new`: os.link of a complete temporary file), `replace_json` (a
complete temporary file, then os.replace), and reads that tell a missing file from one
that does not parse (`load_json`), retrying a stale NFS handle. No file is written in place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any, Callable

from pipeline.common.errors import Refusal

LEDGER_DIR = "ledger"
ENDED = ("finished", "failed", "refused", "dead")
"""Statuses of a launch that has stopped for good: it never counts as live again."""

LAUNCH_RE = re.compile(r"launch-([0-9]{6,})\.json")
CLAIM_RE = re.compile(r"unit-([0-9]{7,})\.claim")
DONE_RE = re.compile(r"unit-([0-9]{7,})\.done\.json")
TMP_RE = re.compile(r"\..+\.L([0-9]{6,})\.[A-Za-z0-9_-]*\.[0-9]+\.[0-9a-f]+\.tmp")
# errors of os.link on filesystems without hard links: fall back to O_CREAT|O_EXCL
NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV,
            errno.EMLINK}


class LaunchRefused(Refusal):
    """A new launch refused to start because another launch on the same cache is live."""


class LaunchEnded(RuntimeError):
    """This launch has ended (stopped, or declared dead by a later launch): stop working."""


def ledger_dir(out: str | Path) -> Path:
    return Path(out) / LEDGER_DIR


def launch_name(n: int) -> str:
    return f"launch-{n:06d}.json"


def alive_name(n: int) -> str:
    return f"launch-{n:06d}.alive"


def claim_name(u: int) -> str:
    return f"unit-{u:07d}.claim"


def done_name(u: int) -> str:
    return f"unit-{u:07d}.done.json"


def name_index(regex: re.Pattern, name: str, fmt: Callable[[int], str]) -> int | None:
    """The number in a canonical ledger file name (`fmt(number) == name`), else None."""
    m = regex.fullmatch(name)
    if m is None:
        return None
    i = int(m.group(1))
    return i if fmt(i) == name else None


def host_name() -> str:
    return socket.gethostname()


def tmp_name(target: str, launch: int) -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "_", host_name())[:64]
    return f".{target}.L{launch:06d}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def write_new(path: Path, data: bytes) -> None:
    """Create `path` (must not exist), write `data`, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(d: Path, target: str, launch: int, obj: Any) -> Path:
    """A complete temporary file holding `obj` as JSON, named for `launch`."""
    data = json.dumps(obj).encode()  # serialise first: a bad record touches no file
    tmp = d / tmp_name(target, launch)
    try:
        write_new(tmp, data)
    except BaseException:
        unlink_if_present(tmp)
        raise
    return tmp


def replace_json(d: Path, name: str, launch: int, obj: Any) -> None:
    """Write d/name atomically: a complete temporary file, then os.replace."""
    tmp = write_tmp(d, name, launch, obj)
    try:
        os.replace(tmp, d / name)
    except BaseException:
        unlink_if_present(tmp)
        raise


def link_new(tmp: Path, target: Path) -> bool:
    """Give the complete file `tmp` the name `target` if no file has it; True if we did.
    st_nlink tells a real collision from a retransmitted link that succeeded (NFS)."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return os.stat(tmp).st_nlink > 1


def unlink_if_present(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_bytes(path: Path) -> bytes | None:
    """The bytes of `path`, None if it does not exist (retries a stale NFS handle)."""
    for attempt in range(3):
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == 2:
                raise
    return None


def load_json(path: Path) -> tuple[str, Any]:
    """("missing", None), ("bad", reason) or ("ok", the JSON object) for a ledger file."""
    raw = read_bytes(path)
    if raw is None:
        return "missing", None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return "bad", f"not JSON ({e}; {len(raw)} bytes)"
    if not isinstance(obj, dict):
        return "bad", f"not a JSON object but {type(obj).__name__}"
    return "ok", obj


def as_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def launch_status(d: Path, m: int) -> tuple[str, dict]:
    """(status, launch file) of launch m; status "missing"/"unreadable" when there is none."""
    st, obj = load_json(d / launch_name(m))
    if st != "ok":
        return ("missing" if st == "missing" else "unreadable"), {}
    return str(obj.get("status", "starting")), obj


def describe_launch(m: int, info: dict) -> str:
    return (f"launch {m} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"world size {info.get('world_size', '?')}, status {info.get('status', '?')})")
