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
   existing number (retrying on collision; the cache stage also passes the highest launch
   number in its shard names as a floor, so a lost ledger/ never makes a launch reuse a
   shard name) and starts its heartbeat at once.
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
7. Restore. After takeover and before any rank claims, rank 0 may write the done record of
   a unit that has none (`restore`), rebuilt from another copy of it the caller verified
   (the cache stage: a finished cache's manifest.json, whose shards match their size and
   sha256). The record keeps the launch and rank that cached the unit; it needs no claim.

Assumptions: rank 0's process keeps its heartbeat thread running (a stall longer than
lease_s, e.g. SIGSTOP or a filesystem hang, makes a later launch take the launch for dead;
its ranks then stop at their next claim_next/mark_done); hosts' clocks agree to within a
fraction of lease_s (a clock running ahead can only make a dead launch look live, which
delays or refuses a restart, never overlaps two launches).

Code: steps 3-6 (`Ledger`: takeover, claims, done records, fencing) live here; steps 1-2
(`begin_launch`, `Launch` and its heartbeat) in pipeline.stage1_cache.lease; the file names and atomic
file operations both use in pipeline.stage1_cache.ledger_files. Their public names are importable from
this module.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.stage1_cache.lease import DEFAULT_LEASE_S, Launch, begin_launch
from pipeline.stage1_cache.ledger_files import (CLAIM_RE, DONE_RE, ENDED, LEDGER_DIR, NO_LINK, TMP_RE,
                                   LaunchEnded, LaunchRefused, alive_name, as_int, claim_name,
                                   describe_launch, done_name, host_name, launch_name,
                                   launch_status, ledger_dir, link_new, load_json, name_index,
                                   replace_json, unlink_if_present, write_new, write_tmp)

# The ledger's public names, wherever they are defined (pipeline.stage1_cache.lease, pipeline.stage1_cache.ledger_files).
__all__ = ["DEFAULT_LEASE_S", "ENDED", "LEDGER_DIR", "Launch", "LaunchEnded", "LaunchRefused",
           "Ledger", "alive_name", "begin_launch", "claim_name", "done_name", "launch_name",
           "ledger_dir"]


class Ledger:
    """One rank's view of the ledger of launch `launch` (see the module docstring)."""

    begin_launch = staticmethod(begin_launch)

    def __init__(self, out: str | Path, n_units: int, launch: int, rank: int, world: int,
                 log: Callable[[str], Any] = print):
        for name, v, lo in [("n_units", n_units, 0), ("launch", launch, 1), ("world", world, 1),
                            ("rank", rank, 0)]:
            if as_int(v) is None or v < lo:
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
        if as_int(unit) is None or not 0 <= unit < self.n_units:
            raise ValueError(f"unit must be an int in [0, {self.n_units}), not {unit!r}")
        return unit

    def _fence(self, need_takeover: bool = True) -> dict:
        status, info = launch_status(self.dir, self.launch)
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
            for regex, fmt, into in [(CLAIM_RE, claim_name, claims), (DONE_RE, done_name, dones)]:
                u = name_index(regex, f, fmt)
                if u is not None:
                    if u >= self.n_units:
                        raise ValueError(
                            f"{self.dir / f} names unit {u}, but the unit plan has "
                            f"{self.n_units} units (0..{self.n_units - 1}): this ledger was "
                            "written for another plan (the corpus or the unit size changed); "
                            "re-cache into a new directory")
                    into[u] = f
            if TMP_RE.fullmatch(f):
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
            st, why = load_json(self.dir / f)
            if st == "bad":
                aside = self.dir / f"{f}.corrupt-{self.launch:06d}"
                os.replace(self.dir / f, aside)
                self.log(f"[ledger] {self.dir / f} is unreadable ({why}); moved to {aside.name}"
                         f" and unit {u} will be cached again")
                taken.add(u)
        ended: dict[int, bool] = {}

        def has_ended(m: int) -> bool:
            if m not in ended:
                status, _ = launch_status(self.dir, m)
                ended[m] = status in ENDED or status in ("missing", "unreadable")
            return ended[m]

        for u, f in sorted(claims.items()):
            if u in dones and u not in taken:
                continue  # done: the claim stays
            st, c = load_json(self.dir / f)
            if st == "missing":
                continue
            owner = as_int(c.get("launch")) if st == "ok" else None
            if owner == self.launch:
                continue  # never take over the current launch's claims
            if owner is not None and not has_ended(owner):
                status, info = launch_status(self.dir, owner)
                raise ValueError(f"{self.dir / f}: unit {u} is claimed by "
                                 f"{describe_launch(owner, info)}, which has not ended; launch "
                                 f"{self.launch} did not find it dead, so it cannot take its "
                                 "claims over (was begin_launch skipped?)")
            unlink_if_present(self.dir / f)
            taken.add(u)
        removed = 0
        for f in tmps:
            m = int(TMP_RE.fullmatch(f).group(1))
            if m != self.launch and (has_ended(m) if m < self.launch else
                                     launch_status(self.dir, m)[0] in ENDED):
                unlink_if_present(self.dir / f)
                removed += 1
        info = self._fence(need_takeover=False)
        replace_json(self.dir, launch_name(self.launch), self.launch,
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
        content = {"launch": self.launch, "rank": self.rank, "host": host_name(),
                   "pid": os.getpid(), "time": time.time()}
        tmp = None
        relisted = False
        try:
            while self._steps < self.n_units:
                u = (self._start + self._steps) % self.n_units
                self._steps += 1
                if u in self._skip or (only is not None and not only(u)):
                    continue
                if self._no_link:
                    if self._claim(u, content):
                        return u
                elif tmp is None:
                    tmp = write_tmp(self.dir, f"claim.r{self.rank:04d}", self.launch, content)
                if not self._no_link:
                    try:
                        if link_new(tmp, self.dir / claim_name(u)):
                            return u
                    except OSError as e:
                        if e.errno not in NO_LINK:
                            raise
                        self._no_link = True
                        self.log(f"[ledger] {self.dir}: hard links are not supported ({e}); "
                                 "claims use O_CREAT|O_EXCL")
                        if self._claim(u, content):
                            return u
                if not relisted:
                    # Another rank took u since our listing: it is walking into our stretch
                    # (or we into its). One fresh listing per call, not a failed link + stat
                    # for every unit taken since: at the end of a launch a rank would
                    # otherwise try every unit the other ranks took (tools/rehearse_ledger.py
                    # measured 99 failed links per unit at 100 ranks).
                    claims, dones, _ = self._files()
                    self._skip |= set(claims) | set(dones)
                    relisted = True
            return None
        finally:
            if tmp is not None:
                unlink_if_present(tmp)

    def _claim(self, u: int, content: dict) -> bool:
        """Claim by exclusive create (filesystems without hard links). A kill between the
        create and the write leaves a claim that does not parse: the current launch skips
        it, the next launch takes it over."""
        try:
            write_new(self.dir / claim_name(u), json.dumps(content).encode())
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
        st, c = load_json(self.dir / claim_name(u))
        if st != "ok" or c.get("launch") != self.launch or c.get("rank") != self.rank:
            held = "no claim" if st == "missing" else (f"an unreadable claim ({c})" if st == "bad"
                                                       else f"a claim of launch "
                                                       f"{c.get('launch')} rank {c.get('rank')}")
            raise ValueError(f"rank {self.rank} of launch {self.launch} cannot mark unit {u} "
                             f"done: {self.dir / claim_name(u)} holds {held}")
        if os.path.lexists(self.dir / done_name(u)):
            raise ValueError(f"unit {u} is already done ({self.dir / done_name(u)})")
        replace_json(self.dir, done_name(u), self.launch, full)

    def restore(self, unit: int, record: dict) -> None:
        """Rank 0, after take_over_stale and before any rank claims (protocol step 7): write
        `record` as the done record of `unit`, which has none. The record is the caller's
        rebuild of a lost one and keeps its own "launch" and "rank" (the launch that cached
        the unit, not this one)."""
        if self.rank != 0:
            raise ValueError(f"restore runs on rank 0 only, not on rank {self.rank}")
        u = self._unit(unit)
        if not isinstance(record, dict) or any(as_int(record.get(k)) is None
                                               for k in ("launch", "rank")):
            raise ValueError(f"unit {u}: a restored record must be a dict holding the int "
                             "launch and rank that cached the unit")
        json.dumps(record)  # not serialisable: raise before touching the ledger
        self._fence()
        if os.path.lexists(self.dir / done_name(u)):
            raise ValueError(f"unit {u} is already done ({self.dir / done_name(u)})")
        replace_json(self.dir, done_name(u), self.launch, record)

    def _load_all(self, files: dict[int, str]) -> dict[int, tuple[str, Any]]:
        """`{unit: load_json(file)}` in unit order, leaving out files gone since the listing."""
        loaded = ((u, load_json(self.dir / f)) for u, f in sorted(files.items()))
        return {u: got for u, got in loaded if got[0] != "missing"}

    def done(self) -> dict[int, dict]:
        """Every unit's record (units whose record exists and parses)."""
        _, dones, _ = self._files()
        return {u: rec for u, (st, rec) in self._load_all(dones).items() if st == "ok"}

    def claims(self) -> dict[int, dict]:
        """Every claim; an unreadable one as {"launch": None, "unreadable": reason}."""
        claims, _, _ = self._files()
        return {u: c if st == "ok" else {"launch": None, "unreadable": c}
                for u, (st, c) in self._load_all(claims).items()}
