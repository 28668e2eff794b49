"""Storage statistics of a teacher cache, an optional integrity check, and a plot.

    python tools/inspect_cache.py CACHE_DIR                 # rich table
    python tools/inspect_cache.py CACHE_DIR --verify        # + sha256 and record checks
    python tools/inspect_cache.py CACHE_DIR --json          # one JSON object on stdout
    python tools/inspect_cache.py CACHE_DIR --plot out.png  # entropy histogram + one sample

Numbers (DESIGN.md sections 2 and 9), with N positions = samples x T:
    bytes_on_disk             sum of the shard files' real sizes (os.stat), manifest excluded
    record_bytes_per_position 3U + 1 (U records of 3 B + 1 entropy byte)
    bytes_per_position        bytes_on_disk / N (records + 4 B of tokens + tar headers)
    reduction_vs_bf16 / fp32  2V / bytes_per_position, 4V / bytes_per_position
    reduction_vs_top128       128 x (2 B fp16 value + 4 B int32 id) / bytes_per_position
    tar_overhead_fraction     (bytes_on_disk - N x (3U+1+4)) / (N x (3U+1+4)); a chat cache's
                              payload also counts trainable.bits (ceil(T/8) B per sample)
Entropy statistics come from the manifest's histogram over the 256 entropy codebook
levels (exact for the quantized entropies); distinct-class statistics from its histogram
of non-sentinel ids per position.

Chat caches (format version 3, `--data-format chat`): only positions whose next token
belongs to an assistant turn are trainable (each sample's `trainable.bits`). The report
shows the trainable fraction (manifest stats `trainable_positions / positions`, with the
conversations cached and those skipped for having no assistant turn), and the entropy and
distinct-class histograms are over trainable positions only (the stage counts only those);
`--verify` counts the trainable positions from the shards and compares. Text caches: every
position is trainable (fraction 1).

`--verify` first checks that every shard `file` is a plain shard name inside CACHE_DIR
(no `../`, no absolute path: such a shard is reported bad and never opened), then re-hashes
every shard against the manifest (size, sha256), reads every sample
(tar members, `tokens.u32` of 4T bytes, `kd.bin` of (3U+1)T bytes) and decodes its records
with pipeline.cache_format.codec: ids < V or the sentinel, weight code 0 in sentinel slots, no repeated
id within a position, tokens < V, keys unique and of the shard's unit (version 2:
`u{unit:07d}-w{window:07d}` in `cache-u{unit:07d}-l{launch:06d}-{n:04d}.tar`, and the windows
its entry records) or rank (version 1: `{rank:04d}-{window:09d}`), sample/position counts as
recorded; version 3: a `trainable.bits` member of ceil(T/8) bytes with zero padding bits,
only sentinel records at masked positions and at least one class at trainable ones; when
every shard passes it also recomputes the entropy and distinct-class histograms (and the
trainable count) and compares them with the manifest's. Then (version 2 and 3) it checks
each unit's sources against each other, as a restart of the cache stage does
(docs/CACHE_FORMAT.md, "What a restart trusts"): its done record in ledger/ against its shard
entries, units.json, manifest.json and the shard files on disk, and its statistics against
the histograms of its shards; every problem names the unit and the files. A copy without
ledger/ is checked from the manifest alone.

`--verify --quarantine` repairs a version-2 cache, finished or not: it verifies every shard
of every cached unit (the ledger's done records; a unit the manifest lists without one: the
manifest's entries) and checks its sources as above, and for each unit with a bad or
missing shard or a disagreement moves all its shard files and its done record into
CACHE/quarantine/ (nothing is deleted) and moves manifest.json there too; the cache stage,
rerun with the same arguments and any number of ranks, then recomputes exactly those units
into new shards (new names: the launch number is part of them). It prints what it did
instead of the table. It refuses (exit 2, nothing moved) while the manifest is the only
record of a good unit: the cache stage, rerun first, restores that unit's done record.

Exit status: 0 fine (with --quarantine: every shard good, nothing moved); 1 `--verify`
found a bad shard or a unit whose sources disagree (each one is named; with --quarantine:
and moved it); 2 the directory is not a readable cache (no manifest.json: the cache stage
has not finished) or not a repairable one.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.cache_format.codec import RecordCodec
from pipeline.stage1_cache.ledger import LEDGER_DIR, done_name, ledger_dir
from pipeline.cache_format.manifest import (HEADER, MANIFEST, MASKED_FORMAT_VERSION, QUARANTINE, UNITS,
                               load_manifest, read_json, shard_path, unit_disagreements)

TOP_K_BASELINE = 128            # a top-k logit cache as DistillKit-style pipelines store it
TOP_K_BYTES_PER_CLASS = 2 + 4   # fp16 value + int32 id
TOKEN_BYTES = 4                 # tokens.u32
SPARK = "▁▂▃▄▅▆▇█"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
KEY_RE = re.compile(r"^(\d{4})-(\d{9})$")                  # version 1: {rank}-{window}
SHARD_RE = re.compile(r"^cache-r(\d{4})-(\d{6})\.tar$")
UNIT_KEY_RE = re.compile(r"^u(\d{7})-w(\d{7})$")            # version 2: u{unit}-w{window}
UNIT_SHARD_RE = re.compile(r"^cache-u(\d{7})-l(\d{6})-(\d{4})\.tar$")
MAX_PROBLEMS = 5                # per shard, so one bad shard does not flood the report

err = Console(stderr=True, highlight=False, soft_wrap=True)   # messages stay greppable


# -- statistics from the manifest -------------------------------------------------------------
def sparkline(counts: np.ndarray) -> str:
    """One block character per bin, height proportional to count (empty bins: a dot)."""
    top = counts.max() if counts.size else 0
    if top <= 0:
        return "·" * len(counts)
    return "".join("·" if c == 0 else SPARK[min(len(SPARK) - 1, int(c / top * len(SPARK)))]
                   for c in counts)


def histogram_quantile(levels: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Lower q-quantile of a sample given as `counts[k]` copies of `levels[k]` (levels sorted)."""
    cdf = np.cumsum(counts)
    return float(levels[int(np.searchsorted(cdf, q * cdf[-1], side="left"))])


def entropy_stats(m: dict, bins: int = 32) -> dict:
    """Mean, quantiles and an equal-width (in nats) rebinning of the code histogram."""
    levels = np.asarray(m["entropy_codebook"], dtype=np.float64)
    hist = np.asarray(m["stats"]["entropy_code_hist"], dtype=np.int64)
    if hist.shape != (256,) or levels.shape != (256,):
        raise ValueError(f"manifest: entropy histogram/codebook of {hist.shape}/{levels.shape} "
                         "entries, expected 256 each")
    n = int(hist.sum())
    top = math.log(m["vocab_size"])
    edges = np.linspace(0.0, top, bins + 1)
    which = np.clip(np.searchsorted(edges, levels, side="right") - 1, 0, bins - 1)
    rebinned = np.bincount(which, weights=hist, minlength=bins).astype(np.int64)
    out = {"positions": n, "max_nats": top, "max_quantization_error": m.get("entropy_max_error"),
           "hist_edges_nats": edges.tolist(), "hist_counts": rebinned.tolist()}
    if n:
        out["mean"] = float((levels * hist).sum() / n)
        out["quantiles"] = {f"p{round(q * 100):02d}": histogram_quantile(levels, hist, q)
                            for q in QUANTILES}
    return out


def distinct_stats(m: dict) -> dict:
    """Non-sentinel classes per position: mean, range, share of padded positions."""
    hist = np.asarray(m["stats"]["distinct_hist"], dtype=np.int64)
    U, n = m["num_classes"], int(hist.sum())
    out: dict = {"hist": hist[: U + 1].tolist(), "positions": n}
    if n:
        k = np.arange(len(hist))
        nz = np.nonzero(hist)[0]
        out |= {"mean": float((k * hist).sum() / n), "min": int(nz[0]), "max": int(nz[-1]),
                "fraction_full": float(hist[U] / n) if U < len(hist) else 0.0,
                "fraction_padded": float(hist[:U].sum() / n)}
    return out


def storage_stats(cache_dir: Path, m: dict) -> dict:
    """Sizes from the file system; every ratio derived from them (see module docstring)."""
    V, U, T = m["vocab_size"], m["num_classes"], m["seq_len"]
    sizes, missing = {}, []
    for s in m["shards"]:
        try:
            p = shard_path(cache_dir, s.get("file"))
        except ValueError:            # named by --verify; never stat a path outside the cache
            missing.append(str(s.get("file")))
            continue
        if p.exists():
            sizes[s["file"]] = p.stat().st_size
        else:
            missing.append(s["file"])
    on_disk = sum(sizes.values())
    samples = sum(s["samples"] for s in m["shards"])
    positions = sum(s["positions"] for s in m["shards"])
    record_bpp = 3 * U + 1
    payload = positions * (record_bpp + TOKEN_BYTES)
    if _masked(m):                     # + trainable.bits: ceil(T/8) bytes per sample
        payload += samples * ((T + 7) // 8)
    if not positions:
        raise ValueError(f"{cache_dir}/manifest.json lists no positions (an empty cache)")
    bpp = on_disk / positions
    listed = {s["file"] for s in m["shards"]}
    stray = sorted(p.name for p in cache_dir.glob("cache-*.tar*") if p.name not in listed)
    return {
        "samples": samples, "positions": positions, "shards": len(m["shards"]),
        "positions_expected": samples * T,
        "bytes_on_disk": on_disk, "bytes_in_manifest": sum(s["bytes"] for s in m["shards"]),
        "manifest_bytes": (cache_dir / "manifest.json").stat().st_size,
        "missing_shards": missing, "stray_files": stray,
        "record_bytes_per_position": record_bpp,
        "bytes_per_position": bpp,
        "tar_overhead_fraction": (on_disk - payload) / payload,
        "reduction_vs_bf16": 2 * V / bpp, "reduction_vs_fp32": 4 * V / bpp,
        "reduction_vs_top128": TOP_K_BASELINE * TOP_K_BYTES_PER_CLASS / bpp,
        "record_reduction_vs_bf16": 2 * V / record_bpp,
        "record_reduction_vs_fp32": 4 * V / record_bpp,
        "record_reduction_vs_top128": TOP_K_BASELINE * TOP_K_BYTES_PER_CLASS / record_bpp,
    }


def _masked(m: dict) -> bool:
    """A cache whose samples carry trainable.bits (format version 3)."""
    return (m.get("format_version") or 0) >= MASKED_FORMAT_VERSION


def trainable_stats(m: dict) -> dict:
    """Trainable positions from the manifest's stats (chat caches; every position otherwise)."""
    st, positions = m["stats"], m["positions"]
    if not _masked(m):
        return {"masked": False, "positions": positions, "trainable_positions": positions,
                "fraction": 1.0}
    n = int(st.get("trainable_positions", 0))
    return {"masked": True, "positions": positions, "trainable_positions": n,
            "fraction": n / positions if positions else 0.0,
            "conversations": st.get("conversations"),
            "skipped_no_assistant": st.get("skipped_no_assistant")}


def settings(m: dict) -> dict:
    st = m["stats"]
    n = st.get("positions") or m["positions"]
    return {k: m.get(k) for k in ("teacher", "teacher_parameters", "vocab_size", "seq_len",
                                   "num_classes", "id_bits", "w_bits", "sentinel", "sampler",
                                   "sampler_args", "teacher_temperature", "seed", "dataset",
                                   "max_windows", "shard_samples", "world_size", "wall_time_s")} | {
        "rskd_truncated_positions": st.get("rskd_truncated_positions", 0),
        "rskd_truncated_fraction": st.get("rskd_truncated_positions", 0) / n if n else 0.0,
        # Probability mass of the teacher's logits beyond V (a padded output layer), dropped
        # before sampling: per-position sum and max over the cache. None: not recorded (a
        # cache written before these statistics existed).
        "teacher_logits": m.get("teacher_logits"),
        "dropped_mass_mean": st["dropped_mass_sum"] / n if n and "dropped_mass_sum" in st else None,
        "dropped_mass_max": st.get("dropped_mass_max")}


# -- verification -----------------------------------------------------------------------------
def tar_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, grouping consecutive members by key as
    webdataset does (key = basename up to its first dot)."""
    key, group = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield key, group
                group = {}
            key = k
            if ext in group:
                raise ValueError(f"sample {k}: member .{ext} appears twice")
            f = tf.extractfile(info)
            group[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, group


def check_sample(codec: RecordCodec, T: int, key: str, group: dict[str, bytes],
                 owner: tuple[str, int] | None, masked: bool = False
                 ) -> tuple[list[str], np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Problems of one sample; its entropy codes [T], distinct counts [T] and trainable
    flags [T] (all True unless `masked`) when decodable.

    `owner`: ("unit", u) for a version-2/3 shard (keys u{unit:07d}-w{window:07d}), ("rank", r)
    for a version-1 shard (keys {rank:04d}-{window:09d}), None when the name says neither.
    `masked`: a version-3 cache (members tokens.u32, kd.bin and trainable.bits)."""
    problems = []
    if owner is not None and owner[0] == "unit":
        km = UNIT_KEY_RE.match(key)
        if km is None:
            problems.append(f"key {key!r} is not unit-window (u{{unit:07d}}-w{{window:07d}})")
        elif int(km.group(1)) != owner[1]:
            problems.append(f"key {key} belongs to unit {int(km.group(1))}, shard is unit {owner[1]}")
    else:
        km = KEY_RE.match(key)
        if km is None:
            problems.append(f"key {key!r} is not rank-window ({{rank:04d}}-{{window:09d}})")
        elif owner is not None and int(km.group(1)) != owner[1]:
            problems.append(f"key {key} belongs to rank {int(km.group(1))}, shard is rank {owner[1]}")
    members = {"tokens.u32", "kd.bin"} | ({"trainable.bits"} if masked else set())
    if set(group) != members:
        problems.append(f"sample {key}: members {sorted(group)}, expected {sorted(members)}")
    tok, kd = group.get("tokens.u32", b""), group.get("kd.bin", b"")
    B = codec.bytes_per_position
    if len(tok) != TOKEN_BYTES * T or len(kd) != B * T:
        problems.append(f"sample {key}: tokens.u32 {len(tok)} B (want {TOKEN_BYTES * T}), "
                        f"kd.bin {len(kd)} B (want {B} x T={T} = {B * T})")
        return problems, None, None, None
    trainable = np.ones(T, dtype=bool)
    if masked:
        bits = group.get("trainable.bits", b"")
        if len(bits) != (T + 7) // 8:
            problems.append(f"sample {key}: trainable.bits {len(bits)} B (want ceil(T/8) = "
                            f"{(T + 7) // 8})")
            return problems, None, None, None
        flags = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")
        if flags[T:].any():
            problems.append(f"sample {key}: trainable.bits has padding bits set beyond T={T}")
        trainable = flags[:T].astype(bool)
    tokens = np.frombuffer(tok, dtype="<u4")
    if int(tokens.max()) >= codec.vocab_size:
        problems.append(f"sample {key}: token id {int(tokens.max())} >= V={codec.vocab_size}")
    ids, wc, ec = codec.unpack(kd)
    pad = ids == codec.sentinel
    bad = (ids >= codec.vocab_size) & ~pad
    if bad.any():
        problems.append(f"sample {key}: {int(bad.sum())} id(s) outside V={codec.vocab_size} "
                        f"and not the sentinel {codec.sentinel}, e.g. {ids[bad][:3].tolist()}")
    if (wc[pad] != 0).any():
        problems.append(f"sample {key}: {int((wc[pad] != 0).sum())} sentinel slot(s) with a "
                        "nonzero weight code")
    srt = np.sort(ids, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != codec.sentinel)
    if dup.any():
        problems.append(f"sample {key}: {int(dup.any(1).sum())} position(s) repeat a class id")
    nd = (~pad).sum(1)
    if masked and (nd[~trainable] != 0).any():
        problems.append(f"sample {key}: {int((nd[~trainable] != 0).sum())} masked position(s) "
                        "hold class records (trainable bit 0 means sentinel slots only)")
    if masked and (nd[trainable] == 0).any():
        problems.append(f"sample {key}: {int((nd[trainable] == 0).sum())} trainable position(s) "
                        "hold no class record")
    return problems, ec, nd, trainable


def verify_shard(cache_dir: Path, s: dict, codec: RecordCodec, T: int,
                 seen_keys: set[str], acc: dict, masked: bool = False) -> list[str]:
    """Problems of one shard (empty = good); adds its histograms into `acc` (`masked`, a
    version-3 cache: over trainable positions, whose count goes to acc["trainable"]).

    A `file` entry that is not a plain shard name inside `cache_dir` (manifest.shard_path:
    `../x.tar`, an absolute path) is a problem of that shard, and nothing is opened."""
    try:
        path = shard_path(cache_dir, s.get("file"))
    except ValueError as e:
        return [str(e)]
    try:
        data = path.read_bytes()
    except OSError as e:
        return [f"cannot read ({e.strerror or e})"]
    problems = []
    if len(data) != s["bytes"]:
        problems.append(f"{len(data)} bytes, manifest says {s['bytes']} (truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != s["sha256"]:
        problems.append("sha256 differs from manifest.json (corrupted or replaced)")
    um, sm = UNIT_SHARD_RE.match(s["file"]), SHARD_RE.match(s["file"])
    owner = ("unit", int(um.group(1))) if um else ("rank", int(sm.group(1))) if sm else None
    samples = positions = 0
    windows = []
    try:
        for key, group in tar_samples(data):
            samples += 1
            p, ec, nd, tr = check_sample(codec, T, key, group, owner, masked)
            if (km := UNIT_KEY_RE.match(key)) is not None:
                windows.append(int(km.group(2)))
            if key in seen_keys:
                p.append(f"sample {key} appears in more than one place")
            seen_keys.add(key)
            problems += p
            if ec is not None:
                positions += len(ec)
                acc["trainable"] = acc.get("trainable", 0) + int(tr.sum())
                ec, nd = (ec[tr], nd[tr]) if masked else (ec, nd)
                acc["entropy"] += np.bincount(ec, minlength=256)
                acc["distinct"] += np.bincount(nd, minlength=len(acc["distinct"]))[: len(acc["distinct"])]
    except (tarfile.TarError, EOFError, ValueError) as e:
        problems.append(f"unreadable tar after {samples} sample(s): {e}")
    if (samples, positions) != (s["samples"], s["positions"]):
        problems.append(f"{samples} samples / {positions} positions decoded, manifest says "
                        f"{s['samples']} / {s['positions']}")
    if "windows" in s and owner is not None and owner[0] == "unit" and windows != list(s["windows"]):
        problems.append("its keys are not the windows its entry records")
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more"]
    return problems


def _new_acc(n_distinct: int) -> dict:
    return {"entropy": np.zeros(256, np.int64), "distinct": np.zeros(n_distinct, np.int64),
            "trainable": 0}


def _shard_unit(name: object) -> int | None:
    um = UNIT_SHARD_RE.match(name) if isinstance(name, str) else None
    return int(um.group(1)) if um else None


def verify_cache(cache_dir: Path, m: dict) -> dict:
    """Check every shard, then every unit's sources against each other (`check_units`);
    `{"ok", "bad_shards", "shards": [{file, unit, ok, problems}], "stats_match",
    "cache_problems", "damaged_units"}`. Every problem names its unit and file(s)."""
    codec = RecordCodec(m["vocab_size"], m["num_classes"])
    problems_cache = []
    if (codec.id_bits, codec.w_bits) != (m["id_bits"], m["w_bits"]):
        problems_cache.append(f"manifest id/w bits {m['id_bits']}/{m['w_bits']} disagree with "
                              f"V={m['vocab_size']} ({codec.id_bits}/{codec.w_bits})")
    n_distinct = len(m["stats"]["distinct_hist"])
    acc = _new_acc(n_distinct)
    per_unit: dict[int, dict] = {}        # the histograms of each unit's shards
    seen: set[str] = set()
    results = []
    for s in m["shards"]:
        one = _new_acc(n_distinct)
        p = verify_shard(cache_dir, s, codec, m["seq_len"], seen, one, _masked(m))
        u = _shard_unit(s.get("file"))
        results.append({"file": s["file"], "unit": u, "ok": not p, "problems": p})
        for a in (acc, per_unit.setdefault(u, _new_acc(n_distinct))):
            for k in a:
                a[k] = a[k] + one[k]
    bad = [r["file"] for r in results if not r["ok"]]
    units, stats_units = check_units(cache_dir, m, m, None if bad else per_unit)
    stats_match = None
    if not bad:   # histograms of damaged shards cannot match; only compare a clean cache
        stats_match = (acc["entropy"].tolist() == list(m["stats"]["entropy_code_hist"])
                       and acc["distinct"].tolist() == list(m["stats"]["distinct_hist"]))
        if _masked(m) and acc["trainable"] != m["stats"].get("trainable_positions"):
            stats_match = False
            problems_cache.append(f"{acc['trainable']} trainable positions counted in the "
                                  "shards, manifest.json's stats say "
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
    return {"ok": not bad and not problems_cache, "bad_shards": bad, "cache_problems": problems_cache,
            "damaged_units": sorted(units), "stats_match": stats_match, "shards": results,
            "trainable_positions": acc["trainable"] if not bad else None}


def check_units(cache_dir: Path, h: dict, m: dict | None,
                per_unit: dict[int, dict] | None = None, missing_records: bool = True
                ) -> tuple[dict[int, list[str]], list[int]]:
    """What each unit's sources say about it, against each other: its done record
    (ledger/), its shard files on disk, manifest.json (`m`; None: none) and units.json
    (pipeline.cache_format.manifest.unit_disagreements: window counts, shard entries, launch), and its
    record's statistics against the histograms of its shards (`per_unit`: {unit: acc},
    None when a shard is bad); `h`: the header. Returns ({unit: problems}, the units whose
    statistics differ). A version-1 cache has no units; a copy without ledger/ (only
    manifest.json and the shards are needed to read a cache) is checked from the manifest
    alone, and `missing_records` names a unit the manifest lists without a done record."""
    if (h.get("format_version") or 0) < 2:
        return {}, []
    T, text = h["seq_len"], not _masked(h)
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
        if not problems and got is not None and isinstance(st, dict):
            differ = (got["entropy"].tolist() != list(st.get("entropy_code_hist", []))
                      or got["distinct"].tolist() != list(st.get("distinct_hist", [])))
            if _masked(h) and got["trainable"] != st.get("trainable_positions"):
                differ = True
            if differ:
                stats_units.append(u)
                names = ", ".join(s["file"] for s in m_shards.get(u, []))
                problems.append(f"the entropy/distinct histograms recomputed from its shards "
                                f"({names}) differ from {src}'s stats")
    return {u: p for u, p in out.items() if p}, stats_units


# -- quarantine -------------------------------------------------------------------------------
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
    stage restores its done record first)."""
    header_path = cache_dir / HEADER
    if not header_path.exists():
        if any(cache_dir.glob("manifest.r[0-9][0-9][0-9][0-9].json")):
            raise ValueError("a version-1 cache (rank parts): --quarantine repairs version-2 "
                             "caches only; re-cache it into a new directory with this version")
        raise FileNotFoundError(f"{header_path} does not exist: not a cache directory of this "
                                "version (--quarantine repairs through the cache stage)")
    h = read_json(header_path)
    codec, T = RecordCodec(h["vocab_size"], h["num_classes"]), h["seq_len"]
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
        problems = []
        for s in entries if isinstance(entries, list) else []:
            checked += 1
            p = verify_shard(cache_dir, s, codec, T, seen, _new_acc(h["num_classes"] + 1),
                             _masked(h))
            problems += [f"{s.get('file')}: {x}" for x in p]
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


def render_quarantine(res: dict, cache_dir: Path, console: Console) -> None:
    for q in res["quarantined"]:
        console.print(f"[red]BAD[/red] unit {q['unit']}: {'; '.join(q['problems'][:MAX_PROBLEMS])}",
                      soft_wrap=True)
        console.print(f"  quarantined: {', '.join(q['moved_to'])}", soft_wrap=True)
    if res["ok"]:
        console.print(f"all {res['shards_checked']} shard(s) of the cached units verified; "
                      "nothing to quarantine", soft_wrap=True)
        return
    if res["manifest_moved_to"]:
        console.print(f"moved {cache_dir / MANIFEST} to {res['manifest_moved_to']}: the cache "
                      "reads as unfinished until the cache stage completes it", soft_wrap=True)
    n = sum(q["samples"] for q in res["quarantined"])
    console.print(f"Now rerun the cache stage with the same arguments (any number of ranks), "
                  f"e.g. `python -m pipeline.cache ... --out {cache_dir}`: it recomputes the "
                  f"{len(res['quarantined'])} quarantined unit(s) ({n} window(s)) into new shards.",
                  soft_wrap=True)


# -- report -----------------------------------------------------------------------------------
def build_report(cache_dir: Path, verify: bool) -> tuple[dict, dict]:
    m = load_manifest(cache_dir)
    rep = storage_stats(cache_dir, m)
    rep |= {"entropy": entropy_stats(m), "distinct": distinct_stats(m), "settings": settings(m),
            "trainable": trainable_stats(m)}
    if verify:
        rep["verify"] = verify_cache(cache_dir, m)
    return rep, m


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


DROPPED_MASS_WARN = (1e-3, 1e-2)   # mean, max above which the dropped mass is not "about 0"


def _dropped_mass_row(s: dict) -> tuple[str, str, str]:
    """The table row of the teacher probability mass on logits >= V, dropped before sampling."""
    name, V, vt = "dropped mass (logits >= V)", s["vocab_size"], s.get("teacher_logits")
    mean, mx = s.get("dropped_mass_mean"), s.get("dropped_mass_max")
    cols = (f"{vt - V:,} of {vt:,} teacher logits beyond V" if isinstance(vt, int)
            else "teacher logits beyond V")
    if mean is None or mx is None:
        return name, "not recorded", "a cache written before this statistic"
    value = f"mean {mean:.3g} / max {mx:.3g}"
    if mean > DROPPED_MASS_WARN[0] or mx > DROPPED_MASS_WARN[1]:
        return f"[yellow]{name}", f"[yellow]{value}", f"[yellow]NOT about 0[/yellow]: {cols}"
    return name, value, f"{cols}; per position"


def render(rep: dict, cache_dir: Path, console: Console) -> None:
    s, e, d = rep["settings"], rep["entropy"], rep["distinct"]
    V, U = s["vocab_size"], s["num_classes"]
    t = Table(title=f"teacher cache {cache_dir}", show_lines=False)
    t.add_column("quantity")
    t.add_column("value", justify="right", no_wrap=True)   # sparklines must stay whole
    t.add_column("note", style="dim")
    rows = [
        ("samples (windows)", f"{rep['samples']:,}", f"T={s['seq_len']}"),
        ("positions", f"{rep['positions']:,}", "samples x T" if rep["positions"] ==
         rep["positions_expected"] else f"[red]!= samples x T = {rep['positions_expected']:,}"),
        ("shards", f"{rep['shards']}", f"{len(rep['missing_shards'])} missing"
         if rep["missing_shards"] else f"{s['shard_samples']} samples/shard max"),
        ("bytes on disk", _fmt_bytes(rep["bytes_on_disk"]), f"{rep['bytes_on_disk']:,} B of shards; "
         f"manifest.json {_fmt_bytes(rep['manifest_bytes'])}"),
        ("B/position, records", f"{rep['record_bytes_per_position']}", f"3U+1, U={U}"),
        ("B/position, on disk", f"{rep['bytes_per_position']:.2f}",
         f"+{TOKEN_BYTES} B tokens, tar overhead {100 * rep['tar_overhead_fraction']:.2f}%"),
    ]
    for name, key, base in (("bf16", "bf16", f"2V = {2 * V:,} B"), ("fp32", "fp32", f"4V = {4 * V:,} B"),
                            ("top-128 fp16+int32", "top128", f"{TOP_K_BASELINE * TOP_K_BYTES_PER_CLASS} B")):
        rows.append((f"reduction vs {name}", f"{rep['reduction_vs_' + key]:,.1f}x",
                     f"{base}/position; records only {rep['record_reduction_vs_' + key]:,.1f}x"))
    for r in rows:
        t.add_row(*r)
    t.add_section()
    tr = rep["trainable"]
    over = " (trainable)" if tr["masked"] else ""   # histograms: trainable positions only
    if tr["masked"]:      # positions whose next token is in an assistant turn
        t.add_row("trainable positions", f"{100 * tr['fraction']:.2f}%",
                  f"{tr['trainable_positions']:,} of {tr['positions']:,} positions")
        counted = rep.get("verify", {}).get("trainable_positions")
        if counted is not None:
            t.add_row("trainable, counted in shards", f"{counted:,}", "--verify")
        t.add_row("conversations", f"{tr['conversations'] or 0:,}",
                  f"{tr['skipped_no_assistant'] or 0:,} skipped (no assistant turn)")
    else:
        t.add_row("trainable positions", "100.00%", "text cache: every position")
    if "mean" in e:
        q = e["quantiles"]
        t.add_row("entropy mean" + over, f"{e['mean']:.3f} nats", f"quantization error <= "
                  f"{e['max_quantization_error'] or float('nan'):.4f}")
        t.add_row("entropy p5/p25/p50/p75/p95", " / ".join(f"{v:.2f}" for v in q.values()), "nats")
        t.add_row("entropy histogram" + over, sparkline(np.asarray(e["hist_counts"])),
                  f"0 .. ln V = {e['max_nats']:.2f} nats, {len(e['hist_counts'])} bins")
    if "mean" in d:
        t.add_row("distinct classes mean", f"{d['mean']:.3f}", f"min {d['min']}, max {d['max']}, U={U}")
        t.add_row("positions with < U classes", f"{100 * d['fraction_padded']:.2f}%", "sentinel-padded")
        t.add_row("distinct histogram", sparkline(np.asarray(d["hist"])), f"0 .. {U}")
    t.add_section()
    t.add_row("teacher", str(s["teacher"]), f"{s['teacher_parameters'] or 0:,} parameters")
    t.add_row("sampler", f"{s['sampler']} {json.dumps(s['sampler_args'])}",
              f"teacher temperature {s['teacher_temperature']}, seed {s['seed']}")
    t.add_row("V / U / id bits / w bits", f"{V:,} / {U} / {s['id_bits']} / {s['w_bits']}",
              f"sentinel {s['sentinel']}")
    t.add_row("rskd truncated positions", f"{100 * s['rskd_truncated_fraction']:.3f}%",
              f"{s['rskd_truncated_positions']:,} positions")
    t.add_row(*_dropped_mass_row(s))
    if s["wall_time_s"]:
        t.add_row("cache stage", f"{s['world_size']} rank(s)", f"wall {s['wall_time_s']:.1f} s")
    if rep["stray_files"]:
        t.add_row("[yellow]files not in manifest", str(len(rep["stray_files"])),
                  ", ".join(rep["stray_files"][:4]))
    if "verify" in rep:
        v = rep["verify"]
        t.add_section()
        found = ", ".join(x for x in (
            f"{len(v['bad_shards'])} bad shard(s)" if v["bad_shards"] else "",
            f"unit(s) {', '.join(map(str, v['damaged_units']))} inconsistent"
            if v.get("damaged_units") else "", "other problems" if not v["bad_shards"]
            and not v.get("damaged_units") else "") if x)
        t.add_row("verify", "[green]ok" if v["ok"] else f"[red]{found}",
                  f"{len(v['shards'])} shards re-hashed and decoded")
    console.print(t)
    if "verify" in rep:
        for r in rep["verify"]["shards"]:
            unit = f" (unit {r['unit']})" if r.get("unit") is not None else ""
            for p in r["problems"]:
                console.print(f"[red]BAD[/red] {cache_dir / r['file']}{unit}: {p}",
                              soft_wrap=True)
        for p in rep["verify"]["cache_problems"]:
            console.print(f"[red]BAD[/red] {cache_dir}: {p}", soft_wrap=True)


def first_sample_entropy(cache_dir: Path, m: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """Key, per-position entropy [T] (nats) and distinct counts [T] of the first readable sample."""
    codec = RecordCodec(m["vocab_size"], m["num_classes"])
    levels = np.asarray(m["entropy_codebook"], dtype=np.float32)
    for s in m["shards"]:
        path = shard_path(cache_dir, s.get("file"))
        if not path.exists():
            continue
        for key, group in tar_samples(path.read_bytes()):
            ids, _, ec = codec.unpack(group["kd.bin"])
            return key, levels[ec], (ids != codec.sentinel).sum(1)
    raise ValueError(f"{cache_dir}: no readable shard to plot a sample from")


def plot(rep: dict, m: dict, cache_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = rep["entropy"]
    key, h, nd = first_sample_entropy(cache_dir, m)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), constrained_layout=True)
    edges = np.asarray(e["hist_edges_nats"])
    a1.bar(edges[:-1], e["hist_counts"], width=np.diff(edges), align="edge", color="tab:blue")
    a1.set(xlabel="teacher entropy (nats)", ylabel="positions",
           title=f"entropy histogram, {e['positions']:,} "
                 f"{'trainable ' if rep['trainable']['masked'] else ''}positions "
                 f"(mean {e.get('mean', float('nan')):.2f} nats, ln V = {e['max_nats']:.2f})")
    a2.plot(np.arange(len(h)), h, lw=0.8, color="tab:blue")
    a2.set(xlabel="position", ylabel="entropy (nats)", title=f"sample {key}: per-position entropy")
    if (nd < m["num_classes"]).any():
        ax = a2.twinx()
        ax.plot(np.arange(len(nd)), nd, lw=0.6, color="tab:orange")
        ax.set_ylabel("distinct classes", color="tab:orange")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache_dir", type=Path, help="cache directory (holds manifest.json)")
    ap.add_argument("--verify", action="store_true", help="re-hash and decode every shard")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--plot", type=Path, metavar="OUT.png", help="write entropy plots (matplotlib)")
    ap.add_argument("--quarantine", action="store_true",
                    help="with --verify: move the shards and done records of units with a bad "
                         "shard into CACHE/quarantine/, so a rerun of the cache stage recomputes them")
    args = ap.parse_args(argv)
    if args.quarantine and not args.verify:
        ap.error("--quarantine acts on what --verify finds: use --verify --quarantine")
    if not args.cache_dir.is_dir():
        err.print(f"[red]error:[/red] {args.cache_dir} is not a directory")
        return 2
    if args.quarantine:
        try:
            res = quarantine_damaged(args.cache_dir)
        except (FileNotFoundError, ValueError, KeyError) as e:
            what = f"a done record or header lacks the field {e}" if isinstance(e, KeyError) else str(e)
            err.print(f"[red]error:[/red] {args.cache_dir} is not a repairable cache: {what}")
            return 2
        if args.json:
            sys.stdout.write(json.dumps(res) + "\n")
        else:
            render_quarantine(res, args.cache_dir, Console(highlight=False, soft_wrap=True))
        return 0 if res["ok"] else 1
    try:
        rep, m = build_report(args.cache_dir, args.verify)
    except (FileNotFoundError, ValueError, KeyError) as e:
        what = f"manifest.json lacks the field {e}" if isinstance(e, KeyError) else str(e)
        err.print(f"[red]error:[/red] {args.cache_dir} is not a readable cache: {what}")
        return 2
    if args.plot:
        plot(rep, m, args.cache_dir, args.plot)
    if args.json:
        sys.stdout.write(json.dumps(rep) + "\n")
    else:
        out = Console(highlight=False)
        if not out.is_terminal:      # a pipe or a log file: rich would assume 80 columns
            out = Console(highlight=False, width=120)
        render(rep, args.cache_dir, out)
        if args.plot:
            err.print(f"plot written to {args.plot}")
    if "verify" in rep and not rep["verify"]["ok"]:
        for f in rep["verify"]["bad_shards"]:
            err.print(f"[red]bad shard:[/red] {args.cache_dir / f}")
        for p in rep["verify"]["cache_problems"]:
            err.print(f"[red]cache problem:[/red] {p}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
