"""tools/inspect_cache.py --verify and --verify --quarantine on copies of a real tiny cache of
format version 2 (tests/inspect_tool.py), damaged by hand: a truncated or flipped shard,
records and keys damaged with the manifest's size and sha256 updated to match, shard entries
outside the cache directory, a repair that a rerun of the stage completes; and a version-1
cache built by hand from the same samples, which still reports and verifies. Only the
damaged shard or unit may be named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inspect_tool import cache, stage  # noqa: F401  (fixtures)
from inspect_tool import (KEY, ROOT, SHARD_NAME, SHARD_SAMPLES, T, TOOL, U, WINDOWS, all_samples,
                          decoded_records, read_json, run_tool, shard_files, tar_samples, units_on_disk)
from references import move_shard_outside


# The fixtures `stage` (the tiny cache and the stage's arguments) and `cache` (its directory)
# come from inspect_tool, built once per session.


def test_verify_good_cache(cache):
    proc = run_tool(cache, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = read_json(cache, "--verify")
    v = rep["verify"]
    assert v["ok"] and v["bad_shards"] == [] and v["stats_match"] is True
    assert [r["file"] for r in v["shards"]] == [p.name for p in shard_files(cache)]


def corrupt_copy(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    return bad, shard_files(bad)[1]


def assert_only_bad(proc: subprocess.CompletedProcess, bad_shard: Path, cache: Path) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert bad_shard.name in out
    for p in shard_files(cache):
        if p != bad_shard:
            assert f"{p.name}:" not in out, f"good shard {p.name} reported bad:\n{out}"


def test_verify_truncated_shard(cache, tmp_path):
    bad, shard = corrupt_copy(cache, tmp_path)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert_only_bad(run_tool(bad, "--verify"), shard, bad)


def test_verify_flipped_byte(cache, tmp_path):
    bad, shard = corrupt_copy(cache, tmp_path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(data)
    proc = run_tool(bad, "--verify")
    assert_only_bad(proc, shard, bad)
    assert "sha256" in proc.stdout


@pytest.mark.parametrize("damage,message", [("id_outside_v", "outside V="),
                                            ("weighted_sentinel", "sentinel slot"),
                                            ("repeated_id", "repeat a class id")])
def test_verify_bad_record_with_matching_hash(cache, tmp_path, damage, message):
    """Damaged records with the manifest's size and sha256 updated to match: only the
    record checks can catch them."""
    import hashlib

    bad, shard = corrupt_copy(cache, tmp_path)
    m = json.loads((bad / "manifest.json").read_text())
    V = m["vocab_size"]
    id_bits = V.bit_length()
    sentinel = (1 << id_bits) - 1
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        kd = next(x for x in tf.getmembers() if x.name.endswith(".kd.bin"))
    B = 3 * U + 1

    def record(pos: int, slot: int) -> int:
        off = kd.offset_data + pos * B + 3 * slot
        return int.from_bytes(data[off:off + 3], "little")

    def put(pos: int, slot: int, rec: int) -> None:
        off = kd.offset_data + pos * B + 3 * slot
        data[off:off + 3] = rec.to_bytes(3, "little")

    ids = np.array([[record(t, k) & sentinel for k in range(U)] for t in range(T)])
    if damage == "id_outside_v":                 # an id in [V, sentinel)
        put(0, 0, (record(0, 0) >> id_bits << id_bits) | V)
    elif damage == "weighted_sentinel":          # a padding slot with weight code 1
        t, k = np.argwhere(ids == sentinel)[0]   # the rskd fixture pads some positions
        put(t, k, (1 << id_bits) | sentinel)
    else:                                        # slot 1 repeats slot 0's class
        t = int(np.argmax((ids != sentinel).sum(1) >= 2))
        put(t, 1, (record(t, 1) >> id_bits << id_bits) | int(ids[t, 0]))
    shard.write_bytes(data)
    for s in m["shards"]:
        if s["file"] == shard.name:
            s["sha256"] = hashlib.sha256(data).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(m))
    proc = run_tool(bad, "--verify")
    assert_only_bad(proc, shard, bad)
    assert message in proc.stdout
    rep = json.loads(run_tool(bad, "--verify", "--json").stdout)
    assert rep["verify"]["bad_shards"] == [shard.name] and not rep["verify"]["ok"]


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under `d` (ledger/ included), by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def rewrite_keys(shard: Path, new_key) -> bytes:
    """Rewrite `shard` with every member's key replaced by new_key(key) (tarfile); returns
    the new bytes. The member data stays as it was."""
    import io

    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for member in src.getmembers():
            key, _, ext = member.name.partition(".")
            info = tarfile.TarInfo(f"{new_key(key)}.{ext}")
            info.size, info.mtime, info.mode = member.size, 0, member.mode
            dst.addfile(info, src.extractfile(member))
    shard.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("keys,message", [
    ("another_unit", "belongs to unit 7, shard is unit 1"),
    ("version_1", "is not unit-window"),
])
def test_verify_flags_keys_of_another_unit(cache, tmp_path, keys, message):
    """Unit 1's first shard with its samples renamed to unit 7 (a unit no other shard holds,
    so no key repeats) or to version-1 keys, the manifest's size and sha256 updated: only
    the key checks can catch it, and only that shard is bad."""
    import hashlib

    bad, shard = corrupt_copy(cache, tmp_path)
    assert SHARD_NAME.match(shard.name).group(1) == "0000001"

    def rename(key: str) -> str:
        u, w = map(int, KEY.match(key).groups())
        assert u == 1
        return f"u{7:07d}-w{w:07d}" if keys == "another_unit" else f"{u:04d}-{w:09d}"

    data = rewrite_keys(shard, rename)
    m = json.loads((bad / "manifest.json").read_text())
    (entry,) = [s for s in m["shards"] if s["file"] == shard.name]
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (bad / "manifest.json").write_text(json.dumps(m))
    proc = run_tool(bad, "--verify")
    assert_only_bad(proc, shard, bad)
    assert message in proc.stdout, proc.stdout
    rep = json.loads(run_tool(bad, "--verify", "--json").stdout)
    assert rep["verify"]["bad_shards"] == [shard.name] and not rep["verify"]["ok"]


def test_quarantine_on_a_good_cache_changes_nothing(cache, tmp_path):
    good = tmp_path / "cache"
    shutil.copytree(cache, good)
    before = snapshot(good)
    assert any(k.startswith("ledger/") and k.endswith(".done.json") for k in before)
    proc = run_tool(good, "--verify", "--quarantine")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to quarantine" in proc.stdout
    proc = run_tool(good, "--verify", "--quarantine", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    assert res["ok"] and res["quarantined"] == [] and res["manifest_moved_to"] is None
    assert res["shards_checked"] == len(shard_files(good))
    assert not (good / "quarantine").exists()
    assert snapshot(good) == before


def test_quarantine_moves_damaged_units_and_a_rerun_recomputes_them(stage, tmp_path):
    """A flipped byte in the first of unit 1's two shards, unit 2's shard file gone: both
    units' shards (the good one of unit 1 too) and their done records move into
    quarantine/ (nothing deleted), manifest.json too (the cache reads as unfinished); unit 0
    is untouched. A rerun of the cache stage with the same arguments recomputes units 1
    and 2 into shards with new names (launch 2), and the cache verifies with the same
    records per key as before the damage."""
    from pipeline.stage1_cache.run import main as cache_main

    cache = stage.cache
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    units = units_on_disk(bad)
    assert sorted(units) == [0, 1, 2] and len(units[1]) == 2 and len(units[2]) == 1, units
    names = {u: [n for n, _ in shards] for u, shards in units.items()}
    flipped, gone = bad / names[1][0], bad / names[2][0]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x40
    flipped.write_bytes(data)
    gone.unlink()
    before = snapshot(bad)
    done = {u: (bad / "ledger" / f"unit-{u:07d}.done.json").read_bytes() for u in units}

    assert run_tool(bad, "--quarantine").returncode == 2          # needs --verify
    assert snapshot(bad) == before
    work = tmp_path / "text"                                      # the table output, on a copy
    shutil.copytree(bad, work)
    proc = run_tool(work, "--verify", "--quarantine")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "BAD unit 1:" in out and "BAD unit 2:" in out and "BAD unit 0" not in out, out
    assert names[1][0] in out and names[2][0] in out and "rerun the cache stage" in out, out

    proc = run_tool(bad, "--verify", "--quarantine", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    q = bad / "quarantine"
    assert res["ok"] is False and res["shards_checked"] == sum(map(len, names.values()))
    assert res["manifest_moved_to"] == str(q / "manifest.json")
    by_unit = {x["unit"]: x for x in res["quarantined"]}
    assert sorted(by_unit) == [1, 2]
    assert sorted(by_unit[1]["moved_to"]) == sorted(
        [str(q / n) for n in names[1]] + [str(q / "unit-0000001.done.json")])
    assert by_unit[2]["moved_to"] == [str(q / "unit-0000002.done.json")]   # its shard is gone
    assert any(names[1][0] in p and "sha256" in p for p in by_unit[1]["problems"])
    assert not any(names[1][1] in p for p in by_unit[1]["problems"])     # the good one: moved only
    assert any(names[2][0] in p for p in by_unit[2]["problems"])
    assert by_unit[1]["samples"] == sum(len(ks) for _, ks in units[1])
    assert by_unit[2]["samples"] == len(units[2][0][1])

    after = snapshot(bad)
    moved = {f"quarantine/{n}": before[n] for n in names[1]}
    moved |= {f"quarantine/unit-{u:07d}.done.json": done[u] for u in (1, 2)}
    moved["quarantine/manifest.json"] = before["manifest.json"]
    gone_paths = {*names[1], "manifest.json", "ledger/unit-0000001.done.json",
                  "ledger/unit-0000002.done.json"}
    assert after == {k: v for k, v in before.items() if k not in gone_paths} | moved
    assert moved["quarantine/" + names[1][0]] == bytes(data)       # the damaged bytes, kept
    proc = run_tool(bad)
    assert proc.returncode == 2 and "did not finish" in proc.stderr, proc.stderr
    proc = run_tool(bad, "--verify", "--quarantine")               # nothing left to do
    assert proc.returncode == 0 and "nothing to quarantine" in proc.stdout, proc.stdout

    cache_main([*stage.args, "--out", str(bad)])                   # the repair: rerun the stage
    rep = read_json(bad, "--verify")
    assert rep["verify"]["ok"] and rep["verify"]["stats_match"] is True, rep["verify"]
    again = units_on_disk(bad)
    assert [n for n, _ in again[0]] == names[0]                   # unit 0: the same files
    for n in names[0]:
        assert (bad / n).read_bytes() == before[n]
    for u in (1, 2):                                              # recomputed by launch 2
        assert [SHARD_NAME.match(n).group(2) for n, _ in again[u]] == ["000002"] * len(again[u])
        assert not {n for n, _ in again[u]} & set(names[u])
        assert [ks for _, ks in again[u]] == [ks for _, ks in units[u]]
    assert all_samples(bad) == all_samples(cache)                 # records per key, unchanged
    old, new = (json.loads((d / "manifest.json").read_text()) for d in (cache, bad))
    for k in ("entropy_code_hist", "distinct_hist", "rskd_truncated_positions"):
        assert new["stats"][k] == old["stats"][k], k
    assert [x["launch"] for x in new["units"]] == [1, 2, 2]
    assert (q / names[1][0]).read_bytes() == bytes(data)          # quarantine/ is left alone
    assert read_json(bad)["stray_files"] == []


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    import io

    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext in ("tokens.u32", "kd.bin"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(members[ext]), 0
                tf.addfile(info, io.BytesIO(members[ext]))


def build_v1_cache(v2: Path, out: Path, world: int = 2) -> dict:
    """A finished version-1 cache by hand, holding the v2 fixture's samples: window k of the
    corpus stream (the v2 windows in unit order) was cached by rank k % world under the key
    {rank:04d}-{k:09d}, in shards cache-r{rank:04d}-{n:06d}.tar of SHARD_SAMPLES windows;
    rank parts manifest.r{rank:04d}.json and a manifest.json of format_version 1 (the
    version-1 fields: no layout, unit list, teacher_logits or dropped mass)."""
    import hashlib

    m2 = json.loads((v2 / "manifest.json").read_text())
    stream = list(all_samples(v2, [v2 / s["file"] for s in m2["shards"]]).values())
    out.mkdir()
    header = {k: v for k, v in m2.items() if k in (
        "teacher", "teacher_parameters", "teacher_weights", "teacher_dtype", "vocab_size",
        "tokenizer_fingerprint", "eos_token_id", "seq_len", "num_classes", "id_bits", "w_bits",
        "sentinel", "bytes_per_position", "sampler", "sampler_args", "chunk_positions",
        "teacher_temperature", "seed", "dataset", "dataset_fingerprint", "max_windows",
        "shard_samples", "weight_codebook", "entropy_codebook", "entropy_max_error")}
    header["format_version"] = 1
    V = header["vocab_size"]
    parts = []
    for rank in range(world):
        mine = [(f"{rank:04d}-{k:09d}", stream[k], k) for k in range(rank, len(stream), world)]
        shards = []
        for n in range(-(-len(mine) // SHARD_SAMPLES)):
            chunk = mine[n * SHARD_SAMPLES:(n + 1) * SHARD_SAMPLES]
            path = out / f"cache-r{rank:04d}-{n:06d}.tar"
            write_tar(path, [(key, members) for key, members, _ in chunk])
            data = path.read_bytes()
            shards.append({"file": path.name, "samples": len(chunk), "positions": len(chunk) * T,
                           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "rskd_truncated_positions": 0, "windows": [k for _, _, k in chunk]})
        ec, distinct, samples = decoded_records(out, V, [out / s["file"] for s in shards])
        stats = {"entropy_code_hist": np.bincount(ec, minlength=256).tolist(),
                 "distinct_hist": np.bincount(distinct, minlength=U + 1).tolist(),
                 "positions": samples * T, "samples": samples, "rskd_truncated_positions": 0}
        part = {"rank": rank, "header": header, "shards": shards, "finished": True,
                "stats": stats, "next_shard": len(shards), "world_size": world, "node": "test"}
        (out / f"manifest.r{rank:04d}.json").write_text(json.dumps(part))
        parts.append(part)
    shards = [s for p in parts for s in p["shards"]]
    m = {**header, "world_size": world,
         "ranks": {str(p["rank"]): {"shards": [s["file"] for s in p["shards"]],
                                    "finished": True, "node": "test"} for p in parts},
         "shards": shards, "samples": sum(s["samples"] for s in shards),
         "positions": sum(s["positions"] for s in shards),
         "bytes": sum(s["bytes"] for s in shards),
         "stats": {k: (np.sum([p["stats"][k] for p in parts], axis=0).tolist()
                       if isinstance(parts[0]["stats"][k], list)
                       else sum(p["stats"][k] for p in parts)) for k in parts[0]["stats"]}}
    (out / "manifest.json").write_text(json.dumps(m))
    return m


def test_version_1_cache_reports_and_verifies(cache, tmp_path):
    """A finished version-1 cache (rank shards and keys, rank parts, format_version 1) is still
    read: the report's numbers match the files, --verify passes and its key checks are the
    version-1 ones (a key of another rank is flagged), the reader yields every window, and
    --quarantine (version-2 repair) refuses it without touching anything."""
    import hashlib

    v1 = tmp_path / "v1"
    m = build_v1_cache(cache, v1)
    files = sorted(v1.glob("cache-r*.tar"))
    assert [p.name for p in files] == ["cache-r0000-000000.tar", "cache-r0000-000001.tar",
                                       "cache-r0001-000000.tar", "cache-r0001-000001.tar"]
    assert list(tar_samples(files[0]))[:2] == ["0000-000000000", "0000-000000002"]
    V = m["vocab_size"]
    rep = read_json(v1)
    on_disk = sum(os.stat(p).st_size for p in files)
    assert (rep["samples"], rep["positions"], rep["shards"]) == (WINDOWS, WINDOWS * T, 4)
    assert rep["bytes_on_disk"] == on_disk and rep["stray_files"] == []
    assert rep["reduction_vs_bf16"] == pytest.approx(2 * V / (on_disk / (WINDOWS * T)), rel=1e-12)
    ec, distinct, _ = decoded_records(v1, V, files)
    h = np.asarray(m["entropy_codebook"], dtype=np.float64)[ec]
    assert rep["entropy"]["mean"] == pytest.approx(h.mean(), rel=1e-9)
    assert rep["distinct"]["hist"] == np.bincount(distinct, minlength=U + 1).tolist()
    assert rep["settings"]["teacher_logits"] is None
    assert rep["settings"]["dropped_mass_mean"] is None
    proc = run_tool(v1)
    assert proc.returncode == 0 and "not recorded" in proc.stdout, proc.stdout + proc.stderr

    proc = run_tool(v1, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v = read_json(v1, "--verify")["verify"]
    assert v["ok"] and v["bad_shards"] == [] and v["stats_match"] is True
    assert [r["file"] for r in v["shards"]] == [p.name for p in files]

    from pipeline.cache_format.reader import CacheReader

    keys = set()
    for batch in CacheReader(v1, micro_batch=2).batches(epoch=0):
        for b, key in enumerate(batch.keys):
            ref = all_samples(v1, files)[key]
            assert batch.input_ids[b].tolist() == np.frombuffer(ref["tokens.u32"], "<u4").tolist()
            keys.add(key)
    assert keys == {f"{k % 2:04d}-{k:09d}" for k in range(WINDOWS)}

    before = snapshot(v1)
    proc = run_tool(v1, "--verify", "--quarantine")
    assert proc.returncode == 2 and "version-1" in proc.stderr, proc.stdout + proc.stderr
    assert snapshot(v1) == before

    # a rank-1 key inside a rank-0 shard (size and sha256 updated): that shard alone is bad
    shard = files[1]
    data = rewrite_keys(shard, lambda key: "0001" + key[4:])
    for s in m["shards"]:
        if s["file"] == shard.name:
            s["sha256"], s["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (v1 / "manifest.json").write_text(json.dumps(m))
    proc = run_tool(v1, "--verify")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "belongs to rank 1, shard is rank 0" in out, out
    for p in files:
        assert (p == shard) == (f"{p.name}:" in out), out


# Runs the tool with an audit hook that reports every file opened under a watched folder.
_RUN_WATCHING_OPENS = """
import os, runpy, sys
watched, tool = sys.argv[1], sys.argv[2]
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and watched in os.fsdecode(args[0]):
        os.write(2, f"OPENED {os.fsdecode(args[0])}\\n".encode())
sys.addaudithook(hook)
sys.argv = sys.argv[2:]
runpy.run_path(tool, run_name="__main__")
"""


@pytest.mark.parametrize("entry", ["relative", "absolute"])
def test_verify_refuses_shard_entries_outside_the_cache(cache, tmp_path, entry):
    """A manifest entry `../outside/NAME` or an absolute path, naming a real shard with the
    manifest's sha256 and size, is a bad shard for --verify (exit 1, the entry and the rule
    named) and the file is never opened; the other shards stay good."""
    bad, target, name = move_shard_outside(cache, tmp_path, 1, entry)
    outside = target.parent
    s = {"file": name}

    proc = subprocess.run([sys.executable, "-c", _RUN_WATCHING_OPENS, str(outside), str(TOOL),
                           str(bad), "--verify"], capture_output=True, text=True, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "OPENED" not in proc.stderr, out
    assert repr(s["file"]) in out and "plain file name in the cache directory" in out, out
    for p in shard_files(bad):
        assert f"{p.name}:" not in out, f"good shard {p.name} reported bad:\n{out}"
    rep = json.loads(run_tool(bad, "--verify", "--json").stdout)
    assert rep["verify"]["bad_shards"] == [s["file"]] and not rep["verify"]["ok"]
    (problem,) = next(r["problems"] for r in rep["verify"]["shards"] if r["file"] == s["file"])
    assert str(bad / "manifest.json") in problem and repr(s["file"]) in problem
    # The watch works: the same tool run on a cache whose shard lies in `outside` opens it.
    good = outside / "good-cache"
    shutil.copytree(cache, good)
    proc = subprocess.run([sys.executable, "-c", _RUN_WATCHING_OPENS, str(good), str(TOOL),
                           str(good), "--verify"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and f"OPENED {good / target.name}" in proc.stderr, proc.stderr
