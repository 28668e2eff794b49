"""What a launch of the cache stage does in OUT before any rank caches a unit.

Rank 0 (`setup_launch`): refuse a corpus changed since the unit plan or a directory holding
another cache, begin the launch in the ledger (pipeline.stage1_cache.ledger; numbered above every launch
in the shard names, so no shard name is ever reused), plan the units on the first launch
(`plan_with_cap`: --max-windows cuts the plan), write header.json and units.json, take over
the units of dead launches, reconcile what the cache says about finished work
(`check_units`: done records, shards on disk, manifest.json, units.json), restore lost done
records from a finished cache's manifest.json, refuse damaged units naming the repair, and
delete the shards nothing vouches for. Every rank (`verify_done`): check its share of the
done units' shards against their done records. The stage itself (pipeline.cache) calls
these; `cfg` is its CacheConfig. docs/CACHE_FORMAT.md ("What a restart trusts") has the rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pipeline.cache_format.checks import shard_file_problem
from pipeline.cache_format.codec import RecordCodec
from pipeline.common.text import DataSpec
from pipeline.common.distributed import DistInfo, log
from pipeline.stage1_cache.ledger import LEDGER_DIR, Ledger, done_name, launch_name, ledger_dir
from pipeline.cache_format.manifest import (HEADER, MANIFEST, QUARANTINE, UNITS,
                               UNIT_SHARD_RE, check_compatible, read_json, repair_command,
                               shard_path, unit_disagreements, masked_format)
from pipeline.common.files import write_json_atomic
from pipeline.cache_format.shards import add_shard_stats, empty_stats
from pipeline.stage1_cache.units import UnitReader, check_plan, plan_units, unit_windows


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
    launch = Ledger.begin_launch(out, info.world_size, cfg.lease_s, log=lambda m: log(m, info),
                                 above=highest_shard_launch(out))
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
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).exists() else None
    done = ledger.done()
    restore, damaged = check_units(out, plan, header, done, manifest)
    if restore:
        for u, rec in restored_records(out, header, done, manifest, restore).items():
            ledger.restore(u, rec)
        log(f"launch {launch}: restored the done records of {len(restore)} unit(s) "
            f"{_span(restore)} from {MANIFEST}: their shards match its sizes and sha256s; "
            "nothing is recomputed", info)
        done = ledger.done()
    if damaged:
        for u, problems in damaged.items():
            log(f"unit {u} is damaged: " + "; ".join(problems), info)
        raise ValueError(_damaged_message(out, damaged))
    # Before any rank of this launch writes: a shard file that no done record and no
    # manifest.json entry names is part of a unit an earlier launch did not finish (killed
    # mid-unit, or between its last shard and its done record); the unit is recomputed, so
    # its files go. Only files of earlier launches the ledger knows (and begin_launch proved
    # ended) are deleted: a file of an unknown launch means the ledger was lost or copied
    # incompletely, and deleting would lose data.
    keep = {s["file"] for rec in done.values() for s in rec["shards"]}
    keep |= {s.get("file") for s in (manifest or {}).get("shards", [])}
    for f in sorted(out.glob("cache-u*")):
        if f.name in keep:
            continue
        m = re.match(r"cache-u\d{7}-l(\d{6})-", f.name)
        if (m is None or int(m.group(1)) >= launch
                or not (ledger_dir(out) / launch_name(int(m.group(1)))).exists()):
            raise ValueError(f"{f}: a shard of no launch recorded in {ledger_dir(out)} (was "
                             "the ledger lost, or the cache copied without it?); restore "
                             f"{ledger_dir(out)}, or move the file out of {out}")
        log(f"removing {f.name}: part of an unfinished unit of an earlier launch", info)
        f.unlink()
    stale = [u for u in stale if u not in restore]
    if stale:
        log(f"launch {launch}: took over {len(stale)} unit(s) claimed by earlier launches", info)
    log(f"launch {launch}: {len(done)} of {len(plan['units'])} unit(s) already cached", info)
    return header, plan


def highest_shard_launch(out: Path) -> int:
    """The highest launch number in the shard names in OUT and OUT/quarantine/ (0: none).
    The next launch is numbered above it: a shard name is never reused, even when ledger/
    (which numbers launches) was lost."""
    best = 0
    for d in (out, out / QUARANTINE):
        if d.is_dir():
            for name in os.listdir(d):
                m = re.match(r"cache-u\d{7}-l(\d{6})-\d{4}\.tar", name)
                if m:
                    best = max(best, int(m.group(1)))
    return best


def _manifest_shards(manifest: dict | None) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for s in (manifest or {}).get("shards", []):
        out.setdefault(s.get("unit"), []).append(s)
    return out


def check_units(out: Path, plan: dict, header: dict, done: dict[int, dict],
                manifest: dict | None) -> tuple[list[int], dict[int, list[str]]]:
    """Rank 0: what every source says about each planned unit: its done record, the shards
    on disk, manifest.json (None: absent) and units.json. Returns (the units to restore: no
    done record, and a manifest entry whose shards verify; the damaged units: {unit: its
    problems}, each naming the files). A unit with neither record nor manifest entry is
    simply not done. Hashes only the shards of units to restore."""
    T, text = header["seq_len"], not masked_format(header["format_version"])
    on_disk = [n for n in os.listdir(out) if UNIT_SHARD_RE.fullmatch(n)]
    m_units = {x.get("unit"): x for x in (manifest or {}).get("units", [])}
    m_shards = _manifest_shards(manifest)
    restore, damaged = [], {}
    for p in plan["units"]:
        u = p["unit"]
        rec = done.get(u)
        mu = m_units.get(u)
        problems = []
        if manifest is not None and mu is None:
            problems.append(f"{MANIFEST} has no entry for unit {u}")
        problems += unit_disagreements(
            u, seq_len=T, text=text, record=rec, source=f"{LEDGER_DIR}/{done_name(u)}",
            planned=p, manifest_unit=mu,
            manifest_shards=m_shards.get(u, []) if manifest is not None else None,
            on_disk=on_disk)
        if rec is None and mu is not None and not problems:
            problems = [f"{x} (no done record; listed in {MANIFEST})"
                        for x in _entry_problems(out, m_shards.get(u, []), MANIFEST)]
            if not problems:
                restore.append(u)
        if problems:
            damaged[u] = problems
    return restore, damaged


def _span(units: list[int]) -> str:
    """Sorted unit numbers for a log line: "3, 7", "0..22", or the first five of many."""
    if len(units) <= 5:
        return ", ".join(map(str, units))
    if units[-1] - units[0] == len(units) - 1:
        return f"{units[0]}..{units[-1]}"
    return f"{', '.join(map(str, units[:5]))}, ... ({len(units)} in all)"


def _damaged_message(out: Path, damaged: dict[int, list[str]]) -> str:
    units = sorted(damaged)
    shown = "; ".join(f"unit {u}: " + "; ".join(damaged[u][:3])
                      + (f" (and {len(damaged[u]) - 3} more)" if len(damaged[u]) > 3 else "")
                      for u in units[:5])
    more = f"; and {len(units) - 5} more unit(s) (the log names them)" if len(units) > 5 else ""
    return (f"{out}: {len(units)} damaged unit(s) ({_span(units)}): its done record, its "
            f"shards, {MANIFEST} and {UNITS} disagree: {shown}{more}. Nothing was deleted. "
            f"Run `{repair_command(out)}` (it moves these units' shard files, their done "
            f"records and {MANIFEST} into {out / QUARANTINE}/), then rerun this command: those "
            "units are recomputed into shards of a new launch")


# Per-unit statistics the records themselves give back (pipeline.cache_format.shards.add_stats); the
# other keys (rskd truncations, dropped mass, conversations) are the teacher's or the
# reader's and exist only as cache totals in manifest.json.
_FROM_RECORDS = ("entropy_code_hist", "distinct_hist", "positions", "samples",
                 "trainable_positions")


def restored_records(out: Path, header: dict, done: dict[int, dict], manifest: dict,
                     units: list[int]) -> dict[int, dict]:
    """Done records of `units` rebuilt from manifest.json (check_units verified their shards):
    its unit entry (windows, documents, tokens, sha256 of the unit's bytes, launch, rank)
    and shard entries, `restored_from`, and statistics recomputed from the shards' records.
    What the manifest keeps only as totals goes to the lowest restored unit: the teacher-side
    statistics (the manifest's total less the other records'), and per launch and rank the
    bytes read (and the node), so a manifest merged again from the records has the same
    totals."""
    m_units = {x["unit"]: x for x in manifest["units"]}
    m_shards = _manifest_shards(manifest)
    codec = RecordCodec.from_header(header)
    masked = masked_format(header["format_version"])
    recs = {}
    for u in units:
        stats = empty_stats(header["num_classes"], masked)
        for s in m_shards.get(u, []):
            add_shard_stats(stats, out / s["file"], codec, header["seq_len"],
                            header["format_version"])
        mu = m_units[u]
        recs[u] = {"shards": m_shards.get(u, []),
                   **{k: mu[k] for k in ("windows", "documents", "tokens", "sha256")},
                   "bytes": 0, "node": None, "stats": stats, "launch": mu["launch"],
                   "rank": mu["rank"], "restored_from": MANIFEST}
    others = [rec for u, rec in done.items() if u not in recs]
    first = recs[min(recs)]["stats"]
    for k, v in manifest["stats"].items():
        if k in _FROM_RECORDS or not isinstance(v, (int, float)):
            continue
        total = v if k.endswith("_max") else v - sum(r["stats"].get(k, 0) for r in others)
        for rec in recs.values():
            rec["stats"][k] = type(v)(0)
        first[k] = total
    groups: dict[tuple, list[int]] = {}
    for u, rec in recs.items():
        groups.setdefault((rec["launch"], rec["rank"]), []).append(u)
    for (launch, rank), us in groups.items():
        lr = manifest.get("launches", {}).get(str(launch), {}).get(str(rank), {})
        read = sum(r.get("bytes") or 0 for r in others
                   if (r["launch"], r["rank"]) == (launch, rank))
        recs[min(us)]["bytes"] = lr.get("bytes", 0) - read
        for u in us:
            recs[u]["node"] = lr.get("node")
    return recs


def _entry_problems(out: Path, entries: list[dict], source: str) -> list[str]:
    """Each shard entry's file present with the entry's size and sha256
    (checks.shard_file_problem: one line per problem, naming the file and its unit)."""
    return [p for s in entries
            if (p := shard_file_problem(shard_path(out, s["file"], source=source), s, source))]


def verify_done(out: Path, done: dict[int, dict], info: DistInfo) -> list[str]:
    """This rank's share (unit % world == rank) of the done units: every shard present with
    its recorded size and sha256. A restart trusts only what it verified."""
    problems = []
    for u, rec in done.items():
        if u % info.world_size == info.rank:
            problems += _entry_problems(out, rec["shards"], f"{LEDGER_DIR}/{done_name(u)}")
    return problems
