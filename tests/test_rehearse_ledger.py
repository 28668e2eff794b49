"""tools/rehearse_ledger.py: the work protocol with killed workers and a crashed launch.

A small rehearsal (24 workers, 300 units, 10% killed, the job killed at 50% done, a restart
with 8 workers, 1 s lease) run as a subprocess. The exactly-once properties are checked here
from the files on disk (the ledger listing, the shard files, their sha256), not from the
tool's summary; the summary is checked only for carrying the measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS, W1, W2 = 300, 24, 8


def test_rehearsal_every_unit_done_exactly_once(tmp_path):
    out, report_path = tmp_path / "cache", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "tools" / "rehearse_ledger.py"),
         "--units", str(UNITS), "--workers", str(W1), "--workers2", str(W2),
         "--kill-frac", "0.1", "--crash-after", "0.5", "--delay-ms", "20", "--lease-s", "1",
         "--seed", "3", "--out", str(out), "--json", str(report_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(errors)[-3000:]
    # no process of the rehearsal imported torch (-X importtime lists every import)
    assert not [ln for ln in proc.stderr.splitlines()
                if re.search(r"\|\s+torch(\.|$)", ln)], "the rehearsal imported torch"

    # ---- the files on disk
    led = out / "ledger"
    names = sorted(os.listdir(led))
    dones = [n for n in names if n.endswith(".done.json")]
    claims = [n for n in names if n.endswith(".claim")]
    assert dones == [f"unit-{u:07d}.done.json" for u in range(UNITS)]  # each unit, one record
    assert claims == [f"unit-{u:07d}.claim" for u in range(UNITS)]
    rest = sorted(set(names) - set(dones) - set(claims))
    assert rest == ["launch-000001.json", "launch-000002.json"], rest  # no tmp, no .alive
    status = {n: json.loads((led / n).read_bytes())["status"] for n in rest}
    assert status == {"launch-000001.json": "dead", "launch-000002.json": "finished"}

    shards: dict[int, list[str]] = {}
    for n in os.listdir(out):
        if n != "ledger":
            m = re.fullmatch(r"shard-u([0-9]{7})-l([0-9]{6})\.bin", n)
            assert m, f"leftover file {n} in the cache directory"
            shards.setdefault(int(m.group(1)), []).append(n)
    by_launch = {1: 0, 2: 0}
    for u in range(UNITS):
        rec = json.loads((led / f"unit-{u:07d}.done.json").read_bytes())
        claim = json.loads((led / f"unit-{u:07d}.claim").read_bytes())
        assert (claim["launch"], claim["rank"]) == (rec["launch"], rec["rank"]), (u, claim, rec)
        (s,) = rec["shards"]
        assert s["file"] == f"shard-u{u:07d}-l{rec['launch']:06d}.bin"
        assert shards.get(u) == [s["file"]], (u, shards.get(u))  # one shard, not doubled
        data = (out / s["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s["bytes"], s["sha256"])
        by_launch[rec["launch"]] += 1
    assert by_launch[1] >= UNITS // 2 and by_launch[2] > 0, by_launch

    # ---- the tool's report carries the measurements
    r = json.loads(report_path.read_text())
    assert r["ok"] and not r["torch_imported"]
    first, second = r["launches"]
    assert sum(first["killed_during_run"].values()) == round(0.1 * W1)
    assert first["killed_by_crash"] and second["taken_over"] > 0
    assert second["lease_wait_s"] > 0.5                  # it waited out launch 1's lease
    assert second["units_claimed"] == by_launch[2]
    for L in (first, second):
        lat = L["claim_latency"]["got_unit"]
        assert lat["calls"] > 0 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    per_unit = r["ops_per_unit_claimed"]["ledger"]
    for kind in ("os.open", "os.link", "os.replace", "os.unlink", "os.lstat", "open",
                 "os.listdir"):
        assert per_unit[kind] > 0, (kind, per_unit)
    assert r["ops_per_unit_claimed"]["shard"]["os.replace"] > 0
    assert r["ledger_dir"]["files"] == len(names)
    assert r["ledger_dir"]["bytes"] == sum((led / n).stat().st_size for n in names)
    assert r["leftovers_after_crash"]["claims_without_record"] == second["taken_over"]
    assert not any(r["leftovers_at_end"].values())
