"""What a restart of stage 1 (pipeline.cache) trusts when its sources disagree (issue 26,
points 2 and 3; docs/CACHE_FORMAT.md, "What a restart trusts").

A finished cache has four sources about each unit: its done record (ledger/), its shard
files, manifest.json (written from the records when the cache finished) and units.json (the
plan; a --max-windows cap). A rerun over a done record that disagrees with them refuses
(exit 1), naming the unit, the files and the repair, and deletes nothing; a lost ledger/
is rebuilt from a manifest whose shards verify, without recomputing anything. Every
expectation here is read from the files by hand (json, os.stat, sha256), never from the
stage's own helpers. One small cache (one rank, in process) is built once and copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "inspect_cache.py"
T, UNIT_BYTES, SHARD_SAMPLES = 32, 2000, 4
WORDS = ("the quick brown fox jumps over lazy dog knowledge distillation teacher "
         "student").split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A tiny llama teacher, one jsonl file of ~10 KB cut into units of 2000 bytes (~5
    units of ~10 windows, 3 shards each), and its cache; --max-windows caps the last unit
    one window short of its end, so units.json records a window count."""
    from pipeline.stage1_cache.run import main as cache_main
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("trust")
    teacher = build_tiny_model(root / "teacher", arch="llama", hidden=32, layers=1, heads=4)
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(24):
            words = rng.choice(WORDS, size=int(rng.integers(20, 120)))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    args = ["--teacher", str(teacher), "--data", str(root / "data.jsonl"), "--seq-len", str(T),
            "--unit-bytes", str(UNIT_BYTES), "--shard-samples", str(SHARD_SAMPLES)]
    probe = root / "probe"                       # the uncapped window count, to set the cap
    cache_main([*args, "--out", str(probe)])
    total = json.loads((probe / "manifest.json").read_text())["samples"]
    args += ["--max-windows", str(total - 1)]
    out = root / "cache"
    cache_main([*args, "--out", str(out)])
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["units"]) >= 4 and m["samples"] == total - 1, (len(m["units"]), m["samples"])
    return {"out": out, "args": args}


@pytest.fixture(autouse=True)
def plain_errors(monkeypatch):
    # The stage's expected errors as users see them (one line, exit 1), in wide log lines.
    monkeypatch.delenv("SAMPLEDKD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "1000")


def copy_cache(base: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    out = tmp_path / "cache"
    shutil.copytree(base["out"], out)            # copy2: mtimes kept
    return out, [*base["args"], "--out", str(out)]


def rerun(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python -m pipeline.cache ARGS`, run in process (the same
    `clean_errors` wrapper as the command line)."""
    from pipeline.stage1_cache.run import main as cache_main
    from pipeline.common.errors import clean_errors

    capsys.readouterr()
    try:
        with clean_errors("pipeline.cache"):
            cache_main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, " ".join(capsys.readouterr().err.split())


def shard_state(out: Path) -> dict[str, tuple[int, int, str]]:
    """Every shard file in OUT: (inode, mtime_ns, sha256)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.glob("cache-u*"))}


def record_path(out: Path, u: int) -> Path:
    return out / "ledger" / f"unit-{u:07d}.done.json"


def edit_record(out: Path, u: int, edit) -> dict:
    rec = json.loads(record_path(out, u).read_text())
    edit(rec)
    record_path(out, u).write_text(json.dumps(rec))
    return rec


def inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "1000"})


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_an_emptied_done_record_is_refused_naming_the_unit_and_no_shard_is_deleted(
        base, tmp_path, capsys):
    """Point 2: unit 2's done record lists no shard. The rerun exits 1 naming unit 2, its
    record, its shards and the repair, and changes no shard and not manifest.json;
    `--verify` names unit 2 too. The named repair (quarantine, rerun) then recomputes unit
    2 into new shard names, and the manifest holds every window again."""
    out, args = copy_cache(base, tmp_path)
    m0 = manifest(out)
    names = [s["file"] for s in m0["shards"] if s["unit"] == 2]
    assert len(names) >= 2
    shards, manifest_bytes = shard_state(out), (out / "manifest.json").read_bytes()
    edit_record(out, 2, lambda r: r.update(shards=[]))

    code, err = rerun(args, capsys)
    assert code == 1, err
    assert "unit 2 is damaged" in err and "1 damaged unit(s) (2)" in err, err
    assert "ledger/unit-0000002.done.json records" in err and names[0] in err, err
    assert f"python tools/inspect_cache.py {out} --verify --quarantine" in err, err
    assert "Nothing was deleted" in err and "already cached" not in err, err
    assert shard_state(out) == shards, "a shard was deleted or rewritten"
    assert (out / "manifest.json").read_bytes() == manifest_bytes

    proc = inspect(out, "--verify")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1, text
    assert "unit 2: ledger/unit-0000002.done.json records" in text and names[0] in text, text
    assert "unit 1:" not in text and "unit 3:" not in text, text
    rep = json.loads(inspect(out, "--verify", "--json").stdout)["verify"]
    assert rep["damaged_units"] == [2] and rep["bad_shards"] == [], rep

    # The repair the message names: move unit 2 aside (nothing deleted), recompute it.
    proc = inspect(out, "--verify", "--quarantine")
    assert proc.returncode == 1 and "BAD unit 2:" in proc.stdout, proc.stdout + proc.stderr
    for n in names:
        assert (out / "quarantine" / n).read_bytes() == (base["out"] / n).read_bytes()
    code, err = rerun(args, capsys)
    assert code == 0, err
    m = manifest(out)
    assert m["samples"] == m0["samples"] and m["positions"] == m0["positions"]
    new = [s["file"] for s in m["shards"] if s["unit"] == 2]
    assert new and not set(new) & set(names), "a shard name was reused"
    assert all("-l000003-" in n for n in new), new       # launch 2 refused, launch 3 cached
    assert [s["sha256"] for s in m["shards"] if s["unit"] == 2] == [
        s["sha256"] for s in m0["shards"] if s["unit"] == 2]  # the same bytes, new names
    assert inspect(out, "--verify").returncode == 0


@pytest.mark.parametrize("where", ["manifest", "units.json"])
def test_a_done_record_whose_window_count_disagrees_is_a_damaged_unit(base, tmp_path, capsys,
                                                                     where):
    """A done record's window count against the manifest (unit 1 says one window fewer
    than its shards and manifest.json), and against units.json (the capped last unit's
    record drops its last shard and counts one shard fewer, consistently, with no
    manifest.json left to compare): each is refused naming the unit, and no shard is
    deleted (today's stage deleted the unlisted shard as an unfinished unit's)."""
    out, args = copy_cache(base, tmp_path)
    plan = json.loads((out / "units.json").read_text())
    if where == "manifest":
        u = 1
        n = edit_record(out, u, lambda r: r.update(windows=r["windows"] - 1))["windows"] + 1
        expect = [f"ledger/unit-{u:07d}.done.json says windows {n - 1}, manifest.json says {n}"]
    else:
        u = plan["units"][-1]["unit"]
        cap = plan["units"][-1]["max_windows"]

        def drop_last(r):
            r["shards"] = r["shards"][:-1]
            r["windows"] = sum(s["samples"] for s in r["shards"])
        dropped = json.loads(record_path(out, u).read_text())["shards"][-1]["file"]
        edit_record(out, u, drop_last)
        (out / "manifest.json").unlink()
        expect = [f"units.json caps unit {u} at {cap}", dropped]
    shards = shard_state(out)

    code, err = rerun(args, capsys)
    assert code == 1, err
    assert f"unit {u} is damaged" in err and f"damaged unit(s) ({u})" in err, err
    for e in expect:
        assert e in err, (e, err)
    assert shard_state(out) == shards, "a shard was deleted or rewritten"
    if where == "manifest":
        proc = inspect(out, "--verify")
        text = " ".join((proc.stdout + proc.stderr).split())
        assert proc.returncode == 1 and f"unit {u}: {expect[0]}" in text, text


def test_a_lost_ledger_is_rebuilt_from_the_manifest_and_nothing_is_recomputed(
        base, tmp_path, capsys, monkeypatch):
    """Point 3: `rm -rf ledger/` in a finished cache. The rerun restores every done record
    from manifest.json (its shards verify), runs no teacher forward, keeps every shard
    (inode, mtime, bytes) and writes a manifest with the same shards, windows and
    statistics, numbered above the shards' launch; a second rerun changes nothing."""
    import pipeline.stage1_cache.run

    out, args = copy_cache(base, tmp_path)
    m0 = manifest(out)
    shards = shard_state(out)
    shutil.rmtree(out / "ledger")

    def no_forward(*a, **k):
        raise AssertionError("the teacher ran: a unit was recomputed")
    monkeypatch.setattr(pipeline.stage1_cache.run, "_flush", no_forward)
    code, err = rerun(args, capsys)
    n = len(m0["units"])
    assert code == 0, err
    assert f"launch 2: restored the done records of {n} unit(s)" in err, err
    assert f"launch 2: {n} of {n} unit(s) already cached" in err, err
    assert "removing" not in err, err
    assert shard_state(out) == shards, "a shard was deleted, rewritten or added"
    assert (out / "ledger" / "launch-000002.json").exists()     # no reuse of launch 1's names
    assert not (out / "ledger" / "launch-000001.json").exists()

    m = manifest(out)
    for k in ("units", "shards", "samples", "positions", "bytes", "launches"):
        assert m[k] == m0[k], k
    for k, v in m0["stats"].items():
        assert m["stats"][k] == pytest.approx(v), k
    recs = {u: json.loads(record_path(out, u).read_text()) for u in range(n)}
    assert all(r["restored_from"] == "manifest.json" and r["launch"] == 1 for r in recs.values())
    assert [s for u in range(n) for s in recs[u]["shards"]] == m0["shards"]
    proc = inspect(out, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    ledger = {p.name: p.read_bytes() for p in (out / "ledger").glob("unit-*")}
    code, err = rerun(args, capsys)                              # again: nothing to do
    assert code == 0, err
    assert "restored" not in err and f"{n} of {n} unit(s) already cached" in err, err
    assert shard_state(out) == shards
    assert {p.name: p.read_bytes() for p in (out / "ledger").glob("unit-*")} == ledger
    assert manifest(out)["shards"] == m0["shards"] and manifest(out)["samples"] == m0["samples"]


def test_a_lost_ledger_without_a_manifest_is_refused_and_nothing_is_deleted(base, tmp_path,
                                                                            capsys):
    """An unfinished cache (no manifest.json) whose ledger/ is gone: no source vouches for
    the shards, and none is a leftover of a launch the ledger knows, so the rerun refuses
    naming the ledger and deletes nothing (today's launch 1 took them for its own
    leftovers and deleted them all)."""
    out, args = copy_cache(base, tmp_path)
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "ledger")
    shards = shard_state(out)
    code, err = rerun(args, capsys)
    assert code == 1, err
    assert "a shard of no launch recorded" in err and "was the ledger lost" in err, err
    assert shard_state(out) == shards
