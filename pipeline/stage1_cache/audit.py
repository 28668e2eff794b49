"""A cache directory checked offline as a restart of the stage checks it, and its repair.

    rep = verify_cache(cache_dir, manifest)   # tools/inspect_cache.py --verify
    res = quarantine_damaged(cache_dir)       # tools/inspect_cache.py --verify --quarantine

`verify_cache` runs the format's verification from the manifest (pipeline.cache_format.verify:
every shard and sample, the statistics), then `check_units`: each unit's sources against
each other (docs/CACHE_FORMAT.md, "What a restart trusts"): its done record in ledger/, its
shard files on disk, manifest.json and units.json (manifest.unit_disagreements, as
launch.check_units applies them before a launch), and its done record's statistics against
the histograms of its shards. A copy without ledger/ is checked from the manifest alone.

`quarantine_damaged` moves every shard file and the done record of each unit with a bad or
missing shard or a disagreement into quarantine/ (nothing is deleted), and manifest.json
too: the cache stage, rerun with the same arguments, recomputes exactly those units.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.cache_format.codec import RecordCodec
from pipeline.cache_format.manifest import (HEADER, MANIFEST, QUARANTINE, UNIT_SHARD_RE, UNITS,
                                            read_json, unit_disagreements)
from pipeline.cache_format.verify import is_masked, stats_differ, verify_shard, verify_shards
from pipeline.stage1_cache.ledger_files import LEDGER_DIR, done_name, ledger_dir


def verify_cache(cache_dir: Path, m: dict) -> dict:
    """Check every shard, then every unit's sources against each other (`check_units`);
    `{"ok", "bad_shards", "shards": [{file, unit, ok, problems}], "stats_match",
    "cache_problems", "damaged_units", "trainable_positions"}`. Every problem names its unit
    and file(s)."""
    res = verify_shards(cache_dir, m)
    problems_cache = list(res["problems"])
    bad, got = res["bad_shards"], res["stats"]
    units, stats_units = check_units(cache_dir, m, m, None if bad else res["unit_stats"])
    stats_match = None
    if not bad:   # histograms of damaged shards cannot match; only compare a clean cache
        stats_match = (got["entropy_code_hist"] == list(m["stats"]["entropy_code_hist"])
                       and got["distinct_hist"] == list(m["stats"]["distinct_hist"]))
        if is_masked(m) and got["trainable_positions"] != m["stats"].get("trainable_positions"):
            stats_match = False
            problems_cache.append(f"{got['trainable_positions']} trainable positions counted in "
                                  "the shards, manifest.json's stats say "
                                  f"{m['stats'].get('trainable_positions')}")
        if not stats_match:
            which = (f": unit(s) {stats_units} (below)" if stats_units else
                     " (no done records in ledger/ to tell which unit)"
                     if not ledger_dir(cache_dir).is_dir() else
                     "; every unit's done record matches its shards, so manifest.json's stats "
                     "are what changed")
            problems_cache.append("entropy/distinct histograms recomputed from the records "
                                  f"differ from manifest.json's stats{which}")
    problems_cache += [f"unit {u}: {p}" for u, ps in units.items() for p in ps]
    trainable = got["trainable_positions"] if is_masked(m) else got["positions"]
    return {"ok": not bad and not problems_cache, "bad_shards": bad,
            "cache_problems": problems_cache, "damaged_units": sorted(units),
            "stats_match": stats_match, "shards": res["shards"],
            "trainable_positions": trainable if not bad else None}


def check_units(cache_dir: Path, h: dict, m: dict | None,
                per_unit: dict[int, dict] | None = None, missing_records: bool = True
                ) -> tuple[dict[int, list[str]], list[int]]:
    """What each unit's sources say about it, against each other: its done record
    (ledger/), its shard files on disk, manifest.json (`m`; None: none) and units.json
    (pipeline.cache_format.manifest.unit_disagreements: window counts, shard entries, launch),
    and its record's statistics against those of its shards (`per_unit`: {unit: statistics,
    verify.verify_shards' `unit_stats`}, None when a shard is bad); `h`: the header. Returns
    ({unit: problems}, the units whose statistics differ). A version-1 cache has no units; a
    copy without ledger/ (only manifest.json and the shards are needed to read a cache) is
    checked from the manifest alone, and `missing_records` names a unit the manifest lists
    without a done record."""
    if (h.get("format_version") or 0) < 2:
        return {}, []
    T, text = h["seq_len"], not is_masked(h)
    plan = read_json(cache_dir / UNITS) if (cache_dir / UNITS).exists() else None
    planned = {p["unit"]: p for p in plan["units"]} if plan else {}
    led = ledger_dir(cache_dir)
    records: dict[int, dict] = {}
    out: dict[int, list[str]] = {}
    if led.is_dir():
        for f in sorted(led.glob("unit-*.done.json")):
            u = int(f.name[5:12])
            try:
                records[u] = read_json(f)
            except ValueError as e:
                out.setdefault(u, []).append(f"{e} (a rerun of the cache stage moves it aside "
                                             "and caches the unit again)")
    m_units = {x.get("unit"): x for x in (m or {}).get("units", [])}
    m_shards: dict[int, list[dict]] = {}
    for s in (m or {}).get("shards", []):
        m_shards.setdefault(s.get("unit"), []).append(s)
    on_disk = [n for n in os.listdir(cache_dir) if UNIT_SHARD_RE.match(n)]
    stats_units = []
    for u in sorted(x for x in {*m_units, *records, *planned} if isinstance(x, int)):
        src = f"{LEDGER_DIR}/{done_name(u)}"
        rec = records.get(u)
        problems = out.setdefault(u, [])
        if m is not None and u not in m_units:
            problems.append(f"{MANIFEST} has no entry for unit {u}"
                            + (f" ({UNITS} plans it)" if u in planned else f" ({src} exists)"))
        if plan is not None and u not in planned:
            problems.append(f"{UNITS} plans no unit {u}")
        if missing_records and led.is_dir() and rec is None and u in m_units:
            problems.append(f"{src} is missing ({MANIFEST} lists the unit: a rerun of the cache "
                            "stage restores the record from it)")
        problems += unit_disagreements(
            u, seq_len=T, text=text, record=rec, source=src, planned=planned.get(u),
            manifest_unit=m_units.get(u),
            manifest_shards=m_shards.get(u, []) if u in m_units else None, on_disk=on_disk)
        got = (per_unit or {}).get(u)
        st = rec.get("stats") if rec is not None else None
        if not problems and got is not None and isinstance(st, dict) and \
                stats_differ(got, st, is_masked(h)):
            stats_units.append(u)
            names = ", ".join(s["file"] for s in m_shards.get(u, []))
            problems.append(f"the entropy/distinct histograms recomputed from its shards "
                            f"({names}) differ from {src}'s stats")
    return {u: p for u, p in out.items() if p}, stats_units


def _free(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist (never overwrite)."""
    n, out = 0, path
    while out.exists():
        n += 1
        out = path.with_name(f"{path.name}.{n}")
    return out


def quarantine_damaged(cache_dir: Path) -> dict:
    """Verify every shard of every cached unit (the ledger's done records; a unit listed in
    manifest.json without a record: the manifest's entries) and check each unit's sources
    against each other (`check_units`); for each unit with a bad or missing shard or a
    disagreement, move all its shard files and its done record into `quarantine/` (nothing
    is deleted), and move manifest.json there too, so that the cache stage, rerun with the
    same arguments (any number of ranks), recomputes exactly those units into new shards.
    Refused, with nothing moved, while a good unit's only record is the manifest (the cache
    stage restores its done record first). Returns {"ok", "shards_checked", "quarantined":
    [{unit, problems, moved_to, samples}], "manifest_moved_to"}."""
    header_path = cache_dir / HEADER
    if not header_path.exists():
        if any(cache_dir.glob("manifest.r[0-9][0-9][0-9][0-9].json")):
            raise ValueError("a version-1 cache (rank parts): --quarantine repairs version-2 "
                             "caches only; re-cache it into a new directory with this version")
        raise FileNotFoundError(f"{header_path} does not exist: not a cache directory of this "
                                "version (--quarantine repairs through the cache stage)")
    h = read_json(header_path)
    codec, T = RecordCodec.from_header(h), h["seq_len"]
    if not ledger_dir(cache_dir).is_dir():
        raise FileNotFoundError(f"{ledger_dir(cache_dir)} does not exist (a cache copied without "
                                "its ledger?): rerun the cache stage with the same arguments "
                                f"first (it rebuilds the done records from {MANIFEST}, or "
                                "names what it cannot); use --verify to find damaged shards")
    m = read_json(cache_dir / MANIFEST) if (cache_dir / MANIFEST).exists() else None
    records = {int(f.name[5:12]): read_json(f)
               for f in sorted(ledger_dir(cache_dir).glob("unit-*.done.json"))}
    disagree, _ = check_units(cache_dir, h, m, missing_records=False)
    m_units = {x.get("unit"): x for x in (m or {}).get("units", [])}
    seen: set[str] = set()
    checked, bad, unrecorded = 0, [], []
    for unit in sorted({*records, *(u for u in m_units if isinstance(u, int))}):
        rec = records.get(unit)
        entries = (rec.get("shards", []) if rec is not None else
                   [s for s in m["shards"] if s.get("unit") == unit])   # m: unit in m_units
        source = f"{LEDGER_DIR}/{done_name(unit)}" if rec is not None else MANIFEST
        problems = []
        for s in entries if isinstance(entries, list) else []:
            checked += 1
            problems += verify_shard(cache_dir, s, codec, T, h.get("format_version") or 0, seen,
                                     source)[0]
        problems += disagree.get(unit, [])
        if not problems:
            if rec is None:
                unrecorded.append(unit)
            continue
        windows = [w for w in ((m_units.get(unit) or {}).get("windows"),
                               (rec or {}).get("windows")) if isinstance(w, int)]
        bad.append({"unit": unit, "problems": problems, "moved_to": [],
                    "samples": windows[0] if windows else sum(s.get("samples", 0)
                                                              for s in entries)})
    if bad and unrecorded:
        raise ValueError(f"unit(s) {unrecorded} have no done record in {LEDGER_DIR}/, and "
                         f"{MANIFEST}, the only record of their shards, would be moved: rerun "
                         f"the cache stage with the same arguments first (it restores their "
                         f"done records from {MANIFEST}), then this command")
    qdir = cache_dir / QUARANTINE
    for q in bad:
        qdir.mkdir(exist_ok=True)
        # Every file of the unit (its records' shards, leftovers): the unit is recomputed
        # into shards of a new launch, so none of them is needed in the cache any more.
        for f in sorted(cache_dir.glob(f"cache-u{q['unit']:07d}-l*")):
            dest = _free(qdir / f.name)
            os.replace(f, dest)
            q["moved_to"].append(str(dest))
        rec_path = ledger_dir(cache_dir) / done_name(q["unit"])
        if rec_path.exists():
            dest = _free(qdir / rec_path.name)
            os.replace(rec_path, dest)      # the unit is no longer done: the stage redoes it
            q["moved_to"].append(str(dest))
    manifest_moved = None
    if bad and (cache_dir / MANIFEST).exists():
        dest = _free(qdir / MANIFEST)
        os.replace(cache_dir / MANIFEST, dest)
        manifest_moved = str(dest)
    return {"ok": not bad, "shards_checked": checked, "quarantined": bad,
            "manifest_moved_to": manifest_moved}
