"""Launches of the cache stage and their lease: steps 1 and 2 of pipeline.stage1_cache.ledger's protocol.

`begin_launch` (rank 0) numbers a new launch by creating its launch file exclusively, starts
its heartbeat thread (`Launch`: the .alive file rewritten every lease_s/4 s), waits out or
refuses (LaunchRefused) other live launches, declares dead ones dead (fencing their ranks)
and marks itself working. `Launch.stop` ends it. The claims and done records of units are
pipeline.stage1_cache.ledger's; the file operations are pipeline.stage1_cache.ledger_files'.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.stage1_cache.ledger_files import (ENDED, LAUNCH_RE, NO_LINK, LaunchEnded, LaunchRefused,
                                   alive_name, as_int, describe_launch, host_name, launch_name,
                                   launch_status, ledger_dir, link_new, name_index, read_bytes,
                                   replace_json, unlink_if_present, write_new, write_tmp)

DEFAULT_LEASE_S = 60.0


class Launch:
    """One launch of the stage, held by its rank 0: number, heartbeat thread, stop()."""

    def __init__(self, out: Path, number: int, world: int, lease_s: float,
                 log: Callable[[str], Any]):
        self.out, self.dir = Path(out), ledger_dir(out)
        self.number, self.world, self.lease_s, self.log = number, world, lease_s, log
        self.host, self.pid = host_name(), os.getpid()
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
        replace_json(self.dir, alive_name(self.number), self.number,
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
        status, info = launch_status(self.dir, self.number)
        if status not in ENDED:
            return False
        unlink_if_present(self.dir / alive_name(self.number))
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
        status, info = launch_status(self.dir, self.number)
        if status in ENDED:
            raise LaunchEnded(f"launch {self.number} is already {status!r}: "
                              f"{info.get('reason', '')}")
        replace_json(self.dir, launch_name(self.number), self.number, {**info, **fields})

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
        unlink_if_present(self.dir / alive_name(self.number))

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
            higher = [i for i in (name_index(LAUNCH_RE, f, launch_name)
                                  for f in os.listdir(self.dir)) if i is not None and i > n]
            blockers, dead = [], []
            for m in [*range(1, n), *sorted(higher)]:
                if m in ended:
                    continue
                status, info = launch_status(self.dir, m)
                if status in ENDED:
                    ended.add(m)
                    continue
                raw = read_bytes(self.dir / alive_name(m))
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
                    self.log(f"[ledger] launch {n}: {describe_launch(m, info)} is live (heartbeat "
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
        return (f"launch {self.number} refused: {describe_launch(m, info)} is running on this "
                f"cache directory; its heartbeat {self.dir / alive_name(m)} was written "
                f"{age:.1f} s ago{clock} and kept beating for the {1.5 * self.lease_s:g} s this "
                f"launch waited (lease {self.lease_s:g} s). Two launches must not cache into one "
                f"directory at once: wait for launch {m} to finish, or kill it (pid "
                f"{info.get('pid', '?')} on {info.get('host', '?')}, or cancel its job); after "
                f"a kill a new launch waits up to {self.lease_s:g} s for its heartbeat to "
                "expire, then takes over its unfinished units")

    def _declare_dead(self, dead: list) -> list[int]:
        """Mark launches the lease check found dead as "dead" (fencing their ranks)."""
        for m, info, age in dead:
            reason = (f"declared dead by launch {self.number}: no heartbeat for "
                      f"{age:.1f} s (lease {self.lease_s:g} s)")
            replace_json(self.dir, launch_name(m), self.number,
                          {**info, "launch": m, "status": "dead", "ended": time.time(),
                           "reason": reason, "declared_dead_by": self.number})
            unlink_if_present(self.dir / alive_name(m))
            self.log(f"[ledger] launch {self.number}: {describe_launch(m, info)} {reason}")
        self.declared_dead = [m for m, _, _ in dead]
        return self.declared_dead


def begin_launch(out: str | Path, world: int, lease_s: float = DEFAULT_LEASE_S,
                 log: Callable[[str], Any] = print, above: int = 0) -> Launch:
    """Rank 0 only: number this launch, start its heartbeat, wait out or refuse other live
    launches (LaunchRefused, a ValueError), declare dead ones dead. Returns the Launch
    (working); broadcast `launch.number` to the other ranks.

    The number is above every launch file's and above `above`: the cache stage passes the
    highest launch number in its shard names, so a launch after a lost ledger/ never
    writes a shard name an earlier launch wrote."""
    if as_int(world) is None or world < 1:
        raise ValueError(f"world must be a positive int, not {world!r}")
    if as_int(above) is None or above < 0:
        raise ValueError(f"above must be an int >= 0, not {above!r}")
    if not (isinstance(lease_s, (int, float)) and lease_s > 0):
        raise ValueError(f"lease_s must be a positive number, not {lease_s!r}")
    d = ledger_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    n, last_failed = None, 0
    for _ in range(10000):
        highest = max((i for i in (name_index(LAUNCH_RE, f, launch_name) for f in os.listdir(d))
                       if i is not None), default=0)
        cand = max(highest, last_failed, above) + 1
        tmp = write_tmp(d, launch_name(cand), cand,
                         {"launch": cand, "host": host_name(), "pid": os.getpid(),
                          "started": time.time(), "world_size": world, "lease_s": lease_s,
                          "status": "starting"})
        try:
            if link_new(tmp, d / launch_name(cand)):
                n = cand
                break
            last_failed = cand
        except FileNotFoundError:  # our temporary file was cleaned away: retry
            pass
        except OSError as e:
            if e.errno not in NO_LINK:
                raise
            try:  # no hard links here: exclusive create (a kill mid-write leaves a
                # file that does not parse, which the lease check treats as dead)
                write_new(d / launch_name(cand), read_bytes(tmp) or b"")
                n = cand
                break
            except FileExistsError:
                last_failed = cand
        finally:
            unlink_if_present(tmp)
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
        unlink_if_present(d / alive_name(n))
        raise
    log(f"[ledger] launch {n} working (world size {world}, lease {lease_s:g} s)")
    return launch
