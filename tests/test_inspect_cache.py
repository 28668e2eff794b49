"""tools/inspect_cache.py on a real tiny cache; every expected number is recomputed here
from the files themselves (os.stat, the tar members, the 24-bit records decoded by hand),
never taken from the tool's own code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "inspect_cache.py"
T, U, WINDOWS, SHARD_SAMPLES = 64, 12, 10, 4
WORDS = ("the quick brown fox jumps over lazy dog knowledge distillation teacher student "
         "number answer question because").split()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """10 windows of 64 tokens from a tiny llama; teacher temperature 0.1 spreads the
    entropies over 0 .. ln V; the rskd sampler with 14 draws pads most positions (fewer
    than U=12 distinct draws) and truncates some (more than 12)."""
    from pipeline.cache import main as cache_main
    from pipeline.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("inspect")
    teacher = build_tiny_model(root / "teacher", arch="llama", hidden=32)
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(60):
            words = rng.choice(WORDS, size=int(rng.integers(20, 200)))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    out = root / "cache"
    cache_main(["--teacher", str(teacher), "--data", str(root / "data.jsonl"), "--out", str(out),
                "--seq-len", str(T), "--max-windows", str(WINDOWS), "--shard-samples",
                str(SHARD_SAMPLES), "--batch-size", "2", "--sampler", "rskd",
                "--rskd-draws", "14", "--teacher-temperature", "0.1"])
    return out


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def read_json(*args) -> dict:
    proc = run_tool(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def shard_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("cache-r*.tar"))


def decoded_records(cache: Path, V: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(entropy codes [N], non-sentinel ids per position [N], samples) decoded by hand:
    bytes 3k..3k+2 of a position are record k (LE), its low bit_length(V) bits the id."""
    id_bits = V.bit_length()
    sentinel = (1 << id_bits) - 1
    ecodes, distinct, samples = [], [], 0
    for path in shard_files(cache):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".kd.bin"):
                    samples += 1
                    a = np.frombuffer(tf.extractfile(m).read(), np.uint8).reshape(T, 3 * U + 1)
                    r = a[:, :3 * U].reshape(T, U, 3).astype(np.int64)
                    ids = (r[..., 0] + 256 * r[..., 1] + 65536 * r[..., 2]) % (1 << id_bits)
                    distinct.append((ids != sentinel).sum(1))
                    ecodes.append(a[:, 3 * U].astype(np.int64))
    return np.concatenate(ecodes), np.concatenate(distinct), samples


def test_storage_numbers(cache):
    m = json.loads((cache / "manifest.json").read_text())
    V = m["vocab_size"]
    rep = read_json(cache)
    on_disk = sum(os.stat(p).st_size for p in shard_files(cache))
    _, _, samples = decoded_records(cache, V)
    assert samples == WINDOWS
    assert rep["samples"] == WINDOWS
    assert rep["positions"] == WINDOWS * T
    assert rep["shards"] == len(shard_files(cache)) == -(-WINDOWS // SHARD_SAMPLES)
    assert rep["bytes_on_disk"] == on_disk
    bpp = on_disk / (WINDOWS * T)
    assert rep["bytes_per_position"] == pytest.approx(bpp, rel=1e-12)
    assert rep["record_bytes_per_position"] == 37
    assert rep["reduction_vs_bf16"] == pytest.approx(2 * V / bpp, rel=1e-12)
    assert rep["reduction_vs_fp32"] == pytest.approx(4 * V / bpp, rel=1e-12)
    assert rep["reduction_vs_top128"] == pytest.approx(128 * 6 / bpp, rel=1e-12)
    # tar overhead: everything that is not 37 B of records + 4 B of tokens per position
    payload = WINDOWS * T * (37 + 4)
    assert rep["tar_overhead_fraction"] == pytest.approx((on_disk - payload) / payload)
    s = rep["settings"]
    assert (s["sampler"], s["seq_len"], s["num_classes"], s["vocab_size"]) == ("rskd", T, U, V)
    assert (s["id_bits"], s["w_bits"]) == (V.bit_length(), 24 - V.bit_length())
    assert s["rskd_truncated_fraction"] == pytest.approx(
        m["stats"]["rskd_truncated_positions"] / (WINDOWS * T))


def test_entropy_and_distinct_statistics(cache):
    m = json.loads((cache / "manifest.json").read_text())
    rep = read_json(cache)
    ec, distinct, _ = decoded_records(cache, m["vocab_size"])
    h = np.asarray(m["entropy_codebook"], dtype=np.float64)[ec]
    e = rep["entropy"]
    assert h.std() > 0.1, "the fixture should spread entropies (teacher temperature 0.1)"
    assert e["mean"] == pytest.approx(h.mean(), rel=1e-9)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):   # lower quantile = numpy's inverted_cdf
        assert e["quantiles"][f"p{round(q * 100):02d}"] == pytest.approx(
            np.quantile(h, q, method="inverted_cdf"), rel=1e-9)
    assert sum(e["hist_counts"]) == WINDOWS * T
    d = rep["distinct"]
    assert d["mean"] == pytest.approx(distinct.mean(), rel=1e-9)
    assert (d["min"], d["max"]) == (distinct.min(), distinct.max())
    assert d["fraction_padded"] == pytest.approx((distinct < U).mean())
    assert d["hist"] == np.bincount(distinct, minlength=U + 1).tolist()
    assert 0 < d["fraction_padded"] < 1, "the fixture should pad some positions, not all"


def test_table_output(cache):
    proc = run_tool(cache)
    assert proc.returncode == 0, proc.stderr
    for word in ("bytes on disk", "reduction vs bf16", "entropy histogram", "rskd"):
        assert word in proc.stdout


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


def test_quarantine_on_a_good_cache_changes_nothing(cache, tmp_path):
    good = tmp_path / "cache"
    shutil.copytree(cache, good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    proc = run_tool(good, "--verify", "--quarantine")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to quarantine" in proc.stdout
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_quarantine_moves_bad_shards_drops_entries_and_recomputes_part_stats(cache, tmp_path):
    """A flipped byte in shard 1, shard 2's file gone: both entries leave the part, the
    damaged file moves into quarantine/ (nothing deleted), manifest.json too (the cache
    reads as unfinished), the part's statistics are those of the shards kept (decoded by
    hand here) and its next shard number stays past every name used."""
    bad, shard = corrupt_copy(cache, tmp_path)
    names = [p.name for p in shard_files(bad)]
    assert len(names) == 3
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(data)
    (bad / names[2]).unlink()
    old = json.loads((bad / "manifest.r0000.json").read_text())
    manifest = (bad / "manifest.json").read_bytes()

    assert run_tool(bad, "--quarantine").returncode == 2          # needs --verify
    proc = run_tool(bad, "--verify", "--quarantine")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert names[1] in proc.stdout and names[2] in proc.stdout and f"{names[0]}:" not in proc.stdout
    assert "rerun the cache stage" in proc.stdout
    assert (bad / "quarantine" / names[1]).read_bytes() == bytes(data)
    assert (bad / "quarantine" / "manifest.json").read_bytes() == manifest
    assert [p.name for p in shard_files(bad)] == names[:1]
    assert not (bad / "manifest.json").exists()
    part = json.loads((bad / "manifest.r0000.json").read_text())
    assert [s["file"] for s in part["shards"]] == names[:1]
    assert part["finished"] is False and part["next_shard"] == 3
    assert part["header"] == old["header"]
    m = json.loads(manifest)
    ec, distinct, samples = decoded_records(bad, m["vocab_size"])   # the kept shard, by hand
    st = part["stats"]
    assert samples == SHARD_SAMPLES and st["samples"] == samples and st["positions"] == samples * T
    assert st["entropy_code_hist"] == np.bincount(ec, minlength=256).tolist()
    assert st["distinct_hist"] == np.bincount(distinct, minlength=U + 1).tolist()
    assert st["rskd_truncated_positions"] == old["shards"][0]["rskd_truncated_positions"]
    proc = run_tool(bad, "--verify", "--quarantine")                # nothing left to do
    assert proc.returncode == 0 and "nothing to quarantine" in proc.stdout, proc.stdout


def test_plot_writes_png(cache, tmp_path):
    out = tmp_path / "plots" / "entropy.png"
    proc = run_tool(cache, "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_missing_manifest(tmp_path):
    proc = run_tool(tmp_path)
    assert proc.returncode == 2
    assert "manifest.json does not exist" in proc.stderr
    (tmp_path / "manifest.r0000.json").write_text("{}")
    proc = run_tool(tmp_path)
    assert proc.returncode == 2
    assert "did not finish" in proc.stderr
    proc = run_tool(tmp_path / "nope")
    assert proc.returncode == 2 and "not a directory" in proc.stderr


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
    import hashlib

    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    m = json.loads((bad / "manifest.json").read_text())
    s = m["shards"][1]
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / s["file"]
    shutil.move(bad / s["file"], target)
    data = target.read_bytes()
    assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    s["file"] = f"../outside/{target.name}" if entry == "relative" else str(target)
    (bad / "manifest.json").write_text(json.dumps(m))

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
