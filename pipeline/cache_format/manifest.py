"""The cache directory's manifest: header, unit plan, merge, layout and checks.

Layout of a cache directory (format version 2, or 3 for a chat cache whose samples carry
`trainable.bits`; docs/CACHE_FORMAT.md is the full reference):
    header.json          what determines the records (teacher, tokenizer, data, T, U, sampler,
                         codebooks, seed), written by the first launch, compared by every restart
    units.json           the unit plan: the corpus files (size, mtime) and their work units
    ledger/              claims and done records of units, launches (pipeline.stage1_cache.ledger)
    cache-u{unit:07d}-l{launch:06d}-{n:04d}.tar   shards of a unit, written as `*.tar.tmp`
    manifest.json        merged by rank 0 when every unit is done (the reader's entry point)
    quarantine/          damaged shards moved aside by `inspect_cache.py --verify --quarantine`

Training settings never enter the header, so changing a training knob never invalidates a
cache. A run into a directory whose header differs is refused, naming the fields.
Version-1 caches (rank parts manifest.r*.json, shards cache-r{rank:04d}-{n:06d}.tar, keys
{rank:04d}-{window:09d}) are still read by the reader and `inspect_cache.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
HEADER = "header.json"
UNITS = "units.json"
READABLE_VERSIONS = (1, 2, 3, 4)
# Format 3 = format 2 + a `trainable.bits` member in every sample (chat caches, issue 15).
# Text caches are still written as version 2, byte for byte as before.
MASKED_FORMAT_VERSION = 3
# Format 4 = a text cache with allocated U (`--class-budget`, issue 25): U_t records per
# position and a count byte each (codec.RecordCodec.pack_allocated).
ALLOCATED_FORMAT_VERSION = 4


def masked_format(format_version: int | None) -> bool:
    """Samples carry trainable.bits (format 3, chat caches)."""
    return format_version == MASKED_FORMAT_VERSION


def allocated_format(format_version: int | None) -> bool:
    """Positions hold U_t records and a count byte (format 4)."""
    return format_version == ALLOCATED_FORMAT_VERSION

# teacher_parameters and teacher_weights (sha256 of every weight file) identify the teacher
# by its weights: the same path holding another model is refused, not mixed into the cache.
HEADER_KEYS = ("format_version", "teacher", "teacher_parameters", "teacher_weights",
               "teacher_dtype", "teacher_logits", "vocab_size",
               "tokenizer_fingerprint", "seq_len",
               "num_classes", "id_bits", "w_bits", "sampler", "sampler_args",
               "teacher_temperature", "seed", "dataset", "dataset_fingerprint", "max_windows",
               "weight_codebook", "entropy_codebook", "shard_samples", "chunk_positions",
               "unit_bytes", "sampler_chunk", "class_budget", "class_ceiling", "window_records")
# Keys only allocated caches (format 4) have: a cache's identity includes them only when
# present, so the identity of every cache written before them is unchanged.
ALLOCATION_KEYS = ("class_budget", "class_ceiling", "window_records")
# Header keys added after caches were first written, and the value those caches used.
HEADER_DEFAULTS = {"sampler_chunk": 2048}

# What a decoder written from scratch needs, stored in every manifest (docs/CACHE_FORMAT.md).
LAYOUT = {
    "container": "POSIX tar files (WebDataset shards); one sample per window, members "
                 "'{key}.tokens.u32' and '{key}.kd.bin'; key = 'u{unit:07d}-w{window:07d}'",
    "tokens.u32": "seq_len token ids, uint32 little-endian: the exact inputs the teacher saw",
    "kd.bin": "seq_len positions, position-major, each bytes_per_position = 3*num_classes + 1 "
              "bytes: num_classes records of 3 bytes, then 1 entropy byte",
    "record": "r = b0 | b1 << 8 | b2 << 16 (24-bit little-endian); class id = r & "
              "(2**id_bits - 1); weight code = r >> id_bits; id == sentinel (2**id_bits - 1) "
              "is an empty slot (weight code 0); ids are distinct within a position",
    "weight": "weight_codebook[weight code] (float32): an unnormalised, unbiased estimate "
              "p_hat of the class's probability under softmax(logits / teacher_temperature) "
              "(E[p_hat] = p); it can exceed p, a position's weights need not sum to 1",
    "entropy": "entropy_codebook[entropy byte]: the teacher's exact entropy at the position, "
               "in nats, rounded to the nearest level (error <= entropy_max_error)",
    "classes": "class ids index the first vocab_size teacher logits (len(tokenizer)); the "
               "teacher_logits - vocab_size padded logits are dropped before sampling, and "
               "their probability mass is reported in stats.dropped_mass_sum / _max",
}
MASKED_LAYOUT = {
    **LAYOUT,
    "container": "POSIX tar files (WebDataset shards); one sample per window, members "
                 "'{key}.tokens.u32', '{key}.kd.bin' and '{key}.trainable.bits'; key = "
                 "'u{unit:07d}-w{window:07d}'",
    "trainable.bits": "ceil(seq_len / 8) bytes: numpy.packbits of seq_len flags, "
                      "bitorder='little' (position p = bit p % 8 of byte p // 8, unused high "
                      "bits 0); flag p: kd.bin position p (the prediction of token p+1) is a "
                      "training target (its next token belongs to an assistant turn). A "
                      "position whose flag is 0 holds num_classes sentinel records of weight "
                      "code 0 (its entropy byte is the teacher's entropy as usual)",
}


ALLOCATED_LAYOUT = {
    **LAYOUT,
    "kd.bin": "seq_len count bytes (U_t: position t's records, 1..num_classes, summing to "
              "window_records), then seq_len entropy bytes, then the window_records records of "
              "3 bytes in position order (position 0's U_0 records first): 2*seq_len + "
              "3*window_records bytes",
}


def layout(masked: bool = False, allocated: bool = False) -> dict:
    """The `layout` a header stores: version 2's, version 3's (with trainable.bits) or
    version 4's (allocated records)."""
    return MASKED_LAYOUT if masked else ALLOCATED_LAYOUT if allocated else LAYOUT


def unit_shard_name(unit: int, launch: int, n: int) -> str:
    return f"cache-u{unit:07d}-l{launch:06d}-{n:04d}.tar"


def window_key(unit: int, k: int) -> str:
    """The `__key__` of window k of a unit: names the unit and the window inside it."""
    return f"u{unit:07d}-w{k:07d}"


SHARD_FILE_RULE = ("a shard `file` must be a plain file name in the cache directory, of the "
                   "form cache-u{unit:07d}-l{launch:06d}-{n:04d}.tar (version 2) or "
                   "cache-r{rank:04d}-{n:06d}.tar (version 1) the cache stage writes (no '/', "
                   "no '\\', not '.' or '..', not absolute, not empty)")
_SHARD_FILE_RE = re.compile(r"cache-u[0-9]{7}-l[0-9]{6}-[0-9]{4}\.tar|cache-r[0-9]{4}-[0-9]{6}\.tar")


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


UNIT_SHARD_RE = re.compile(r"cache-u([0-9]{7})-l([0-9]{6})-([0-9]{4})\.tar")
"""A version-2 shard name: groups unit, launch, n."""
UNIT_FIELDS = ("windows", "documents", "tokens", "sha256", "launch", "rank")
"""The fields a done record and its unit's manifest.json entry both hold, and must agree on."""


def unit_disagreements(u: int, *, seq_len: int, text: bool, record: dict | None = None,
                       source: str = "", planned: dict | None = None,
                       manifest_unit: dict | None = None, manifest_shards: list | None = None,
                       on_disk: Any = ()) -> list[str]:
    """What the sources a restart has about unit `u` disagree on; empty when they agree.

    `record`: its done record (`source`: where it lives, e.g. ledger/unit-0000003.done.json),
    or None; `planned`: its units.json entry; `manifest_unit` / `manifest_shards`: its
    manifest.json entry and shard entries (None: no manifest); `on_disk`: the shard file
    names in the cache directory. Checked: the record's window count against its shard
    entries (window indices 0..windows-1 in order, positions = windows x T), against
    units.json (a --max-windows cap) and, for text (`text`), against its tokens (a text unit
    has tokens // T windows); every record field and shard entry against the manifest's; and
    that the record lists every shard its own launch wrote for the unit (a shard of the
    record's launch that it does not list). Without a record, the manifest's entry is
    checked the same way. Each problem names the files. Reads nothing."""
    out: list[str] = []
    if record is not None:
        out += _count_problems(u, source, record, record.get("shards"), planned, seq_len, text)
    elif manifest_unit is not None:
        out += _count_problems(u, MANIFEST, manifest_unit, manifest_shards, planned, seq_len, text)
    if record is not None and manifest_unit is not None:
        for k in UNIT_FIELDS:
            if record.get(k) != manifest_unit.get(k):
                out.append(f"{source} says {k} {record.get(k)!r}, {MANIFEST} says "
                           f"{manifest_unit.get(k)!r}")
        out += _shard_entry_problems(u, source, record.get("shards"), manifest_shards or [])
    launch = record.get("launch") if record is not None else None
    if isinstance(launch, int) and isinstance(record.get("shards"), list):
        listed = {s.get("file") for s in record["shards"] if isinstance(s, dict)}
        unlisted = [name for name in sorted(on_disk)
                    if (m := UNIT_SHARD_RE.fullmatch(name)) and int(m.group(1)) == u
                    and int(m.group(2)) == launch and name not in listed]
        if unlisted:
            out.append(f"{', '.join(unlisted)} on disk: shard(s) of unit {u} written by launch "
                       f"{launch}, the launch of {source}, which does not list them")
    return out


def _count_problems(u: int, where: str, entry: dict, shards: Any, planned: dict | None,
                    seq_len: int, text: bool) -> list[str]:
    """A record's (or manifest entry's) window count against its shard entries, units.json
    and its tokens."""
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        return [f"{where} has no list of shard entries for unit {u}"]
    out = []
    for s in shards:
        m = UNIT_SHARD_RE.fullmatch(s["file"]) if isinstance(s.get("file"), str) else None
        if m is None or int(m.group(1)) != u or s.get("unit") != u:
            out.append(f"{where} lists {s.get('file')!r} (unit {s.get('unit')!r}), not a "
                       f"shard of unit {u}")
    windows = entry.get("windows")
    held = [k for s in shards for k in (s.get("windows") if isinstance(s.get("windows"), list)
                                        else [])]
    samples = sum(_int0(s.get("samples")) for s in shards)
    positions = sum(_int0(s.get("positions")) for s in shards)
    names = ", ".join(str(s.get("file")) for s in shards) or "none"
    if not isinstance(windows, int) or samples != windows or held != list(range(windows)):
        out.append(f"{where} records {windows!r} window(s) of unit {u}, but its shard entries "
                   f"({names}) hold {samples}" + ("" if held == list(range(samples)) else
                                                  " with other window indices than 0..n-1"))
    if positions != samples * seq_len:
        out.append(f"{where}: its shard entries of unit {u} hold {positions} positions, not "
                   f"{samples} windows x T={seq_len}")
    cap = (planned or {}).get("max_windows")
    if cap is not None and windows != cap:
        out.append(f"{where} records {windows!r} window(s); {UNITS} caps unit {u} at {cap} "
                   "(--max-windows)")
    tokens = entry.get("tokens")
    if (text and cap is None and isinstance(tokens, int) and isinstance(windows, int)
            and tokens // seq_len != windows):
        out.append(f"{where} records {windows} window(s), but unit {u}'s {tokens} tokens make "
                   f"{tokens // seq_len} window(s) of T={seq_len}")
    return out


def _int0(x: Any) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) else 0


SHARD_FIELDS = ("file", "unit", "samples", "positions", "windows", "bytes", "sha256")


def _shard_entry_problems(u: int, source: str, mine: Any, theirs: list) -> list[str]:
    """A done record's shard entries against manifest.json's entries of the same unit."""
    if not isinstance(mine, list) or not all(isinstance(s, dict) for s in mine):
        return []                                   # named by _count_problems
    a = {s.get("file"): s for s in mine}
    b = {s.get("file"): s for s in theirs}
    out = []
    only_m = [str(f) for f in b if f not in a]
    only_r = [str(f) for f in a if f not in b]
    if only_m:
        out.append(f"{MANIFEST} lists {', '.join(only_m)} for unit {u}, {source} does not")
    if only_r:
        out.append(f"{source} lists {', '.join(only_r)}, {MANIFEST} does not")
    for f in a:
        if f in b:
            fields = [k for k in SHARD_FIELDS if a[f].get(k) != b[f].get(k)]
            if fields:
                out.append(f"the entries of {f} in {source} and {MANIFEST} differ in "
                           f"{', '.join(fields)}")
    if not out and [s.get("file") for s in mine] != [s.get("file") for s in theirs]:
        out.append(f"{source} and {MANIFEST} list unit {u}'s shards in another order")
    return out


QUARANTINE = "quarantine"
"""Subfolder of a cache directory into which `tools/inspect_cache.py --verify --quarantine`
moves the shards and done records of damaged units (nothing is deleted)."""


def repair_command(out: Path | str) -> str:
    """The command that moves damaged shards aside; the stage's errors name it."""
    return f"python tools/inspect_cache.py {out} --verify --quarantine"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from e


def header_diff(existing: dict, header: dict) -> list[str]:
    """Human-readable differences between two headers (only the keys that determine records)."""
    diffs = []
    for k in HEADER_KEYS:
        a, b = existing.get(k, HEADER_DEFAULTS.get(k)), header.get(k, HEADER_DEFAULTS.get(k))
        if a != b and k == "teacher_weights":
            diffs.append(teacher_weights_diff(a, b, header.get("teacher")))
        elif a != b:
            sa, sb = json.dumps(a)[:120], json.dumps(b)[:120]
            line = f"{k}: cache has {sa}, this run has {sb}"
            if isinstance(a, dict) and isinstance(b, dict):   # e.g. dataset: name the field
                subs = [f"{j}: {json.dumps(a.get(j))[:70]} -> {json.dumps(b.get(j))[:70]}"
                        for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
                line += f" (differs in {'; '.join(subs)})"
            diffs.append(line)
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


def check_compatible(out: Path, header: dict) -> None:
    """Refuse to mix runs: compare `header` with the cache directory's header.json (and a
    merged manifest.json, which carries the header's keys at its top level)."""
    for f in (out / HEADER, out / MANIFEST):
        if f.exists():
            diffs = header_diff(read_json(f), header)
            if diffs:
                raise ValueError(
                    f"--out {out} holds a different cache ({f.name}); refusing to mix:\n  "
                    + "\n  ".join(diffs) + "\nUse a new --out directory (or delete this one).")
    old = sorted(out.glob("manifest.r[0-9][0-9][0-9][0-9].json"))
    if old:
        raise ValueError(f"--out {out} holds an unfinished version-1 cache ({old[0].name}); this "
                         "version writes format 2 (work units): use a new --out directory")


def merge_stats(parts: list[dict]) -> dict[str, Any]:
    """Sum per-unit statistics (lists elementwise; *_max keys by max)."""
    stats: dict[str, Any] = {}
    for st in parts:
        for k, v in st.items():
            if isinstance(v, list):
                stats[k] = [a + b for a, b in zip(stats[k], v)] if k in stats else list(v)
            elif k.endswith("_max"):
                stats[k] = max(stats.get(k, v), v)
            else:
                stats[k] = stats.get(k, 0) + v
    return stats


def merge_units(header: dict, plan: dict, done: dict[int, dict], launch_ranks: list[dict]) -> dict:
    """Rank 0: the manifest from every unit's done record, shards in unit order.

    `launch_ranks`: this launch's per-rank reading counts (documents, tokens, bytes read).
    The record of who read what is kept per launch and rank under `reads`; per unit, the
    window count, documents, tokens, the sha256 of its bytes, and which launch/rank made it."""
    units = [u["unit"] for u in plan["units"]]
    shards = [s for u in units for s in done[u]["shards"]]
    launches: dict[str, dict] = {}
    for u in units:
        rec = done[u]
        lr = launches.setdefault(str(rec["launch"]), {})
        r = lr.setdefault(str(rec["rank"]), {"units": 0, "documents": 0, "tokens": 0, "bytes": 0,
                                             "windows": 0, "node": rec.get("node")})
        r["units"] += 1
        for k in ("documents", "tokens", "bytes", "windows"):
            r[k] += rec[k]
    return {
        **header,
        "units": [{"unit": u, "file": plan["files"][p["file"]]["path"], "start": p["start"],
                   "last_file": plan["files"][p["last_file"]]["path"], "end": p["end"],
                   "windows": done[u]["windows"],
                   "documents": done[u]["documents"], "tokens": done[u]["tokens"],
                   "sha256": done[u]["sha256"], "launch": done[u]["launch"],
                   "rank": done[u]["rank"]}
                  for u, p in zip(units, plan["units"])],
        "launches": launches,
        "world_size": len(launch_ranks),          # ranks of the launch that finished the cache
        "this_launch": launch_ranks,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "positions": sum(s["positions"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "wall_time_s": max((r.get("wall_time_s", 0.0) for r in launch_ranks), default=0.0),
        "stats": merge_stats([done[u]["stats"] for u in units]),
    }


def load_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        started = (Path(cache_dir) / UNITS).exists() or any(Path(cache_dir).glob("manifest.r*.json"))
        hint = (" (the cache run did not finish; rerun `python -m pipeline.cache` with the same "
                "arguments to complete it)") if (Path(cache_dir) / UNITS).exists() else (
                " (an unfinished version-1 cache: this version cannot complete it; re-cache into "
                "a new directory)") if started else ""
        raise FileNotFoundError(f"{path} does not exist{hint}")
    m = read_json(path)
    if m.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format_version {m.get('format_version')!r}; this reader knows "
                         f"{list(READABLE_VERSIONS)}: rebuild the cache with this version's "
                         "`python -m pipeline.cache`")
    return m


def cache_identity(m: dict) -> str:
    """sha256 of what a cache's targets depend on: its header and every shard's name and
    sha256. Equal for the same cache wherever it is moved or copied (and after a rerun of
    the stage that only re-merged its parts); different after any re-cache, repair or edit
    that changes a shard. Training checkpoints record it, and a resume compares it."""
    body = {"header": {k: m.get(k) for k in HEADER_KEYS if k not in ALLOCATION_KEYS or k in m},
            "shards": [[s["file"], s["sha256"]] for s in m["shards"]]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
