"""What a launch of the cache stage does in OUT before any rank caches a unit.

Rank 0 (`setup_launch`): refuse a corpus changed since the unit plan or a directory holding
another cache, begin the launch in the ledger (pipeline.ledger), plan the units on the first
launch (`plan_with_cap`: --max-windows cuts the plan), write header.json and units.json,
take over the units of dead launches and delete the shards no done record names. Every rank
(`verify_done`): check its share of the done units' shards against their done records.
The stage itself (pipeline.cache) calls these; `cfg` is its CacheConfig.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipeline.data import DataSpec
from pipeline.distributed import DistInfo, log
from pipeline.ledger import Ledger, done_name, launch_name, ledger_dir
from pipeline.manifest import (HEADER, UNITS, check_compatible, read_json, sha256_file,
                               shard_path, write_json_atomic)
from pipeline.units import UnitReader, check_plan, plan_units, unit_windows


def plan_with_cap(spec: DataSpec, unit_bytes: int, tok, seq_len: int, max_windows: int | None,
                  windows_of=None) -> dict:
    """The unit plan; with --max-windows N, cut to the first N windows in plan order.

    Window counts are known only after tokenizing, so for a cap rank 0 tokenizes units in
    order until N windows are reached (reading only that prefix: a cap is for tests, demos
    and slices of a corpus) and records the last unit's `max_windows`. `windows_of(reader)`
    gives a unit's windows (default: its documents' text windows; the stage passes its own,
    which packs conversations for --data-format chat)."""
    plan = plan_units(spec, unit_bytes)
    if max_windows is None:
        return plan
    if windows_of is None:
        def windows_of(reader):
            return unit_windows(reader.documents(), tok, seq_len)
    total = 0
    for i, u in enumerate(plan["units"]):
        n = sum(1 for _ in windows_of(UnitReader(spec, plan, u["unit"])))
        if total + n >= max_windows:
            plan["units"] = plan["units"][:i + 1]
            plan["units"][i]["max_windows"] = max_windows - total
            return plan
        total += n
    return plan


def corpus_fingerprint(plan: dict) -> str:
    """sha256 of the planned files' paths, sizes and mtimes (no file is read): the header's
    dataset fingerprint. Each unit's bytes are hashed by the rank that caches it."""
    files = [[f["path"], f["size"], f["mtime_ns"]] for f in plan["files"]]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def setup_launch(cfg, out: Path, header: dict, tok, info: DistInfo, windows_of=None):
    """Rank 0: begin this launch, then refuse a changed corpus or a different cache, plan the
    units (first launch) and take over the units of dead launches. Returns (header, plan,
    launch). The checks run before the launch begins (a refused run leaves the directory
    as it was) and again after it: the first writes of header.json and units.json come
    after the lease, so two jobs started at once on one directory cannot both write them."""
    _check_existing(cfg, out, header)
    launch = Ledger.begin_launch(out, info.world_size, cfg.lease_s, log=lambda m: log(m, info))
    try:
        header, plan = _plan_and_take_over(cfg, out, header, tok, info, launch.number, windows_of)
    except BaseException as e:
        if info.world_size == 1:    # several ranks: the job is aborted, the heartbeat dies with it
            launch.stop("failed", reason=f"{type(e).__name__}: {e}"[:500])
        raise
    return header, plan, launch


def _check_existing(cfg, out: Path, header: dict) -> tuple[dict, dict | None]:
    """Read-only: refuse a corpus changed since the plan (naming the file) or a directory
    holding another cache. Returns (header with the corpus fingerprint, the plan or None)."""
    plan = read_json(out / UNITS) if (out / UNITS).exists() else None
    if plan is not None:
        check_plan(cfg.data_spec, plan)            # names the file that changed
    files = plan if plan is not None else plan_units(cfg.data_spec, cfg.unit_bytes)
    header = {**header, "dataset_fingerprint": corpus_fingerprint(files)}
    check_compatible(out, header)
    return header, plan


def _plan_and_take_over(cfg, out: Path, header: dict, tok, info: DistInfo,
                        launch: int, windows_of=None) -> tuple[dict, dict]:
    header, plan = _check_existing(cfg, out, header)      # again, now under the lease
    if plan is None:
        plan = plan_with_cap(cfg.data_spec, cfg.unit_bytes, tok, cfg.seq_len, cfg.max_windows,
                             windows_of)
        if not plan["units"]:
            raise ValueError(f"--data {cfg.data}: no documents to cache (the corpus is empty)")
        write_json_atomic(out / UNITS, plan)
    if not (out / HEADER).exists():
        write_json_atomic(out / HEADER, header)
    ledger = Ledger(out, len(plan["units"]), launch, 0, info.world_size)
    stale = ledger.take_over_stale()
    done = ledger.done()
    keep = {s["file"] for rec in done.values() for s in rec["shards"]}
    # Before any rank of this launch writes: a shard file no done record names is part of a
    # unit an earlier launch did not finish (killed mid-unit, or between its last shard and
    # its done record); the unit is recomputed, so its files go. Only files of launches the
    # ledger knows (and begin_launch proved ended) are deleted: a file of an unknown launch
    # means the ledger was lost or copied incompletely, and deleting would lose data.
    for f in sorted(out.glob("cache-u*")):
        if f.name in keep:
            continue
        m = re.match(r"cache-u\d{7}-l(\d{6})-", f.name)
        if m is None or not (ledger_dir(out) / launch_name(int(m.group(1)))).exists():
            raise ValueError(f"{f}: a shard of no launch recorded in {ledger_dir(out)} (was "
                             "the ledger lost, or the cache copied without it?); restore "
                             f"{ledger_dir(out)}, or move the file out of {out}")
        log(f"removing {f.name}: part of an unfinished unit of an earlier launch", info)
        f.unlink()
    if stale:
        log(f"launch {launch}: took over {len(stale)} unit(s) claimed by earlier launches", info)
    log(f"launch {launch}: {len(done)} of {len(plan['units'])} unit(s) already cached", info)
    return header, plan


def verify_done(out: Path, done: dict[int, dict], info: DistInfo) -> list[str]:
    """This rank's share (unit % world == rank) of the done units: every shard present with
    its recorded size and sha256. A restart trusts only what it verified."""
    problems = []
    for u, rec in done.items():
        if u % info.world_size != info.rank:
            continue
        for s in rec["shards"]:
            path = shard_path(out, s["file"], source=f"ledger/{done_name(u)}")
            if not path.exists():
                problems.append(f"{path} (unit {u}) is missing")
            elif path.stat().st_size != s["bytes"] or sha256_file(path) != s["sha256"]:
                problems.append(f"{path} (unit {u}): size or sha256 differs from its done record")
    return problems
