"""pipeline.stage1_cache.ledger: work-unit claims on a shared directory, launches, leases and takeover.

Real processes (multiprocessing, fork) and real files in tmp_path. The references are
independent of the ledger: what each process reports it returned from claim_next, the files
as read back with os.listdir + json.loads, sha256 of the record files, wall-clock lower
bounds on waits, and the sleeps a wait asked for (counted, never an upper bound on time).
A 1 s lease keeps the waits short (heartbeat every 0.25 s).
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import time
from pathlib import Path

import pytest

from pipeline.stage1_cache.ledger import (LaunchEnded, LaunchRefused, Ledger, begin_launch, claim_name,
                             done_name, launch_name)

LEASE = 1.0
CTX = mp.get_context("fork")


def quiet(_msg: str) -> None:
    pass


def files(out: Path) -> dict[str, bytes]:
    d = out / "ledger"
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def units_with(out: Path, suffix: str) -> set[int]:
    return {int(f[5:12]) for f in os.listdir(out / "ledger")
            if f.startswith("unit-") and f.endswith(suffix)}


def launch_file(out: Path, n: int) -> dict:
    return json.loads((out / "ledger" / launch_name(n)).read_bytes())


class Sleeps:
    """Every time.sleep(seconds) this process asks for while in the block (the sleeps still
    happen). The launch's heartbeat thread waits on an Event, not time.sleep, so these are
    the lease check's polls."""

    def __init__(self, monkeypatch):
        self.asked: list[float] = []
        self._mp, self._real = monkeypatch, time.sleep

    def __enter__(self) -> "Sleeps":
        def sleep(seconds):
            self.asked.append(seconds)
            self._real(seconds)

        self._ctx = self._mp.context()
        self._ctx.__enter__().setattr(time, "sleep", sleep)
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def start(target, *args) -> mp.Process:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def run_rank(out, n_units, launch, rank, world, sleep_s, q) -> None:
    """A worker rank: claim until None, sleep_s per unit, report the units it got."""
    led = Ledger(out, n_units, launch, rank, world, log=quiet)
    got = []
    while (u := led.claim_next()) is not None:
        time.sleep(sleep_s)
        led.mark_done(u, {"unit": u, "by": rank})
        got.append(u)
    q.put((rank, got))


def run_world(out, n_units, launch, sleeps) -> dict[int, list[int]]:
    q = CTX.Queue()
    procs = [start(run_rank, out, n_units, launch, r, len(sleeps), s, q)
             for r, s in enumerate(sleeps)]
    got = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return got


def fresh_launch(out, world, n_units, lease=LEASE):
    launch = begin_launch(out, world, lease_s=lease, log=quiet)
    taken = Ledger(out, n_units, launch.number, 0, world, log=quiet).take_over_stale()
    return launch, taken


# ------------------------------------------------------------------ concurrent claiming
def test_concurrent_claims_each_unit_exactly_once(tmp_path):
    n_units, world = 300, 8
    launch, taken = fresh_launch(tmp_path, world, n_units, lease=30)
    assert taken == []
    got = run_world(tmp_path, n_units, launch.number, [0.0] * world)
    launch.stop()
    claimed = [u for units in got.values() for u in units]
    assert sorted(claimed) == list(range(n_units))          # every unit, none twice
    # the files agree with what the processes reported
    assert units_with(tmp_path, ".claim") == set(range(n_units))
    for rank, units in got.items():
        for u in units:
            rec = json.loads((tmp_path / "ledger" / done_name(u)).read_bytes())
            assert rec == {"unit": u, "by": rank, "launch": launch.number, "rank": rank}
            claim = json.loads((tmp_path / "ledger" / claim_name(u)).read_bytes())
            assert (claim["launch"], claim["rank"], claim["host"]) == (
                launch.number, rank, socket.gethostname())
    led = Ledger(tmp_path, n_units, launch.number, 0, world)
    assert set(led.done()) == set(led.claims()) == set(range(n_units))
    assert launch_file(tmp_path, launch.number)["status"] == "finished"
    assert not (tmp_path / "ledger" / f"launch-{launch.number:06d}.alive").exists()
    assert not [f for f in os.listdir(tmp_path / "ledger") if f.endswith(".tmp")]


def test_slow_rank_takes_fewer_units(tmp_path):
    n_units, fast, slow = 48, 0.03, 0.12                   # rank 2 is 4x slower
    launch, _ = fresh_launch(tmp_path, 4, n_units, lease=30)
    got = run_world(tmp_path, n_units, launch.number, [fast, fast, slow, fast])
    launch.stop()
    assert sorted(u for units in got.values() for u in units) == list(range(n_units))
    counts = {r: len(u) for r, u in got.items()}
    assert counts[2] < min(counts[r] for r in (0, 1, 3)), counts
    assert counts[2] < n_units // 4 < max(counts.values()), counts


# ------------------------------------------------------------------ kill, then takeover
def killed_rank(out, n_units, rank, world, n_done, ready, number, q) -> None:
    if rank == 0:
        launch, _ = fresh_launch(out, world, n_units)
        number.value = launch.number
        ready.set()
    else:
        assert ready.wait(30)
    led = Ledger(out, n_units, number.value, rank, world, log=quiet)
    done = []
    for _ in range(n_done):
        u = led.claim_next()
        led.mark_done(u, {"unit": u, "first": True})
        done.append(u)
    held = led.claim_next()                                 # claimed, never finished
    q.put((rank, done, held))
    time.sleep(120)                                         # until SIGKILL


def test_killed_launch_taken_over_by_new_world_size(tmp_path, monkeypatch):
    n_units = 30
    ready, number, q = CTX.Event(), CTX.Value("i", 0), CTX.Queue()
    procs = [start(killed_rank, tmp_path, n_units, r, 3, 3, ready, number, q)
             for r in range(3)]
    reports = [q.get(timeout=30) for _ in procs]
    for p in procs:                                         # kill -9 the whole launch
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
    first = number.value
    done1 = {u for _, done, _ in reports for u in done}
    held = {h for _, _, h in reports}
    assert len(done1) == 9 and len(held) == 3 and not done1 & held
    before = {u: hashlib.sha256((tmp_path / "ledger" / done_name(u)).read_bytes()).hexdigest()
              for u in done1}

    t0 = time.monotonic()
    with Sleeps(monkeypatch) as polls:
        launch = begin_launch(tmp_path, 2, lease_s=LEASE, log=quiet)  # another world size
    waited = time.monotonic() - t0
    taken = Ledger(tmp_path, n_units, launch.number, 0, 2, log=quiet).take_over_stale()
    assert taken == sorted(held)                            # exactly the unfinished claims
    assert waited >= 0.5 * LEASE, waited                    # it waited for the heartbeat...
    # ...and no longer than it takes: a killed launch looks dead once its heartbeat is a
    # lease old and unchanged for half a lease since first seen, both reached after at most
    # LEASE s of sleeps; each poll sleeps at least what it asked, so the sleeps asked add up
    # to at most that plus the one poll that crossed it (a wait to the 1.5-lease refusal
    # deadline would ask for 1.5 * LEASE).
    assert polls.asked and sum(polls.asked) <= LEASE + max(polls.asked) + 1e-9, polls.asked
    assert launch.number == first + 1 and launch.declared_dead == [first]
    assert launch_file(tmp_path, first)["status"] == "dead"
    assert units_with(tmp_path, ".claim") == done1          # held claims are gone

    got = run_world(tmp_path, n_units, launch.number, [0.0, 0.0])
    launch.stop()
    second = {u for units in got.values() for u in units}
    assert sum(len(u) for u in got.values()) == len(second) == n_units - 9
    assert second == set(range(n_units)) - done1            # never a done unit again
    done = Ledger(tmp_path, n_units, launch.number, 0, 2).done()
    assert set(done) == set(range(n_units))
    for u in done1:                                         # untouched, byte for byte
        path = tmp_path / "ledger" / done_name(u)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before[u]
        assert done[u]["launch"] == first
    assert {done[u]["launch"] for u in second} == {launch.number}


# ------------------------------------------------------------------ launches at once
def racing_launch(out, barrier, q, hold_s) -> None:
    barrier.wait()
    t0 = time.monotonic()
    try:
        launch, _ = fresh_launch(out, 1, 6)
    except LaunchRefused as e:
        q.put(("refused", os.getpid(), str(e), time.monotonic() - t0))
        return
    led = Ledger(out, 6, launch.number, 0, 1, log=quiet)
    units = []
    while (u := led.claim_next()) is not None:
        led.mark_done(u, {})
        units.append(u)
    q.put(("won", os.getpid(), launch.number, units))
    time.sleep(hold_s)                                      # keeps beating meanwhile
    launch.stop()


def test_launches_started_at_once_exactly_one_works(tmp_path):
    barrier, q = CTX.Barrier(3), CTX.Queue()
    procs = [start(racing_launch, tmp_path, barrier, q, 2.5 * LEASE) for _ in range(3)]
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    won = [r for r in results if r[0] == "won"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(won) == 1 and len(refused) == 2
    _, pid, n, units = won[0]
    assert units == list(range(6))
    numbers = sorted(int(f[7:13]) for f in os.listdir(tmp_path / "ledger")
                     if f.startswith("launch-") and f.endswith(".json"))
    assert n == numbers[0] and len(numbers) == 3            # the lowest number works
    for _, loser_pid, msg, waited in refused:
        assert f"launch {n} (host {socket.gethostname()}, pid {pid}," in msg
        assert "heartbeat" in msg and "kill it" in msg
        assert waited >= 1.5 * LEASE - 0.05
    for m in numbers[1:]:                                   # recorded, and never live again
        info = launch_file(tmp_path, m)
        assert info["status"] == "refused" and f"launch {n} " in info["reason"]
        assert not (tmp_path / "ledger" / f"launch-{m:06d}.alive").exists()
    led = Ledger(tmp_path, 6, n, 0, 1)
    assert {c["launch"] for c in led.claims().values()} == {n}
    assert {r["launch"] for r in led.done().values()} == {n}


def live_launch(out, n_units, q, release) -> None:
    launch, _ = fresh_launch(out, 2, n_units)
    r0 = Ledger(out, n_units, launch.number, 0, 2, log=quiet)
    r1 = Ledger(out, n_units, launch.number, 1, 2, log=quiet)
    a, b = r0.claim_next(), r1.claim_next()
    r0.mark_done(a, {"x": 1})
    q.put((launch.number, os.getpid(), a, b))
    assert release.wait(30)
    r1.mark_done(b, {"x": 2})                               # its claim is still its own
    launch.stop()
    q.put("stopped")


def test_live_launch_is_never_taken_over(tmp_path, monkeypatch):
    n_units = 8
    q, release = CTX.Queue(), CTX.Event()
    p = start(live_launch, tmp_path, n_units, q, release)
    first, pid, a, b = q.get(timeout=30)
    claims_before = {f: v for f, v in files(tmp_path).items() if f.endswith(".claim")}

    t0 = time.monotonic()
    with pytest.raises(LaunchRefused) as e:
        begin_launch(tmp_path, 5, lease_s=LEASE, log=quiet)
    waited = time.monotonic() - t0
    msg = str(e.value)
    assert f"launch {first} (host {socket.gethostname()}, pid {pid}," in msg
    assert "written" in msg and "s ago" in msg and "wait for launch" in msg
    assert waited >= 1.5 * LEASE - 0.05
    refused = first + 1
    assert launch_file(tmp_path, refused)["status"] == "refused"
    assert not (tmp_path / "ledger" / f"launch-{refused:06d}.alive").exists()
    assert {f: v for f, v in files(tmp_path).items() if f.endswith(".claim")} == claims_before
    assert units_with(tmp_path, ".done.json") == {a}

    release.set()                                           # the live launch finishes
    assert q.get(timeout=30) == "stopped"
    p.join(10)
    with Sleeps(monkeypatch) as polls:
        launch, taken = fresh_launch(tmp_path, 3, n_units)
    assert polls.asked == []                                # nothing live: no wait
    assert taken == [] and launch.declared_dead == []
    got = run_world(tmp_path, n_units, launch.number, [0.0] * 3)
    launch.stop()
    assert sorted(u for us in got.values() for u in us) == sorted(set(range(n_units)) - {a, b})
    done = Ledger(tmp_path, n_units, launch.number, 0, 3).done()
    assert (done[a]["launch"], done[b]["launch"]) == (first, first)


def skewed_launch(out, q, release, skew) -> None:
    real = time.time
    time.time = lambda: real() - skew                       # this "host" runs behind
    launch, _ = fresh_launch(out, 1, 4)
    q.put((launch.number, os.getpid()))
    assert release.wait(30)
    launch.stop()


def test_live_launch_with_a_clock_behind_is_not_taken_for_dead(tmp_path):
    q, release = CTX.Queue(), CTX.Event()
    p = start(skewed_launch, tmp_path, q, release, 1000.0)
    first, pid = q.get(timeout=30)
    with pytest.raises(LaunchRefused) as e:                 # its heartbeat looks 1000 s old
        begin_launch(tmp_path, 1, lease_s=LEASE, log=quiet)
    assert f"launch {first} (host" in str(e.value) and f"pid {pid}," in str(e.value)
    assert "clocks" in str(e.value)
    release.set()
    p.join(10)
    assert launch_file(tmp_path, first)["status"] == "finished"


# ------------------------------------------------------------------ kill mid-write
def report(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))                        # synchronous, before a kill


def dying_rank(out, n_units, rank, world, ready, number, how, rep) -> None:
    if rank == 0:
        launch, _ = fresh_launch(out, world, n_units)
        number.value = launch.number
        ready.set()
    else:
        assert ready.wait(30)
    led = Ledger(out, n_units, number.value, rank, world, log=quiet)
    real_write = os.write
    kill = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if how == "busy":                                       # killed at a random moment
        while (u := led.claim_next()) is not None:
            led.mark_done(u, {"unit": u, "pad": "x" * 100_000})
        time.sleep(120)
    if how in ("claim-write", "claim-unlink"):
        report(rep, {"rank": rank})
        if how == "claim-write":                            # half the claim's temp file
            os.write = lambda fd, b: (real_write(fd, bytes(b)[:len(b) // 2]), kill())
        else:                                               # linked, temp file not removed
            os.unlink = kill
        led.claim_next()
    u = led.claim_next()
    report(rep, {"rank": rank, "unit": u})
    if how == "done-write":                                 # half the record's temp file
        os.write = lambda fd, b: (real_write(fd, bytes(b)[:len(b) // 2]), kill())
    elif how == "done-replace":                             # complete temp, never renamed
        os.replace = kill
    led.mark_done(u, {"unit": u, "pad": "y" * 10_000})
    raise AssertionError("not killed")


def test_kill_during_atomic_writes_leaves_no_partial_file_that_counts(tmp_path):
    n_units = 200
    hows = ["busy", "done-write", "done-replace", "claim-unlink", "claim-write"]
    ready, number = CTX.Event(), CTX.Value("i", 0)
    reps = [tmp_path / f"report{r}.json" for r in range(5)]
    out = tmp_path / "cache"
    procs = [start(dying_rank, out, n_units, r, 5, ready, number, how, reps[r])
             for r, how in enumerate(hows)]
    for p in procs[1:]:
        p.join(30)
        assert p.exitcode == -signal.SIGKILL                # each died where planned
    time.sleep(random.uniform(0.05, 0.3))
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].join(10)
    first = number.value
    d = out / "ledger"
    r = [json.loads(p.read_text()) if p.exists() else None for p in reps]
    u_write, u_replace = r[1]["unit"], r[2]["unit"]

    # independent reading: every file with a ledger name is complete JSON
    names = os.listdir(d)
    for f in names:
        if f.endswith((".claim", ".done.json", ".json")) and not f.startswith("."):
            assert isinstance(json.loads((d / f).read_bytes()), dict), f
    tmps = [f for f in names if f.endswith(".tmp")]
    partial = [f for f in tmps if not _parses(d / f)]
    assert len(tmps) >= 4 and len(partial) >= 2, tmps       # the kills left temp files
    done = units_with(out, ".done.json")
    claimed = units_with(out, ".claim")
    assert u_write not in done and u_replace not in done
    assert {u_write, u_replace} <= claimed
    u_unlinked = [u for u in claimed
                  if json.loads((d / claim_name(u)).read_bytes())["rank"] == 3]
    assert len(u_unlinked) == 1                             # its link made a complete claim
    assert not [u for u in claimed
                if json.loads((d / claim_name(u)).read_bytes())["rank"] == 4]

    launch = begin_launch(out, 1, lease_s=LEASE, log=quiet)
    taken = Ledger(out, n_units, launch.number, 0, 1, log=quiet).take_over_stale()
    assert taken == sorted(claimed - done)                  # reference: the files
    assert {u_write, u_replace, u_unlinked[0]} <= set(taken)
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]  # cleaned
    led = Ledger(out, n_units, launch.number, 0, 1, log=quiet)
    again = []
    while (u := led.claim_next()) is not None:
        led.mark_done(u, {"unit": u})
        again.append(u)
    launch.stop()
    assert sorted(again) == sorted(set(range(n_units)) - done)
    records = led.done()
    assert set(records) == set(range(n_units))
    assert all(records[u]["launch"] == first for u in done)


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ bad input, misuse
def test_unreadable_files_and_another_plan(tmp_path):
    d = tmp_path / "ledger"
    launch, _ = fresh_launch(tmp_path, 1, 6, lease=30)
    led = Ledger(tmp_path, 6, launch.number, 0, 1, log=quiet)
    (d / claim_name(2)).write_bytes(b"")                    # kill between create and write
    (d / done_name(3)).write_bytes(b'{"sha')                # damaged record, no claim
    for junk in ["unit-00000004.claim", "unit-4.claim", "unit-0000001.claim.bak", "notes"]:
        (d / junk).write_bytes(b"x")                        # not ledger names: ignored
    got = []
    while (u := led.claim_next()) is not None:
        led.mark_done(u, {})
        got.append(u)
    assert got == [0, 1, 4, 5]                              # 2 looks claimed, 3 looks done
    assert set(led.done()) == {0, 1, 4, 5}                  # 3 does not parse: not done
    assert led.claims()[2]["launch"] is None
    launch.stop()

    launch2, taken = fresh_launch(tmp_path, 1, 6, lease=30)
    assert taken == [2, 3]
    assert (d / f"{done_name(3)}.corrupt-{launch2.number:06d}").read_bytes() == b'{"sha'
    led2 = Ledger(tmp_path, 6, launch2.number, 0, 1, log=quiet)
    assert [led2.claim_next(), led2.claim_next(), led2.claim_next()] == [2, 3, None]

    # a claim of a launch that has not ended is never taken over (it raises)
    (d / launch_name(50)).write_text(json.dumps({"launch": 50, "status": "working",
                                                 "host": "elsewhere", "pid": 1}))
    own = (d / claim_name(2)).read_bytes()
    (d / claim_name(2)).write_text(json.dumps({"launch": 50, "rank": 0}))
    with pytest.raises(ValueError, match="unit 2 is claimed by launch 50 .*has not ended"):
        led2.take_over_stale()
    assert json.loads((d / claim_name(2)).read_bytes())["launch"] == 50
    (d / claim_name(2)).write_bytes(own)

    (d / claim_name(9)).write_bytes(b"{}")                  # a unit beyond this plan
    for call in (led2.claims, led2.done, led2.take_over_stale):
        with pytest.raises(ValueError, match="unit 9, but the unit plan has 6 units"):
            call()
    launch2.stop()


def test_misuse_is_refused(tmp_path):
    launch = begin_launch(tmp_path, 2, lease_s=30, log=quiet)
    r0 = Ledger(tmp_path, 4, launch.number, 0, 2, log=quiet)
    r1 = Ledger(tmp_path, 4, launch.number, 1, 2, log=quiet)
    with pytest.raises(RuntimeError, match="take_over_stale"):
        r1.claim_next()                                     # before rank 0's takeover
    with pytest.raises(ValueError, match="rank 0 only"):
        r1.take_over_stale()
    assert r0.take_over_stale() == []
    u = r1.claim_next()
    assert u == 2                                           # rank 1 of 2 starts at N/2
    with pytest.raises(ValueError, match="holds a claim of launch .* rank 1"):
        r0.mark_done(u, {})
    with pytest.raises(ValueError, match="holds no claim"):
        r0.mark_done(0, {})
    for bad in [4, -1, True, "1"]:
        with pytest.raises(ValueError, match="unit must be"):
            r1.mark_done(bad, {})
    with pytest.raises(ValueError, match="ledger adds them"):
        r1.mark_done(u, {"launch": 7})
    with pytest.raises(TypeError):
        r1.mark_done(u, {"x": object()})
    assert not (tmp_path / "ledger" / done_name(u)).exists()
    r1.mark_done(u, {"ok": 1})
    with pytest.raises(ValueError, match="already done"):
        r1.mark_done(u, {"ok": 2})
    launch.stop()
    with pytest.raises(LaunchEnded, match="finished"):
        r0.claim_next()
    for args in [(tmp_path, 4, 1, 2, 2), (tmp_path, -1, 1, 0, 1), (tmp_path, 4, 0, 0, 1)]:
        with pytest.raises(ValueError):
            Ledger(*args)


def test_filesystem_without_hard_links(tmp_path, monkeypatch):
    def no_link(*_a, **_k):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    launch, _ = fresh_launch(tmp_path, 2, 10, lease=30)
    ranks = [Ledger(tmp_path, 10, launch.number, r, 2, log=quiet) for r in range(2)]
    got = []
    while True:
        us = [led.claim_next() for led in ranks]
        got += [u for u in us if u is not None]
        if us == [None, None]:
            break
    launch.stop()
    assert sorted(got) == list(range(10))
    assert {c["launch"] for c in ranks[0].claims().values()} == {launch.number}


def stalled_launch(out, q, go) -> None:
    launch, _ = fresh_launch(out, 1, 4)
    led = Ledger(out, 4, launch.number, 0, 1, log=quiet)
    u = led.claim_next()
    q.put((launch.number, u))
    assert go.wait(30)                                      # (stopped with SIGSTOP here)
    results = []
    for call in (led.claim_next, lambda: led.mark_done(u, {})):
        try:
            call()
            results.append("ran")
        except LaunchEnded as e:
            results.append(f"LaunchEnded: {e}")
    q.put((results, launch.lost))


def test_stalled_launch_declared_dead_is_fenced_when_it_resumes(tmp_path):
    q, go = CTX.Queue(), CTX.Event()
    p = start(stalled_launch, tmp_path, q, go)
    first, u = q.get(timeout=30)
    os.kill(p.pid, signal.SIGSTOP)                          # a stall longer than the lease
    try:
        launch, taken = fresh_launch(tmp_path, 1, 4)
        assert launch.declared_dead == [first] and taken == [u]
    finally:
        os.kill(p.pid, signal.SIGCONT)
    time.sleep(0.5 * LEASE)                                 # two beats of the old thread
    go.set()
    results, lost = q.get(timeout=30)
    p.join(10)
    assert all(r.startswith("LaunchEnded") and "dead" in r for r in results), results
    assert lost and f"launch {first} was marked 'dead'" in lost
    assert not (tmp_path / "ledger" / f"launch-{first:06d}.alive").exists()  # not revived
    led = Ledger(tmp_path, 4, launch.number, 0, 1, log=quiet)
    assert sorted(iter(led.claim_next, None)) == [0, 1, 2, 3]
    launch.stop()
