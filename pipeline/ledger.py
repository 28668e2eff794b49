"""Work-unit ledger: which rank caches which unit, on a shared filesystem, with no server.

The cache stage cuts the corpus into units (0 .. N-1). Ranks claim units from this ledger,
so a fast rank takes more units and a restart with any number of ranks continues with the
unfinished units only. Everything lives in `OUT/ledger/` and is built from three atomic file
operations the shared filesystems in use provide (NFSv3+, Lustre, GPFS, BeeGFS, local):
exclusive creation of a name (`os.link` of a complete temporary file onto it, which fails if
the name exists; `O_CREAT|O_EXCL` where links are not supported), `os.replace` of a complete
temporary file, and `unlink`. No file is ever written in place, so a reader sees a complete
file or none.

Files (all in OUT/ledger/; n = launch number, u = unit index):
    launch-{n:06d}.json     one per launch (one mpiexec/srun job): launch, host, pid, started,
                            world_size, lease_s, status (starting -> working -> finished |
                            failed | refused | dead), reasons, takeover summary
    launch-{n:06d}.alive    its heartbeat: {"time", "host", "pid", "beat"}, rewritten every
                            lease_s/4 s by a thread of rank 0; deleted when the launch ends
    unit-{u:07d}.claim      the claim: {"launch", "rank", "host", "pid", "time"}
    unit-{u:07d}.done.json  the unit's record (opaque to the ledger) plus "launch" and "rank"
    .*.L{n:06d}.*.tmp       temporary files; never read; removed by a later launch
    unit-{u:07d}.done.json.corrupt-{n:06d}   an unreadable record moved aside by launch n

Protocol
1. Launch. Rank 0 of a new launch creates launch-{n}.json exclusively at n = 1 + the highest
   existing number (retrying on collision) and starts its heartbeat at once.
2. Lease. A launch is live while it has not ended (status finished, failed, refused or dead)
   and its heartbeat beats: its .alive time (or, before the first beat, its `started` time)
   is less than lease_s old, or the .alive file changed while the new launch watched it.
   A heartbeat that looks older than lease_s by this host's clock is watched for lease_s/2
   (two beats) before the launch counts as dead, so a host whose clock runs behind is not
   mistaken for a dead one; a launch seen beating counts as dead only after lease_s without
   a change. The new launch waits up to 1.5 * lease_s for every live launch with a lower
   number, and every live launch that is already working, to stop beating; if one keeps
   beating it refuses (LaunchRefused, a ValueError naming that launch's number, host, pid
   and heartbeat age), records the reason in its own file (status "refused") and deletes
   its heartbeat. A live launch with a higher number that is still starting is ignored: it
   waits for this one and refuses. So of launches started at once exactly one works (the
   lowest number), and a running launch is never overlapped.
3. Takeover. A claim names its launch; a new launch takes over the claims of older
   launches, which the lease check proved dead. Concretely: after the lease check the new
   launch marks every launch it found dead as status "dead" (deleting its heartbeat) and then
   becomes "working"; `take_over_stale` (rank 0, before any rank claims) deletes every claim
   of a unit that is not done whose launch has ended, and returns those units, whose partial
   output the caller deletes. Claims of the current launch are never taken over, nor are
   claims of a launch that has not ended (that raises). Units whose record cannot be parsed
   are moved aside and returned too. Temporary files of ended launches are removed.
4. Claims. `claim_next` on rank r of W walks the units from r * N // W, wrapping around,
   and claims the first unit that has neither a claim nor a record by creating its claim
   exclusively; it returns None when every unit is done or claimed. Claims are never
   released while a launch works, so each rank walks the ring once (a cursor).
5. Done. The claimant writes unit-{u}.done.json atomically. A unit is done iff that file
   exists and parses. Its claim stays.
6. Fencing. `claim_next` and `mark_done` read the launch's own file first and raise
   LaunchEnded if the launch has ended (finished, or declared dead by a later launch);
   `mark_done` also checks that the claim still names this launch and rank, and refuses a
   unit that is already done.

Assumptions: rank 0's process keeps its heartbeat thread running (a stall longer than
lease_s, e.g. SIGSTOP or a filesystem hang, makes a later launch take the launch for dead;
its ranks then stop at their next claim_next/mark_done); hosts' clocks agree to within a
fraction of lease_s (a clock running ahead can only make a dead launch look live, which
delays or refuses a restart, never overlaps two launches).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

LEDGER_DIR = "ledger"
DEFAULT_LEASE_S = 60.0
ENDED = ("finished", "failed", "refused", "dead")
"""Statuses of a launch that has stopped for good: it never counts as live again."""

_LAUNCH_RE = re.compile(r"launch-([0-9]{6,})\.json")
_CLAIM_RE = re.compile(r"unit-([0-9]{7,})\.claim")
_DONE_RE = re.compile(r"unit-([0-9]{7,})\.done\.json")
_TMP_RE = re.compile(r"\..+\.L([0-9]{6,})\.[A-Za-z0-9_-]*\.[0-9]+\.[0-9a-f]+\.tmp")
# errors of os.link on filesystems without hard links: fall back to O_CREAT|O_EXCL
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV,
            errno.EMLINK}


class LaunchRefused(ValueError):
    """A new launch refused to start because another launch on the same cache is live."""


class LaunchEnded(RuntimeError):
    """This launch has ended (stopped, or declared dead by a later launch): stop working."""


def ledger_dir(out: str | Path) -> Path:
    return Path(out) / LEDGER_DIR


def launch_name(n: int) -> str:
    return f"launch-{n:06d}.json"


def alive_name(n: int) -> str:
    return f"launch-{n:06d}.alive"


def claim_name(u: int) -> str:
    return f"unit-{u:07d}.claim"


def done_name(u: int) -> str:
    return f"unit-{u:07d}.done.json"


def _index(regex: re.Pattern, name: str, fmt: Callable[[int], str]) -> int | None:
    """The number in a canonical ledger file name (`fmt(number) == name`), else None."""
    m = regex.fullmatch(name)
    if m is None:
        return None
    i = int(m.group(1))
    return i if fmt(i) == name else None


def _host() -> str:
    return socket.gethostname()


def _tmp_name(target: str, launch: int) -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "_", _host())[:64]
    return f".{target}.L{launch:06d}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (must not exist), write `data`, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(d: Path, target: str, launch: int, obj: Any) -> Path:
    """A complete temporary file holding `obj` as JSON, named for `launch`."""
    data = json.dumps(obj).encode()  # serialise first: a bad record touches no file
    tmp = d / _tmp_name(target, launch)
    try:
        _write_new(tmp, data)
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _replace_json(d: Path, name: str, launch: int, obj: Any) -> None:
    """Write d/name atomically: a complete temporary file, then os.replace."""
    tmp = _write_tmp(d, name, launch, obj)
    try:
        os.replace(tmp, d / name)
    except BaseException:
        _unlink(tmp)
        raise


def _link_new(tmp: Path, target: Path) -> bool:
    """Give the complete file `tmp` the name `target` if no file has it; True if we did.
    st_nlink tells a real collision from a retransmitted link that succeeded (NFS)."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return os.stat(tmp).st_nlink > 1


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read(path: Path) -> bytes | None:
    """The bytes of `path`, None if it does not exist (retries a stale NFS handle)."""
    for attempt in range(3):
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == 2:
                raise
    return None


def _load(path: Path) -> tuple[str, Any]:
    """("missing", None), ("bad", reason) or ("ok", the JSON object) for a ledger file."""
    raw = _read(path)
    if raw is None:
        return "missing", None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return "bad", f"not JSON ({e}; {len(raw)} bytes)"
    if not isinstance(obj, dict):
        return "bad", f"not a JSON object but {type(obj).__name__}"
    return "ok", obj


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _launch_status(d: Path, m: int) -> tuple[str, dict]:
    """(status, launch file) of launch m; status "missing"/"unreadable" when there is none."""
    st, obj = _load(d / launch_name(m))
    if st != "ok":
        return ("missing" if st == "missing" else "unreadable"), {}
    return str(obj.get("status", "starting")), obj


def _describe(m: int, info: dict) -> str:
    return (f"launch {m} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
            f"world size {info.get('world_size', '?')}, status {info.get('status', '?')})")


class Launch:
    """One launch of the stage, held by its rank 0: number, heartbeat thread, stop()."""

    def __init__(self, out: Path, number: int, world: int, lease_s: float,
                 log: Callable[[str], Any]):
        self.out, self.dir = Path(out), ledger_dir(out)
        self.number, self.world, self.lease_s, self.log = number, world, lease_s, log
        self.host, self.pid = _host(), os.getpid()
        self.declared_dead: list[int] = []   # earlier launches this one found dead
        self.lost: str | None = None         # set when a later launch declared this one dead
        self._beat = 0
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"Launch({self.number}, host={self.host!r}, pid={self.pid}, world={self.world})"

    # ---------------------------------------------------------------- heartbeat
    def _beat_once(self) -> None:
        self._beat += 1
        _replace_json(self.dir, alive_name(self.number), self.number,
                      {"time": time.time(), "host": self.host, "pid": self.pid,
                       "beat": self._beat})

    def _start_heartbeat(self) -> None:
        self._beat_once()  # before anything else: the launch is live from its first look
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name=f"ledger-heartbeat-{self.number}")
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.lease_s / 4
        last_ok = time.monotonic()
        while not self._halt.wait(interval):
            try:
                if self._ended_by_other():
                    return
                self._beat_once()
                last_ok = time.monotonic()
                if self._ended_by_other():  # declared dead while this beat was written
                    return
            except (OSError, ValueError) as e:  # transient filesystem errors, a half-read file: keep beating
                self.log(f"[ledger] launch {self.number}: heartbeat failed ({e!r}); "
                         f"{time.monotonic() - last_ok:.0f} s since the last beat, lease "
                         f"{self.lease_s:g} s")

    def _ended_by_other(self) -> bool:
        """True (and the heartbeat file removed) when another launch ended this one: a
        stall longer than the lease made it look dead. stop() and a refusal halt the
        heartbeat thread before they write a status, so only another launch gets here."""
        status, info = _launch_status(self.dir, self.number)
        if status not in ENDED:
            return False
        _unlink(self.dir / alive_name(self.number))
        self.lost = (f"launch {self.number} was marked {status!r} "
                     f"({info.get('reason', 'no reason given')})")
        self.log(f"[ledger] {self.lost}; its heartbeat stops and its ranks stop at their "
                 "next claim")
        return True

    def _halt_heartbeat(self) -> None:
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # ---------------------------------------------------------------- status
    def _set(self, **fields: Any) -> None:
        status, info = _launch_status(self.dir, self.number)
        if status in ENDED:
            raise LaunchEnded(f"launch {self.number} is already {status!r}: "
                              f"{info.get('reason', '')}")
        _replace_json(self.dir, launch_name(self.number), self.number, {**info, **fields})

    def stop(self, status: str = "finished", reason: str | None = None) -> None:
        """End the launch: stop the heartbeat, record `status` ("finished" or "failed"),
        delete the heartbeat file. Call it only when no rank of the launch works any more
        (after a barrier). Idempotent."""
        if status not in ("finished", "failed"):
            raise ValueError(f"status must be 'finished' or 'failed', not {status!r}")
        if self._stopped:
            return
        self._stopped = True
        self._halt_heartbeat()
        try:
            self._set(status=status, ended=time.time(),
                      **({"reason": reason} if reason is not None else {}))
        except LaunchEnded as e:
            self.log(f"[ledger] launch {self.number}: not marked {status!r}: {e}")
        _unlink(self.dir / alive_name(self.number))

    # ---------------------------------------------------------------- lease check
    def _wait_for_others(self) -> list[int]:
        """Wait until no other launch blocks this one; returns the non-ended launches found
        dead. Raises LaunchRefused when one keeps beating for 1.5 * lease_s."""
        n, lease = self.number, self.lease_s
        deadline = time.monotonic() + 1.5 * lease
        poll = min(lease / 8, 2.0)
        ended: set[int] = set()
        # m -> [heartbeat bytes last seen, first seen (monotonic), last change or None]
        seen: dict[int, list] = {}
        announced: set[int] = set()
        while True:
            # every lower number by name (all exist: n was created after n-1), higher ones
            # from the listing
            higher = [i for i in (_index(_LAUNCH_RE, f, launch_name)
                                  for f in os.listdir(self.dir)) if i is not None and i > n]
            blockers, dead = [], []
            for m in [*range(1, n), *sorted(higher)]:
                if m in ended:
                    continue
                status, info = _launch_status(self.dir, m)
                if status in ENDED:
                    ended.add(m)
                    continue
                raw = _read(self.dir / alive_name(m))
                if status == "missing" and raw is None:
                    ended.add(m)  # a launch file deleted by hand: nothing to wait for
                    continue
                now_m = time.monotonic()
                o = seen.get(m)
                if o is None:
                    o = seen[m] = [raw, now_m, None]
                elif raw != o[0]:
                    o[0], o[2] = raw, now_m
                beat_time = info.get("started")
                if raw is not None:
                    try:
                        beat_time = json.loads(raw)["time"]
                    except (ValueError, KeyError, TypeError):
                        pass
                age = (time.time() - beat_time) if isinstance(beat_time, (int, float)) \
                    else float("inf")
                quiet = now_m - (o[1] if o[2] is None else o[2])
                live = age < lease or quiet < (lease / 2 if o[2] is None else lease)
                if not live:
                    dead.append((m, info, age))
                elif m < n or status == "working":
                    blockers.append((m, info, age, o[2] is not None))
            if not blockers:
                return self._declare_dead(dead)
            if time.monotonic() >= deadline:
                raise LaunchRefused(self._refusal(blockers))
            for m, info, age, _ in blockers:
                if m not in announced:
                    announced.add(m)
                    self.log(f"[ledger] launch {n}: {_describe(m, info)} is live (heartbeat "
                             f"{age:.1f} s old); waiting up to {1.5 * lease:g} s for it to "
                             "stop")
            time.sleep(poll)

    def _refusal(self, blockers: list) -> str:
        # name a working launch if there is one, else the lowest live one
        m, info, age, changed = min(blockers, key=lambda b: (b[1].get("status") != "working",
                                                             b[0]))
        if age < 0:
            clock = (f" (its heartbeat time lies {-age:.0f} s in the future: the clocks of "
                     f"this host and {info.get('host', '?')} differ)")
        elif age >= self.lease_s and changed:
            clock = (f" (by this host's clock its heartbeat is {age:.0f} s old, but the file "
                     f"kept changing: the clocks of this host and {info.get('host', '?')} "
                     "differ)")
        else:
            clock = ""
        return (f"launch {self.number} refused: {_describe(m, info)} is running on this cache "
                f"directory; its heartbeat {self.dir / alive_name(m)} was written {age:.1f} s "
                f"ago{clock} and kept beating for the {1.5 * self.lease_s:g} s this launch "
                f"waited (lease {self.lease_s:g} s). Two launches must not cache into one "
                f"directory at once: wait for launch {m} to finish, or kill it (pid "
                f"{info.get('pid', '?')} on {info.get('host', '?')}, or cancel its job); after "
                f"a kill a new launch waits up to {self.lease_s:g} s for its heartbeat to "
                "expire, then takes over its unfinished units")

    def _declare_dead(self, dead: list) -> list[int]:
        """Mark launches the lease check found dead as "dead" (fencing their ranks)."""
        for m, info, age in dead:
            reason = (f"declared dead by launch {self.number}: no heartbeat for "
                      f"{age:.1f} s (lease {self.lease_s:g} s)")
            _replace_json(self.dir, launch_name(m), self.number,
                          {**info, "launch": m, "status": "dead", "ended": time.time(),
                           "reason": reason, "declared_dead_by": self.number})
            _unlink(self.dir / alive_name(m))
            self.log(f"[ledger] launch {self.number}: {_describe(m, info)} {reason}")
        self.declared_dead = [m for m, _, _ in dead]
        return self.declared_dead


def begin_launch(out: str | Path, world: int, lease_s: float = DEFAULT_LEASE_S,
                 log: Callable[[str], Any] = print) -> Launch:
    """Rank 0 only: number this launch, start its heartbeat, wait out or refuse other live
    launches (LaunchRefused, a ValueError), declare dead ones dead. Returns the Launch
    (working); broadcast `launch.number` to the other ranks."""
    if _int(world) is None or world < 1:
        raise ValueError(f"world must be a positive int, not {world!r}")
    if not (isinstance(lease_s, (int, float)) and lease_s > 0):
        raise ValueError(f"lease_s must be a positive number, not {lease_s!r}")
    d = ledger_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    n, last_failed = None, 0
    for _ in range(10000):
        highest = max((i for i in (_index(_LAUNCH_RE, f, launch_name) for f in os.listdir(d))
                       if i is not None), default=0)
        cand = max(highest, last_failed) + 1
        tmp = _write_tmp(d, launch_name(cand), cand,
                         {"launch": cand, "host": _host(), "pid": os.getpid(),
                          "started": time.time(), "world_size": world, "lease_s": lease_s,
                          "status": "starting"})
        try:
            if _link_new(tmp, d / launch_name(cand)):
                n = cand
                break
            last_failed = cand
        except FileNotFoundError:  # our temporary file was cleaned away: retry
            pass
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            try:  # no hard links here: exclusive create (a kill mid-write leaves a
                # file that does not parse, which the lease check treats as dead)
                _write_new(d / launch_name(cand), _read(tmp) or b"")
                n = cand
                break
            except FileExistsError:
                last_failed = cand
        finally:
            _unlink(tmp)
    if n is None:
        raise RuntimeError(f"{d}: could not create a launch file after 10000 attempts")
    launch = Launch(Path(out), n, world, float(lease_s), log)
    try:
        launch._start_heartbeat()
        launch._wait_for_others()
        launch._set(status="working", working_since=time.time())
    except BaseException as e:
        launch._halt_heartbeat()
        launch._stopped = True
        try:
            launch._set(status="refused", ended=time.time(),
                        reason=str(e) if isinstance(e, LaunchRefused)
                        else f"{type(e).__name__}: {e}")
        except (OSError, LaunchEnded) as mark:
            # The refusal itself (re-raised below) is what the user needs; the launch file
            # keeps its old status, and with its heartbeat gone it counts as dead anyway.
            log(f"[ledger] launch {n}: could not record the refusal ({mark})")
        _unlink(d / alive_name(n))
        raise
    log(f"[ledger] launch {n} working (world size {world}, lease {lease_s:g} s)")
    return launch


class Ledger:
    """One rank's view of the ledger of launch `launch` (see the module docstring)."""

    begin_launch = staticmethod(begin_launch)

    def __init__(self, out: str | Path, n_units: int, launch: int, rank: int, world: int,
                 log: Callable[[str], Any] = print):
        for name, v, lo in [("n_units", n_units, 0), ("launch", launch, 1), ("world", world, 1),
                            ("rank", rank, 0)]:
            if _int(v) is None or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, not {v!r}")
        if rank >= world:
            raise ValueError(f"rank {rank} is not below world size {world}")
        self.out, self.dir = Path(out), ledger_dir(out)
        self.n_units, self.launch, self.rank, self.world, self.log = (n_units, launch, rank,
                                                                      world, log)
        self._start = rank * n_units // world
        self._steps = 0                 # units of the ring this rank has passed
        self._skip: set[int] | None = None
        self._no_link = False

    # ---------------------------------------------------------------- helpers
    def _unit(self, unit: Any) -> int:
        if _int(unit) is None or not 0 <= unit < self.n_units:
            raise ValueError(f"unit must be an int in [0, {self.n_units}), not {unit!r}")
        return unit

    def _fence(self, need_takeover: bool = True) -> dict:
        status, info = _launch_status(self.dir, self.launch)
        if status in ENDED:
            raise LaunchEnded(f"rank {self.rank}: launch {self.launch} has ended ({status}: "
                              f"{info.get('reason', 'stopped')}); this rank must stop")
        if status != "working":
            raise RuntimeError(f"rank {self.rank}: launch {self.launch} is {status!r}, not "
                               "working: rank 0 must run Ledger.begin_launch first "
                               f"({self.dir / launch_name(self.launch)})")
        if need_takeover and "takeover" not in info:
            raise RuntimeError(f"rank {self.rank}: launch {self.launch} has not run "
                               "take_over_stale yet: rank 0 runs it before any rank claims "
                               "(put a barrier between them)")
        return info

    def _files(self) -> tuple[dict[int, str], dict[int, str], list[str]]:
        """Claims, records and temporary files in the ledger; raises on a unit outside the
        plan (the ledger belongs to another unit plan)."""
        claims, dones, tmps = {}, {}, []
        for f in os.listdir(self.dir):
            for regex, fmt, into in [(_CLAIM_RE, claim_name, claims), (_DONE_RE, done_name, dones)]:
                u = _index(regex, f, fmt)
                if u is not None:
                    if u >= self.n_units:
                        raise ValueError(
                            f"{self.dir / f} names unit {u}, but the unit plan has "
                            f"{self.n_units} units (0..{self.n_units - 1}): this ledger was "
                            "written for another plan (the corpus or the unit size changed); "
                            "re-cache into a new directory")
                    into[u] = f
            if _TMP_RE.fullmatch(f):
                tmps.append(f)
        return claims, dones, tmps

    # ---------------------------------------------------------------- rank 0
    def take_over_stale(self) -> list[int]:
        """Rank 0, after begin_launch and before any rank claims: delete the claims of
        units not done whose launch has ended, move unreadable records aside, remove
        temporary files of ended launches. Returns the units taken over (sorted): the caller
        deletes their partial output."""
        if self.rank != 0:
            raise ValueError(f"take_over_stale runs on rank 0 only, not on rank {self.rank}")
        self._fence(need_takeover=False)
        claims, dones, tmps = self._files()
        taken: set[int] = set()
        for u, f in sorted(dones.items()):
            st, why = _load(self.dir / f)
            if st == "bad":
                aside = self.dir / f"{f}.corrupt-{self.launch:06d}"
                os.replace(self.dir / f, aside)
                self.log(f"[ledger] {self.dir / f} is unreadable ({why}); moved to {aside.name}"
                         f" and unit {u} will be cached again")
                taken.add(u)
        ended: dict[int, bool] = {}

        def has_ended(m: int) -> bool:
            if m not in ended:
                status, _ = _launch_status(self.dir, m)
                ended[m] = status in ENDED or status in ("missing", "unreadable")
            return ended[m]

        for u, f in sorted(claims.items()):
            if u in dones and u not in taken:
                continue  # done: the claim stays
            st, c = _load(self.dir / f)
            if st == "missing":
                continue
            owner = _int(c.get("launch")) if st == "ok" else None
            if owner == self.launch:
                continue  # never take over the current launch's claims
            if owner is not None and not has_ended(owner):
                status, info = _launch_status(self.dir, owner)
                raise ValueError(f"{self.dir / f}: unit {u} is claimed by {_describe(owner, info)}"
                                 f", which has not ended; launch {self.launch} did not find it "
                                 "dead, so it cannot take its claims over (was begin_launch "
                                 "skipped?)")
            _unlink(self.dir / f)
            taken.add(u)
        removed = 0
        for f in tmps:
            m = int(_TMP_RE.fullmatch(f).group(1))
            if m != self.launch and (has_ended(m) if m < self.launch else
                                     _launch_status(self.dir, m)[0] in ENDED):
                _unlink(self.dir / f)
                removed += 1
        info = self._fence(need_takeover=False)
        _replace_json(self.dir, launch_name(self.launch), self.launch,
                      {**info, "takeover": {"time": time.time(), "units": len(taken),
                                            "temporary_files_removed": removed}})
        if taken or removed:
            self.log(f"[ledger] launch {self.launch}: took over {len(taken)} unfinished "
                     f"unit(s) of ended launches, removed {removed} temporary file(s)")
        return sorted(taken)

    # ---------------------------------------------------------------- every rank
    def claim_next(self, only=None) -> int | None:
        """Claim the next free unit on this rank's walk; None when every unit is done or
        claimed (by any rank). `only(u) -> bool` restricts the walk (a static split, for the
        assignment benchmark)."""
        self._fence()
        if self._skip is None:  # one listing; claims are never released during a launch
            claims, dones, _ = self._files()
            self._skip = set(claims) | set(dones)
        content = {"launch": self.launch, "rank": self.rank, "host": _host(),
                   "pid": os.getpid(), "time": time.time()}
        tmp = None
        try:
            while self._steps < self.n_units:
                u = (self._start + self._steps) % self.n_units
                self._steps += 1
                if u in self._skip or (only is not None and not only(u)):
                    continue
                if self._no_link:
                    if self._claim(u, content):
                        return u
                    continue
                if tmp is None:
                    tmp = _write_tmp(self.dir, f"claim.r{self.rank:04d}", self.launch, content)
                try:
                    if _link_new(tmp, self.dir / claim_name(u)):
                        return u
                except OSError as e:
                    if e.errno not in _NO_LINK:
                        raise
                    self._no_link = True
                    self.log(f"[ledger] {self.dir}: hard links are not supported ({e}); "
                             "claims use O_CREAT|O_EXCL")
                    if self._claim(u, content):
                        return u
            return None
        finally:
            if tmp is not None:
                _unlink(tmp)

    def _claim(self, u: int, content: dict) -> bool:
        """Claim by exclusive create (filesystems without hard links). A kill between the
        create and the write leaves a claim that does not parse: the current launch skips
        it, the next launch takes it over."""
        try:
            _write_new(self.dir / claim_name(u), json.dumps(content).encode())
            return True
        except FileExistsError:
            return False

    def mark_done(self, unit: int, record: dict) -> None:
        """Record `unit` as done with `record` (a JSON-serialisable dict; the ledger adds
        "launch" and "rank"). The unit must be claimed by this launch and rank."""
        u = self._unit(unit)
        if not isinstance(record, dict):
            raise ValueError(f"record must be a dict, not {type(record).__name__}")
        clash = {"launch", "rank"} & set(record)
        if clash:
            raise ValueError(f"record must not hold {sorted(clash)}: the ledger adds them")
        full = {**record, "launch": self.launch, "rank": self.rank}
        json.dumps(full)  # not serialisable: raise before touching the ledger
        self._fence()
        st, c = _load(self.dir / claim_name(u))
        if st != "ok" or c.get("launch") != self.launch or c.get("rank") != self.rank:
            held = "no claim" if st == "missing" else (f"an unreadable claim ({c})" if st == "bad"
                                                       else f"a claim of launch "
                                                       f"{c.get('launch')} rank {c.get('rank')}")
            raise ValueError(f"rank {self.rank} of launch {self.launch} cannot mark unit {u} "
                             f"done: {self.dir / claim_name(u)} holds {held}")
        if os.path.lexists(self.dir / done_name(u)):
            raise ValueError(f"unit {u} is already done ({self.dir / done_name(u)})")
        _replace_json(self.dir, done_name(u), self.launch, full)

    def done(self) -> dict[int, dict]:
        """Every unit's record (units whose record exists and parses)."""
        _, dones, _ = self._files()
        out = {}
        for u, f in sorted(dones.items()):
            st, rec = _load(self.dir / f)
            if st == "ok":
                out[u] = rec
        return out

    def claims(self) -> dict[int, dict]:
        """Every claim; an unreadable one as {"launch": None, "unreadable": reason}."""
        claims, _, _ = self._files()
        out = {}
        for u, f in sorted(claims.items()):
            st, c = _load(self.dir / f)
            if st == "ok":
                out[u] = c
            elif st == "bad":
                out[u] = {"launch": None, "unreadable": c}
        return out
