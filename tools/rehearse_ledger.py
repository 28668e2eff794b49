"""Rehearse the cache stage's work protocol (pipeline.stage1_cache.ledger) with hundreds of light processes.

    python tools/rehearse_ledger.py                            # 256 workers, 5,000 units
    python tools/rehearse_ledger.py --workers 24 --units 300 --workers2 8 --delay-ms 20 \
        --lease-s 1 --json /tmp/rehearsal.json

No teacher and no torch: each worker is a forked process running the stage's loop on a fake
unit. Launch 1 (`--workers` ranks) claims units with `Ledger.claim_next`, "computes" each for
an exponential delay (mean `--delay-ms`: the first quarter holding only the claim, the rest
streaming a small shard `shard-u{unit}-l{launch}.bin.tmp` in 4 chunks, fsynced and renamed
to `.bin`, as pipeline.cache_format.shards does), then `mark_done`s it with a record listing the shard and
its sha256. While it runs, a random `--kill-frac` of its workers are SIGKILLed, each when the
units done reach a random count below the crash point; when `--crash-after` of the units are
done the whole job dies the way a cancelled job does: its rank 0 (the process holding the
heartbeat thread) and every remaining worker get SIGKILL, so the launch is never marked
finished. Launch 2 (`--workers2` ranks) then starts as a restart does: `begin_launch` waits
out the lease (`--lease-s`) and declares launch 1 dead, `take_over_stale` frees its unfinished
claims and removes its temporary ledger files, rank 0 deletes the shards no done record
vouches for (what pipeline.stage1_cache.launch does before any rank claims), and the workers run to
the end.

Checked from the files on disk: every unit has exactly one done record, its shard exists
with the recorded size and sha256, one shard file per unit (none doubled), no unit claimed
twice within a launch or marked done twice, no unit of launch 1 recomputed by launch 2.
Measured: file operations per unit claimed, per kind (os.open, os.link, os.replace, os.unlink,
os.stat/lstat, os.listdir/scandir, open(), os.fsync), counted by wrappers installed in each
forked process and split by target (ledger/ or shard); claim_next wall time per launch;
wall time; the ledger directory at the end; the leftovers of the killed workers; and the
metadata load this projects to at `--project-ranks` ranks of `--unit-s` seconds per unit
over a plan of `--project-units` units.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.sharedctypes import RawArray
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.stage1_cache.ledger import Ledger, begin_launch, ledger_dir  # noqa: E402

CTX = mp.get_context("fork")

# The os-level calls counted (each wrapper counts one call, whatever it returns or raises).
KINDS = ["os.open", "os.link", "os.rename", "os.replace", "os.unlink", "os.stat", "os.lstat",
         "os.listdir", "os.scandir", "open", "os.fsync"]
WHERE = ["ledger", "shard", "other"]            # ledger/, the cache directory, anything else
NK, NW = len(KINDS), len(WHERE)

# What a worker is doing (the parent reads it just before a kill).
PHASES = ["starting", "in claim_next", "holding claim", "writing shard", "shard renamed",
          "exited"]
STARTING, CLAIMING, HOLDING, WRITING, RENAMED, EXITED = range(len(PHASES))

SHARD_RE = re.compile(r"shard-u([0-9]{7})-l([0-9]{6})\.bin(\.tmp)?")


def shard_name(u: int, launch: int) -> str:
    return f"shard-u{u:07d}-l{launch:06d}.bin"


def quiet(_msg: str) -> None:
    pass


class Shared:
    """Lock-free shared memory written by the forked processes: each process writes only its
    own slots (a lock held by a SIGKILLed process would never be released), so the counts
    of killed workers survive them. Slots: launch-1 workers, launch-2 workers, 2 launchers."""

    def __init__(self, out: Path, units: int, w1: int, w2: int, lease_s: float,
                 delay_s: float, shard_bytes: int, seed: int):
        self.out, self.units, self.worlds = out, units, (w1, w2)
        self.lease_s, self.delay_s = lease_s, delay_s
        self.shard_bytes, self.seed = shard_bytes, seed
        self.first = (0, w1)                    # first worker slot of each launch
        self.launcher_slot = (w1 + w2, w1 + w2 + 1)
        n = w1 + w2 + 2
        self.ops = RawArray("q", n * NK * NW)
        self.phase = RawArray("b", n)
        self.done = RawArray("i", n)            # mark_done calls returned, per process
        self.cap = units + 1                    # claim_next calls a worker can make at most
        self.lat = RawArray("d", (w1 + w2) * self.cap)
        self.nlat = RawArray("i", w1 + w2)
        self.claimed = RawArray("i", 2 * units)  # claim_next returned u, per launch and unit
        self.marked = RawArray("i", units)       # mark_done(u) returned, any launch


def install_counters(sh: Shared, slot: int) -> None:
    """Wrap the os-level file calls in this (forked) process with counters in sh.ops."""
    led, out = str(ledger_dir(sh.out)), str(sh.out)
    base = slot * NK * NW
    fd_where: dict[int, int] = {}

    def where(path) -> int:
        if isinstance(path, int):
            return fd_where.get(path, 2)
        p = os.path.normpath(os.fsdecode(os.fspath(path)))
        return (0 if p == led or p.startswith(led + os.sep) else
                1 if p == out or p.startswith(out + os.sep) else 2)

    def wrap(mod, name: str, kind: str, arg: int) -> None:
        real, k = getattr(mod, name), KINDS.index(kind)

        def counted(*a, **kw):
            w = where(a[arg]) if len(a) > arg else 2
            sh.ops[base + k * NW + w] += 1
            r = real(*a, **kw)
            if name == "open" and mod is os:
                fd_where[r] = w
            return r

        setattr(mod, name, counted)

    for name in ("open", "stat", "lstat", "listdir", "scandir", "unlink", "fsync"):
        wrap(os, name, f"os.{name}", 0)
    for name in ("link", "rename", "replace"):
        wrap(os, name, f"os.{name}", 1)  # counted where the name is created
    wrap(builtins, "open", "open", 0)


# ------------------------------------------------------------------------ processes
def worker(sh: Shared, li: int, launch: int, rank: int) -> None:
    """Rank `rank` of launch index li: the stage's claim / compute / write / mark loop."""
    slot = sh.first[li] + rank
    install_counters(sh, slot)
    rng = random.Random(sh.seed * 1_000_003 + li * 65_537 + rank)
    led = Ledger(sh.out, sh.units, launch, rank, sh.worlds[li], log=quiet)
    lat0 = slot * sh.cap
    while True:
        sh.phase[slot] = CLAIMING
        t = time.perf_counter()
        u = led.claim_next()
        # the call that found no unit is stored negated: it walks the rest of the ring
        sh.lat[lat0 + sh.nlat[slot]] = (time.perf_counter() - t) * (-1 if u is None else 1)
        sh.nlat[slot] += 1
        if u is None:
            break
        sh.claimed[li * sh.units + u] += 1
        sh.phase[slot] = HOLDING
        d = rng.expovariate(1 / sh.delay_s) if sh.delay_s > 0 else 0.0
        time.sleep(d / 4)
        final = sh.out / shard_name(u, launch)
        data = rng.randbytes(sh.shard_bytes)
        sh.phase[slot] = WRITING
        # O_EXCL: a second writer of this unit in this launch (a doubled claim) fails loudly
        fd = os.open(f"{final}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            step = -(-len(data) // 4)
            for i in range(0, len(data), step):
                time.sleep(d * 3 / 16)
                os.write(fd, data[i:i + step])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(f"{final}.tmp", final)
        sh.phase[slot] = RENAMED
        led.mark_done(u, {"shards": [{"file": final.name, "bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}]})
        sh.marked[u] += 1
        sh.done[slot] += 1
    sh.phase[slot] = EXITED


def launcher(sh: Shared, li: int, conn) -> None:
    """Rank 0's part of launch index li: begin_launch (its heartbeat thread lives in this
    process), take_over_stale, delete unvouched shards; then wait for "stop" (launch 1 never
    gets it: it is SIGKILLed)."""
    install_counters(sh, sh.launcher_slot[li])
    logs: list[str] = []
    t = time.monotonic()
    launch = begin_launch(sh.out, sh.worlds[li], lease_s=sh.lease_s, log=logs.append)
    waited = time.monotonic() - t
    led = Ledger(sh.out, sh.units, launch.number, 0, sh.worlds[li], log=logs.append)
    taken = led.take_over_stale()
    # pipeline.stage1_cache.launch: a shard no done record names belongs to a unit an earlier launch
    # did not finish (killed mid-write, or between rename and done record): delete it.
    keep = {s["file"] for rec in led.done().values() for s in rec["shards"]}
    removed = {"shard": 0, "shard_tmp": 0}
    for f in sorted(os.listdir(sh.out)):
        m = SHARD_RE.fullmatch(f)
        if m and f not in keep and int(m.group(2)) < launch.number:
            os.unlink(sh.out / f)
            removed["shard_tmp" if m.group(3) else "shard"] += 1
    conn.send({"number": launch.number, "lease_wait_s": waited, "taken_over": len(taken),
               "shards_removed": removed, "log": logs})
    conn.recv()
    launch.stop()
    conn.send("stopped")


# ------------------------------------------------------------------------ inspection
def dir_files(d: Path) -> dict[str, int]:
    return {e.name: e.stat().st_size for e in os.scandir(d) if e.is_file()}


def ledger_kinds(d: Path) -> dict[str, dict[str, int]]:
    """Files and bytes of ledger/ by kind."""
    kinds: dict[str, dict[str, int]] = {}
    for name, size in dir_files(d).items():
        k = ("tmp" if name.endswith(".tmp") else "claim" if name.endswith(".claim") else
             "done" if name.endswith(".done.json") else "launch" if name.endswith(".json") else
             "alive" if name.endswith(".alive") else "other")
        kinds.setdefault(k, {"files": 0, "bytes": 0})
        kinds[k]["files"] += 1
        kinds[k]["bytes"] += size
    return dict(sorted(kinds.items()))


def leftovers(out: Path) -> dict[str, int]:
    """Files a killed worker leaves: ledger temporary files, claims without a done record,
    shard .tmp files, and renamed shards no done record lists."""
    led = dir_files(ledger_dir(out))
    done = {n for n in led if n.endswith(".done.json")}
    listed = set()
    for n in done:
        listed |= {s["file"] for s in json.loads((ledger_dir(out) / n).read_bytes())["shards"]}
    shards = [n for n in dir_files(out) if SHARD_RE.fullmatch(n)]
    return {"ledger_tmp": sum(n.endswith(".tmp") for n in led),
            "claims_without_record": sum(n.endswith(".claim") and
                                         n.replace(".claim", ".done.json") not in done
                                         for n in led),
            "shard_tmp": sum(n.endswith(".tmp") for n in shards),
            "shards_no_record_lists": sum(not n.endswith(".tmp") and n not in listed
                                          for n in shards)}


def verify(out: Path, units: int) -> dict[str, list]:
    """The exactly-once properties, from the files on disk alone."""
    led = ledger_dir(out)
    names = os.listdir(led)
    dones = {n for n in names if re.fullmatch(r"unit-[0-9]{7}\.done\.json", n)}
    problems: dict[str, list] = {"missing_units": [], "unexpected_ledger_files": [],
                                 "bad_records": [], "bad_shards": [], "doubled_units": []}
    problems["missing_units"] = [u for u in range(units) if f"unit-{u:07d}.done.json" not in dones]
    problems["unexpected_ledger_files"] = sorted(n for n in names if "corrupt" in n or (
        n.startswith("unit-") and int(n[5:12]) >= units))
    per_unit: dict[int, list[str]] = {}
    for n in os.listdir(out):
        m = SHARD_RE.fullmatch(n)
        if m:
            per_unit.setdefault(int(m.group(1)), []).append(n)
    for u in range(units):
        if u in problems["missing_units"]:
            continue
        rec = json.loads((led / f"unit-{u:07d}.done.json").read_bytes())
        files = [s["file"] for s in rec.get("shards", [])]
        if len(files) != 1 or not files[0].startswith(f"shard-u{u:07d}-l{rec['launch']:06d}"):
            problems["bad_records"].append(u)
            continue
        p, s = out / files[0], rec["shards"][0]
        if (not p.is_file() or p.stat().st_size != s["bytes"]
                or hashlib.sha256(p.read_bytes()).hexdigest() != s["sha256"]):
            problems["bad_shards"].append(u)
        if sorted(per_unit.get(u, [])) != files:
            problems["doubled_units"].append([u, sorted(per_unit.get(u, []))])
    return problems


def quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"calls": 0}
    xs = sorted(xs)
    at = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"calls": len(xs), "p50_ms": 1e3 * at(0.5), "p99_ms": 1e3 * at(0.99),
            "max_ms": 1e3 * xs[-1]}


def op_counts(sh: Shared, slots: range) -> dict[str, dict[str, int]]:
    c = {w: {k: 0 for k in KINDS} for w in WHERE}
    for s in slots:
        for ki, k in enumerate(KINDS):
            for wi, w in enumerate(WHERE):
                c[w][k] += sh.ops[(s * NK + ki) * NW + wi]
    return c


# ------------------------------------------------------------------------ the rehearsal
def run_launch(sh: Shared, li: int, kill_frac: float, crash_after: float,
               rng: random.Random, timeout_s: float) -> dict:
    """One launch: its launcher, its workers, and (launch index 0) the kills and the crash."""
    t0 = time.monotonic()
    here, there = CTX.Pipe()
    boss = CTX.Process(target=launcher, args=(sh, li, there), daemon=True)
    boss.start()
    if not here.poll(timeout_s):
        raise RuntimeError(f"launch {li + 1}: begin_launch did not return in {timeout_s:g} s")
    info = here.recv()
    world, first = sh.worlds[li], sh.first[li]
    procs = [CTX.Process(target=worker, args=(sh, li, info["number"], r), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    crash_at = math.ceil(crash_after * sh.units) if li == 0 else sh.units + 1
    victims = rng.sample(range(world), round(kill_frac * world)) if li == 0 else []
    when = {r: rng.uniform(0, crash_at) for r in victims}
    killed: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        done = sum(sh.done[first:first + world])
        for r in [r for r in victims if r not in killed and when[r] <= done]:
            killed[r] = PHASES[sh.phase[first + r]]
            if killed[r] != "exited":
                os.kill(procs[r].pid, signal.SIGKILL)
        if done >= crash_at or all(sh.phase[first + r] == EXITED for r in range(world)):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"launch {info['number']}: not finished in {timeout_s:g} s "
                               f"({done} units done by its workers)")
        time.sleep(0.005)
    crash: dict[str, int] = {}
    if li == 0:  # the job dies: rank 0 (heartbeat) first, then every remaining rank
        os.kill(boss.pid, signal.SIGKILL)
        for r, p in enumerate(procs):
            ph = PHASES[sh.phase[first + r]]
            if r not in killed and ph != "exited":
                os.kill(p.pid, signal.SIGKILL)
                crash[ph] = crash.get(ph, 0) + 1
    else:
        here.send("stop")
        here.recv()
    for p in [*procs, boss]:
        p.join(30)
    wall = time.monotonic() - t0
    failed = [(r, p.exitcode) for r, p in enumerate(procs)
              if p.exitcode not in (0, -signal.SIGKILL)
              or (p.exitcode != 0 and li == 1)]
    per_worker = [sh.lat[(first + r) * sh.cap:(first + r) * sh.cap + sh.nlat[first + r]]
                  for r in range(world)]
    claims = sum(sh.claimed[li * sh.units:(li + 1) * sh.units])
    ops = op_counts(sh, range(first, first + world))
    per_unit = {w: {k: v / max(claims, 1) for k, v in ops[w].items() if v} for w in WHERE[:2]}
    kills: dict[str, int] = {}
    for ph in killed.values():
        kills[ph] = kills.get(ph, 0) + 1
    return {"launch": info["number"], "workers": world, "wall_s": wall,
            "lease_wait_s": info["lease_wait_s"], "taken_over": info["taken_over"],
            "shards_removed_by_rank0": info["shards_removed"], "log": info["log"],
            "units_claimed": claims, "units_marked_done": sum(sh.done[first:first + world]),
            "killed_during_run": kills, "killed_by_crash": crash,
            "worker_failures": failed,
            "claim_latency": {
                # calls that returned a unit; a rank's first call also lists ledger/
                "got_unit": quantiles([x for xs in per_worker for x in xs if x >= 0]),
                "first_call": quantiles([abs(xs[0]) for xs in per_worker if xs]),
                # the last call of a rank that ran out of units
                "found_none": quantiles([-x for xs in per_worker for x in xs if x < 0])},
            "ops": ops, "ops_per_unit_claimed": per_unit,
            "rank0_ops": op_counts(sh, range(sh.launcher_slot[li], sh.launcher_slot[li] + 1))}


def rehearse(args) -> dict:
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="rehearse-"))
    out.mkdir(parents=True, exist_ok=True)
    if os.listdir(out):
        raise SystemExit(f"rehearse_ledger: error: --out {out} is not empty; give a new "
                         "directory")
    sh = Shared(out, args.units, args.workers, args.workers2, args.lease_s,
                args.delay_ms / 1e3, args.shard_bytes, args.seed)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    first = run_launch(sh, 0, args.kill_frac, args.crash_after, rng, args.timeout_s)
    after_crash = leftovers(out)
    second = run_launch(sh, 1, 0.0, 1.0, rng, args.timeout_s)
    wall = time.monotonic() - t0

    checks = verify(out, args.units)
    checks["claimed_twice_in_a_launch"] = [u for li in (0, 1) for u in range(args.units)
                                           if sh.claimed[li * args.units + u] > 1]
    checks["marked_done_twice"] = [u for u in range(args.units) if sh.marked[u] > 1]
    done1 = {u for u in range(args.units) if json.loads(
        (ledger_dir(out) / f"unit-{u:07d}.done.json").read_bytes())["launch"] == first["launch"]
    } if not checks["missing_units"] else set()
    checks["recomputed_by_launch_2"] = [u for u in sorted(done1)
                                        if sh.claimed[args.units + u]]
    checks["worker_failures"] = first["worker_failures"] + second["worker_failures"]
    statuses = {n: json.loads((ledger_dir(out) / f"launch-{n:06d}.json").read_bytes())["status"]
                for n in (first["launch"], second["launch"])}
    if statuses != {first["launch"]: "dead", second["launch"]: "finished"}:
        checks["launch_statuses"] = [statuses]
    claims = first["units_claimed"] + second["units_claimed"]
    ops_unit = {w: {k: (first["ops"][w][k] + second["ops"][w][k]) / claims for k in KINDS
                    if first["ops"][w][k] + second["ops"][w][k]} for w in WHERE[:2]}
    led = ledger_kinds(ledger_dir(out))
    ledger_per_unit = sum(ops_unit["ledger"].values())
    # A claim attempt that collides costs a failed os.link and the os.stat of link_new; after
    # one, claim_next lists ledger/ again (at most once a call), so a rank walking into units
    # other ranks took pays one listing, not an attempt per unit (before that fix: about
    # (ranks - 1) * units failed attempts per launch, 99 per unit at 100 ranks).
    failed = sum(L["ops"]["ledger"]["os.link"] for L in (first, second)) - claims
    steady = ledger_per_unit - 2 * failed / claims
    R, N = args.project_ranks, args.project_units
    units_per_s = R / args.unit_s
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"out": str(out)},
        "wall_s": wall, "launches": [first, second],
        "ops_per_unit_claimed": ops_unit,
        "ledger_ops_per_unit": ledger_per_unit,
        "shard_ops_per_unit": sum(ops_unit["shard"].values()),
        "leftovers_after_crash": after_crash, "leftovers_at_end": leftovers(out),
        "ledger_dir": {"files": sum(v["files"] for v in led.values()),
                       "bytes": sum(v["bytes"] for v in led.values()), "by_kind": led},
        "failed_claim_links_per_unit": failed / claims,
        "projection": {"ranks": R, "unit_s": args.unit_s, "units": N,
                       "units_per_s": units_per_s,
                       "steady_ledger_ops_per_unit": steady,
                       "steady_ledger_ops_per_s": steady * units_per_s,
                       "steady_with_shard_ops_per_s":
                           (steady + sum(ops_unit["shard"].values())) * units_per_s,
                       # everything measured, failed claims and re-listings included
                       "all_ledger_ops_per_s": ledger_per_unit * units_per_s,
                       "listings_per_unit": ops_unit["ledger"].get("os.listdir", 0.0)},
        "checks": checks, "ok": not any(checks.values()),
        "torch_imported": "torch" in sys.modules,
    }
    if not args.out and not args.keep:
        shutil.rmtree(out)
    return report


def print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    c = r["config"]
    t = Table(title=f"ledger rehearsal: {c['units']} units, launch 1 {c['workers']} workers "
                    f"({c['kill_frac']:.0%} killed, crash at {c['crash_after']:.0%} done), "
                    f"launch 2 {c['workers2']} workers; wall {r['wall_s']:.1f} s")
    t.add_column("")
    for L in r["launches"]:
        t.add_column(f"launch {L['launch']}", justify="right")

    def ms(q: dict) -> str:
        return f"{q['p50_ms']:.1f} / {q['p99_ms']:.1f}" if q["calls"] else "-"

    rows = [("workers", lambda L: str(L["workers"])),
            ("wall s (launch 2: with the lease wait)", lambda L: f"{L['wall_s']:.1f}"),
            ("begin_launch wait s", lambda L: f"{L['lease_wait_s']:.1f}"),
            ("units taken over", lambda L: str(L["taken_over"])),
            ("units claimed / marked done", lambda L: f"{L['units_claimed']} / "
                                                      f"{L['units_marked_done']}"),
            ("killed during the run (phase)", lambda L: ", ".join(
                f"{v} {k}" for k, v in L["killed_during_run"].items()) or "-"),
            ("killed by the crash (phase)", lambda L: ", ".join(
                f"{v} {k}" for k, v in L["killed_by_crash"].items()) or "-"),
            ("claim_next ms p50 / p99: got a unit", lambda L: ms(L["claim_latency"]["got_unit"])),
            ("  a rank's first call", lambda L: ms(L["claim_latency"]["first_call"])),
            ("  the call that found none", lambda L: ms(L["claim_latency"]["found_none"])),
            ("ledger ops per unit claimed",
             lambda L: f"{sum(L['ops_per_unit_claimed']['ledger'].values()):.1f}"),
            ("  of which os.link",
             lambda L: f"{L['ops_per_unit_claimed']['ledger'].get('os.link', 0):.1f}"),
            ("rank 0 ledger ops (launch, takeover, heartbeat)",
             lambda L: str(sum(L["rank0_ops"]["ledger"].values())))]
    for name, f in rows:
        t.add_row(name, *[f(L) for L in r["launches"]])
    console.print(t)
    o = Table(title="file operations per unit claimed (both launches' workers)")
    o.add_column("kind")
    o.add_column("ledger/", justify="right")
    o.add_column("shard", justify="right")
    u = r["ops_per_unit_claimed"]
    for k in KINDS:
        if k in u["ledger"] or k in u["shard"]:
            o.add_row(k, f"{u['ledger'].get(k, 0):.2f}", f"{u['shard'].get(k, 0):.2f}")
    o.add_row("total", f"{r['ledger_ops_per_unit']:.2f}", f"{r['shard_ops_per_unit']:.2f}")
    console.print(o)
    crash = r["launches"][0]["killed_by_crash"]
    d, p = r["ledger_dir"], r["projection"]
    console.print(f"crash killed: {crash}")
    console.print(f"leftovers after the crash: {r['leftovers_after_crash']}")
    console.print(f"leftovers at the end:      {r['leftovers_at_end']}")
    console.print(f"ledger/ at the end: {d['files']} files, {d['bytes']:,} bytes "
                  f"{ {k: v['files'] for k, v in d['by_kind'].items()} }")
    console.print(f"failed claim attempts (os.link + os.stat each): "
                  f"{r['failed_claim_links_per_unit']:.1f} per unit claimed; without them "
                  f"{p['steady_ledger_ops_per_unit']:.1f} ledger ops per unit")
    console.print(f"projection: {p['ranks']} ranks x 1 unit / {p['unit_s']:g} s = "
                  f"{p['units_per_s']:.2f} units/s -> {p['steady_ledger_ops_per_s']:.0f} ledger "
                  f"ops/s ({p['steady_with_shard_ops_per_s']:.0f} with the shard's); with the "
                  f"failed claims and re-listings measured here {p['all_ledger_ops_per_s']:.0f} "
                  f"ops/s, of which {p['listings_per_unit'] * p['units_per_s']:.2f} listings/s of "
                  f"ledger/ (~2 x {p['units']:,} names each)")
    bad = {k: v[:10] for k, v in r["checks"].items() if v}
    console.print("checks: all passed" if r["ok"] else f"checks FAILED: {bad}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=256, help="ranks of launch 1")
    ap.add_argument("--workers2", type=int, default=100, help="ranks of launch 2 (the restart)")
    ap.add_argument("--kill-frac", type=float, default=0.10,
                    help="fraction of launch 1's workers SIGKILLed while it runs")
    ap.add_argument("--crash-after", type=float, default=0.5,
                    help="launch 1 dies (SIGKILL to rank 0 and all ranks) when this fraction "
                         "of the units is done; 1: only when its ranks run out of units")
    ap.add_argument("--delay-ms", type=float, default=200.0,
                    help="mean of the exponential time a worker spends per unit")
    ap.add_argument("--lease-s", type=float, default=2.0)
    ap.add_argument("--shard-bytes", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="cache directory to rehearse in (new or empty; kept). "
                                  "Default: a temporary directory, removed unless --keep")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per launch")
    ap.add_argument("--project-ranks", type=int, default=1024)
    ap.add_argument("--project-units", type=int, default=32768,
                    help="units of the projected plan (1 TiB of text in 32 MiB units)")
    ap.add_argument("--unit-s", type=float, default=420.0,
                    help="seconds per unit for the projection: 32 MiB of text ~ 8.4M tokens "
                         "at ~20k tokens/s (an 8B teacher, bf16, one H100)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    problems = [f"--{k.replace('_', '-')} must be >= {lo}, not {getattr(args, k)}"
                for k, lo in [("units", 1), ("workers", 1), ("workers2", 1), ("lease_s", 0.01),
                              ("shard_bytes", 4), ("delay_ms", 0), ("unit_s", 1e-9),
                              ("project_ranks", 1), ("project_units", 1)]
                if getattr(args, k) < lo]
    if not (0 <= args.kill_frac <= 1 and 0 < args.crash_after <= 1):
        problems.append("--kill-frac must be in [0, 1] and --crash-after in (0, 1]")
    if problems:
        raise SystemExit("rehearse_ledger: error: " + "; ".join(problems))
    report = rehearse(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print_report(report)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
