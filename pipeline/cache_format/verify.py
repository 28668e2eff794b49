"""A whole cache verified from what a reader needs: manifest.json and the shards it lists.

    res = verify_shards(cache_dir, manifest)   # every shard and sample, the statistics

Every shard entry must name a plain shard file inside the cache directory
(manifest.shard_path; such a shard is bad and never opened); every shard file must have its
entry's size and sha256 (checks.shard_file_problem), hold the samples and positions the entry
records, under keys of its own unit (or rank, version 1) and the window indices its entry
lists, no key twice in the cache, and every sample must pass checks.check_sample. The
records' statistics (shards.add_sample_stats) are returned per unit and for the whole cache;
`stats_differ` compares them with the manifest's (or a done record's).

Stage 1 checks its own sources on top (pipeline.stage1_cache.audit: the ledger's done records
and units.json against each other and against these results); `tools/inspect_cache.py
--verify` runs both.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache_format.checks import (TAR_ERRORS, UNIT_KEY_RE, check_sample,
                                          shard_file_problem, shard_label, shard_owner,
                                          tar_samples)
from pipeline.cache_format.codec import RecordCodec
from pipeline.cache_format.manifest import MANIFEST, masked_format, merge_stats, shard_path
from pipeline.cache_format.shards import add_sample_stats, empty_stats

MAX_PROBLEMS = 5                # per shard, so one bad shard does not flood the report


def is_masked(h: dict) -> bool:
    """A cache whose samples carry trainable.bits (format version 3), from its header."""
    return masked_format(h.get("format_version"))


def verify_shard(cache_dir: Path, s: dict, codec: RecordCodec, seq_len: int,
                 format_version: int, seen_keys: set[str], source: str = MANIFEST
                 ) -> tuple[list[str], dict]:
    """(the problems of the shard entry `s`, each one line naming the shard (`shard_label`),
    empty when it is good; the statistics of its decodable samples (shards.empty_stats)).

    `source`: the file holding the entry (manifest.json, or a done record); `seen_keys`: the
    keys of the shards verified before, to which this shard's are added. An entry whose
    `file` is not a plain shard name inside `cache_dir` is a problem, and nothing is opened."""
    stats = empty_stats(codec.num_classes, masked_format(format_version))
    try:
        path = shard_path(cache_dir, s.get("file"), source=source)
    except ValueError as e:
        return [f"{Path(cache_dir) / str(s.get('file'))}: {e}"], stats
    label = shard_label(path, s)
    try:
        data = path.read_bytes()
    except OSError as e:
        return [f"{label}: cannot read ({e.strerror or e})"], stats
    problems = [p for p in (shard_file_problem(path, s, source, data),) if p is not None]
    owner = shard_owner(s["file"])
    found, samples, positions, windows = [], 0, 0, []
    try:
        for key, members in tar_samples(data):
            samples += 1
            p, sample = check_sample(codec, seq_len, format_version, key, members, owner)
            if (km := UNIT_KEY_RE.match(key)) is not None:
                windows.append(int(km.group(2)))
            if key in seen_keys:
                p.append(f"sample {key} appears in more than one place")
            seen_keys.add(key)
            found += p
            if sample is not None:
                positions += len(sample.entropy_codes)
                add_sample_stats(stats, sample, masked_format(format_version))
    except TAR_ERRORS as e:
        found.append(f"unreadable tar after {samples} sample(s): {e}")
    if (samples, positions) != (s["samples"], s["positions"]):
        found.append(f"{samples} samples / {positions} positions decoded, {source} says "
                     f"{s['samples']} / {s['positions']}")
    if "windows" in s and owner is not None and owner[0] == "unit" and windows != list(s["windows"]):
        found.append("its keys are not the windows its entry records")
    problems += [f"{label}: {x}" for x in found]
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"{label}: ... and {len(problems) - MAX_PROBLEMS} more"]
    return problems, stats


def stats_differ(got: dict, want: dict, masked: bool) -> bool:
    """Whether statistics recomputed from records (`got`, shards.empty_stats) differ from
    recorded ones (`want`: manifest.json's or a done record's `stats`) in what the records
    give back: the entropy and distinct-class histograms, and for a version-3 cache
    (`masked`) the trainable positions."""
    return (got["entropy_code_hist"] != list(want.get("entropy_code_hist", []))
            or got["distinct_hist"] != list(want.get("distinct_hist", []))
            or (masked and got["trainable_positions"] != want.get("trainable_positions")))


def verify_shards(cache_dir: Path, m: dict) -> dict:
    """Every shard of manifest `m` (`verify_shard`), and the manifest's id/w bits against V.

    Returns {"shards": [{file, unit, ok, problems}] in manifest order, "bad_shards": [file],
    "problems": [the manifest's own], "stats": the records' statistics over every shard,
    "unit_stats": {unit: the statistics of its shards} (unit None for version-1 shards)}."""
    codec = RecordCodec.from_header(m)
    problems = []
    if (codec.id_bits, codec.w_bits) != (m["id_bits"], m["w_bits"]):
        problems.append(f"manifest id/w bits {m['id_bits']}/{m['w_bits']} disagree with "
                        f"V={m['vocab_size']} ({codec.id_bits}/{codec.w_bits})")
    fv = m.get("format_version") or 0
    seen: set[str] = set()
    results, parts, by_unit = [], [], {}
    for s in m["shards"]:
        p, st = verify_shard(cache_dir, s, codec, m["seq_len"], fv, seen)
        owner = shard_owner(s.get("file"))
        u = owner[1] if owner is not None and owner[0] == "unit" else None
        results.append({"file": s["file"], "unit": u, "ok": not p, "problems": p})
        parts.append(st)
        by_unit.setdefault(u, []).append(st)
    empty = empty_stats(m["num_classes"], is_masked(m))
    return {"shards": results, "bad_shards": [r["file"] for r in results if not r["ok"]],
            "problems": problems, "stats": merge_stats([empty, *parts]),
            "unit_stats": {u: merge_stats(sts) for u, sts in by_unit.items()}}
