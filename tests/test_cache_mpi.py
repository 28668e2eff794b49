"""Stage 1 under mpiexec (the venv's MPICH, up to 16 ranks on one machine; marked `dist`):
16 ranks cache every window once, equal to one rank; ranks killed with SIGKILL and restarted
with other rank counts finish every window exactly once (also `slow`); a slowed rank caches
fewer units; each rank reads only its units; two launches at once; a failing rank aborts the
job; an MPI_Init that never returns ends the rank (one process, not `dist`). Checked against
tests/cache_stage.py's independent references and its one-rank reference cache.

Runs that must last long enough to be killed or raced use the stage's test hook
SAMPLEDKD_TEST_SLOW_RANK ("R:SECONDS" or "*:SECONDS", a sleep after every batch), which
`mpi_env` hands to the ranks (tests/mpi.py, tests/hooks).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_stage import env, ref1  # noqa: F401  (fixtures)
from cache_stage import (INSPECT, REPO, SHARD_RE, cache_args, check_cache, check_rank_counts,
                         done_records, file_state, launch_info, main_args, manifest_of, mpi_env,
                         parse_key, run_mpi, same_plan, start_mpi,
                         stop_group, write_corpus)


# The fixtures `env` (the tiny teacher and corpus) and `ref1` (the one-rank reference cache)
# come from cache_stage, built once per session.


# -- 16 ranks on one machine -----------------------------------------------------------------------

@pytest.mark.dist
def test_sixteen_ranks_every_window_once_and_equal_to_one_rank(env, ref1):
    out = env["root"] / "sixteen"
    proc = run_mpi(main_args(env, out, "--batch-size", "2"), n=16, timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:]
    same_plan(out, ref1)
    m = manifest_of(out)
    check_cache(out, ref1["expected"], reference=ref1["samples"], model=env["model"],
                recompute_every=9)
    assert m["world_size"] == 16 and len(m["this_launch"]) == 16
    ranks = {int(r) for r in m["launches"]["1"]}
    assert ranks <= set(range(16)) and len(ranks) >= 8, ranks
    n_units = len(ref1["plan"]["units"])
    assert sum(c["units"] for c in m["launches"]["1"].values()) == n_units
    check_rank_counts(m, ref1["expected"])
    # every unit is claimed exactly once, by the rank whose done record it has
    claims = {int(f.name[5:12]): json.loads(f.read_text())
              for f in (out / "ledger").glob("unit-*.claim")}
    assert sorted(claims) == list(range(n_units))
    for x in m["units"]:
        assert (claims[x["unit"]]["launch"], claims[x["unit"]]["rank"]) == (1, x["rank"])


# -- kill -9 3 of 8 ranks, restart with 5 (killed again), finish with 11 ------------------------

def _children(pid: int) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    return children


def _rank_pid(root_pid: int, rank: int) -> int | None:
    """PID of the `pipeline.cache` process with PMI_RANK=rank below `root_pid` (our mpiexec)."""
    children = _children(root_pid)
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            env_vars = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            cmd, env_vars = [], []
        if b"pipeline.cache" in cmd and f"PMI_RANK={rank}".encode() in env_vars:
            return pid
        stack += children.get(pid, [])
    return None


def _wait_ranks_gone(out: Path, timeout: float = 60) -> None:
    """Until no process has `out` on its command line (every rank of the job is dead)."""
    needle = str(out).encode()
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if needle in (d / "cmdline").read_bytes():
                        alive.append(int(d.name))
                except OSError:
                    pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"ranks still alive: {alive}"
        time.sleep(0.1)


def _kill_ranks_when(out: Path, args: list[str], n: int, ranks: list[int], at_done: int,
                     slow: str) -> tuple[str, dict[int, dict], dict, set[int]]:
    """Start an n-rank launch slowed by `slow`, SIGKILL `ranks` once `at_done` units are
    done; mpiexec then ends the rest. Returns (log, done records, tar states, units claimed
    and not done) once every rank is dead."""
    proc = start_mpi(args, n, env=mpi_env(SAMPLEDKD_TEST_SLOW_RANK=slow),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while len(list((out / "ledger").glob("unit-*.done.json"))) < at_done:
            assert proc.poll() is None, f"ended before {at_done} units were done:\n" + \
                proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, f"{at_done} units not done in 300 s"
            time.sleep(0.05)
        pids = [_rank_pid(proc.pid, r) for r in ranks]
        assert None not in pids, f"rank processes not found: {dict(zip(ranks, pids))}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        log = proc.communicate(timeout=120)[0]
    finally:
        stop_group(proc)
    _wait_ranks_gone(out)
    assert proc.returncode != 0, "mpiexec reported success after ranks were killed:\n" + log
    assert not (out / "manifest.json").exists()
    done = done_records(out)
    claimed = {int(f.name[5:12]) for f in (out / "ledger").glob("unit-*.claim")} - set(done)
    return log, done, file_state(out, "*.tar"), claimed


@pytest.mark.dist
@pytest.mark.slow
def test_kill_3_of_8_ranks_restart_with_5_killed_again_then_11_finish_exactly_once(env, ref1,
                                                                                  tmp_path):
    """Launch 1 (8 ranks, every window slowed 0.2 s) loses ranks 0, 3, 6 to SIGKILL once 10
    units are done, and mpiexec ends the rest; launch 2 (5 ranks) waits out the 1 s lease,
    takes over launch 1's claims and loses ranks 1 and 3 once 8 more units are done; launch
    3 (11 ranks) finishes. Every shard of a unit done before a kill is the same file
    afterwards (inode, mtime, sha256); finished shards of interrupted units are deleted by
    the next launch and their windows recomputed byte for byte under the new launch's name;
    every window once, equal to the 1-rank records; each unit cached by exactly one launch
    (one claim, one done record, shards named for it)."""
    out = tmp_path / "killed"
    args = main_args(env, out, "--lease-s", "1", "--batch-size", "1")
    N = len(ref1["plan"]["units"])

    log1, done1, tars1, claimed1 = _kill_ranks_when(out, args, 8, [0, 3, 6], 10, "*:0.2")
    assert 10 <= len(done1) < N and all(r["launch"] == 1 for r in done1.values())
    log2, done2, tars2, claimed2 = _kill_ranks_when(out, args, 5, [1, 3], len(done1) + 8,
                                                    "*:0.2")
    assert len(done1) + 8 <= len(done2) < N
    # launch 2 waited out launch 1's lease, declared it dead and took over its claims
    assert f"took over {len(claimed1)} unit(s)" in log2, log2[-5000:]
    assert launch_info(out, 1)["status"] == "dead"
    for u, rec in done1.items():
        assert done2[u] == rec, f"unit {u}'s done record changed"
    assert {rec["launch"] for u, rec in done2.items() if u not in done1} == {2}

    # launch 2 kept launch 1's finished shards of done units (inode, mtime, sha256) and
    # deleted those of units launch 1 had not finished
    for name, state in tars1.items():
        if int(SHARD_RE.fullmatch(name).group(1)) in done1:
            assert tars2.get(name) == state, f"{name} was rewritten by launch 2"
        else:
            assert name not in tars2, f"{name} of an unfinished unit was kept by launch 2"

    final = run_mpi(args, n=11, timeout=400)
    assert final.returncode == 0, final.stdout[-5000:]
    assert f"took over {len(claimed2)} unit(s)" in final.stdout, final.stdout[-5000:]
    same_plan(out, ref1)
    after = file_state(out, "*.tar")
    partial = []
    for tars, done in ((tars1, done1), (tars2, done2)):
        for name, state in tars.items():
            if int(SHARD_RE.fullmatch(name).group(1)) in done:
                assert after.get(name) == state, f"{name} (finished before a kill) changed"
            else:
                partial.append(name)
                assert name not in after, f"{name} of an unfinished unit was kept"
    samples = check_cache(out, ref1["expected"], reference=ref1["samples"],
                          model=env["model"], recompute_every=11)
    # Shards of units interrupted mid-way were deleted by the next launch; their windows
    # were recomputed byte for byte into shards named for a later launch.
    for name in partial:
        u, launch, _ = (int(x) for x in SHARD_RE.fullmatch(name).groups())
        later = {int(SHARD_RE.fullmatch(e["file"]).group(2)) for k, e in samples.items()
                 if parse_key(k)[0] == u}
        assert later and min(later) > launch, (name, later)
    m = manifest_of(out)
    # Exactly once: every unit cached by one launch, which wrote its shards; one claim per
    # unit naming that launch and rank; nothing recomputed that was done.
    owner = {x["unit"]: (x["launch"], x["rank"]) for x in m["units"]}
    for u in range(N):
        want = 1 if u in done1 else 2 if u in done2 else 3
        assert owner[u][0] == want, (u, owner[u])
    for s in m["shards"]:
        assert int(SHARD_RE.fullmatch(s["file"]).group(2)) == owner[s["unit"]][0]
    claims = {int(f.name[5:12]): json.loads(f.read_text())
              for f in (out / "ledger").glob("unit-*.claim")}
    assert {u: (c["launch"], c["rank"]) for u, c in claims.items()} == owner
    assert {int(r) for r in m["launches"].get("1", {})} <= set(range(8))
    assert {int(r) for r in m["launches"].get("2", {})} <= set(range(5))
    assert {int(r) for r in m["launches"]["3"]} <= set(range(11))
    assert sum(c["units"] for ranks in m["launches"].values() for c in ranks.values()) == N
    check_rank_counts(m, ref1["expected"])
    assert [launch_info(out, n)["status"] for n in (1, 2, 3)] == ["dead", "dead", "finished"]
    print(f"kill test: launch 1 did {len(done1)} units ({len(claimed1)} in flight), launch 2 "
          f"{len(done2) - len(done1)} ({len(claimed2)} in flight), launch 3 {N - len(done2)}; "
          f"{len(partial)} finished shard(s) of unfinished units recomputed")


# -- dynamic assignment and per-rank data cost ---------------------------------------------

@pytest.mark.dist
def test_slowed_rank_caches_fewer_units(env, ref1):
    """Rank 1 of 4 sleeps 0.5 s after every window: the three fast ranks claim more units
    (the manifest's per-rank unit counts); the records are still the 1-rank run's."""
    out = env["root"] / "slow-rank"
    proc = run_mpi(main_args(env, out, "--batch-size", "1"), n=4,
                   env=mpi_env(SAMPLEDKD_TEST_SLOW_RANK="1:0.5"))
    assert proc.returncode == 0, proc.stdout[-5000:]
    m = manifest_of(out)
    units = {r: m["launches"]["1"].get(str(r), {"units": 0})["units"] for r in range(4)}
    assert sum(units.values()) == len(ref1["plan"]["units"])
    assert units[1] < min(units[r] for r in (0, 2, 3)), units
    check_cache(out, ref1["expected"], reference=ref1["samples"])
    check_rank_counts(m, ref1["expected"])
    print(f"units per rank with rank 1 slowed: {units}")


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_units_about_one_over_world(env, ref1, world):
    """The manifest's per-rank documents, tokens and bytes are the sums over exactly the
    units that rank cached (from the per-unit reference: no rank read another unit), they
    add up to the corpus, and with equal speeds each rank's share of tokens is 1/world of
    the corpus within one unit's tokens (every rank sleeps the same 0.05 s per window, so
    time, not start-up order, decides the claims)."""
    out = env["root"] / f"share-{world}"
    proc = run_mpi(main_args(env, out, "--batch-size", "1"), n=world,
                   env=mpi_env(SAMPLEDKD_TEST_SLOW_RANK="*:0.05"))
    assert proc.returncode == 0, proc.stdout[-5000:]
    m = manifest_of(out)
    expected = ref1["expected"]
    check_rank_counts(m, expected)
    check_cache(out, expected, reference=ref1["samples"])
    per_rank = m["launches"]["1"]
    assert sorted(per_rank) == [str(r) for r in range(world)]
    total = sum(e["tokens"] for e in expected.values())
    biggest = max(e["tokens"] for e in expected.values())
    shares = {r: c["tokens"] for r, c in per_rank.items()}
    print(f"{world} ranks: tokens per rank {shares}, 1/world = {total / world:.0f}, largest "
          f"unit {biggest}")
    for r, tokens in shares.items():
        assert abs(tokens - total / world) <= biggest, (r, shares, total / world, biggest)
    # this launch's live counts (per rank, accumulated while caching) agree
    for c in m["this_launch"]:
        mine = per_rank[str(c["rank"])]
        assert (c["documents"], c["tokens"], c["bytes"]) == (mine["documents"], mine["tokens"],
                                                             mine["bytes"])


# -- two launches at once, a failing rank, a hung MPI_Init ---------------------------------------

@pytest.mark.dist
def test_two_launches_at_once_one_works_the_other_refuses_naming_it(env, ref1, tmp_path):
    """A job submitted twice: two 2-rank launches started together on one directory (lease
    2 s, each window slowed by 0.1 s so the working launch outlives the other's 3 s wait).
    One caches everything exactly once; the other refuses, naming the running launch, and
    touches nothing; every shard verifies and equals the 1-rank records."""
    out = tmp_path / "twice"
    args = main_args(env, out, "--lease-s", "2", "--batch-size", "1")
    env_slow = mpi_env(SAMPLEDKD_TEST_SLOW_RANK="*:0.1")
    procs = [start_mpi(args, 2, env=env_slow, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            stop_group(p)
    codes = [p.returncode for p in procs]
    assert sorted(c == 0 for c in codes) == [False, True], (codes, [x[-3000:] for x in logs])
    won, lost = (0, 1) if codes[0] == 0 else (1, 0)
    statuses = {n: launch_info(out, n) for n in (1, 2)}
    assert not (out / "ledger" / "launch-000003.json").exists()
    working = [n for n, i in statuses.items() if i["status"] == "finished"]
    refused = [n for n, i in statuses.items() if i["status"] == "refused"]
    assert len(working) == 1 and len(refused) == 1, statuses
    w, r = working[0], refused[0]
    text = logs[lost].replace("\n", " ")
    assert re.search(rf"launch {r} refused: launch {w} \(host [^,]+, pid {statuses[w]['pid']}, "
                     r"world size 2, status \w+\) is running on this cache directory", text), \
        logs[lost][-3000:]
    assert f"launch {w} (" in statuses[r]["reason"]
    # it refused after waiting 1.5 x lease (3 s) for launch w's heartbeat to stop, while w
    # was still working
    waited = statuses[r]["ended"] - statuses[r]["started"]
    assert 3.0 <= waited < 15, waited
    assert statuses[r]["ended"] < statuses[w]["ended"]
    margin = statuses[w]["ended"] - statuses[r]["ended"]
    print(f"launch {r} refused after {waited:.1f} s, {margin:.1f} s before launch {w} finished")
    m = manifest_of(out)
    assert list(m["launches"]) == [str(w)] and {x["launch"] for x in m["units"]} == {w}
    check_cache(out, ref1["expected"], reference=ref1["samples"])
    claims = [json.loads(f.read_text())["launch"] for f in (out / "ledger").glob("unit-*.claim")]
    assert len(claims) == len(ref1["plan"]["units"]) and set(claims) == {w}
    proc = subprocess.run([sys.executable, str(INSPECT), str(out), "--verify"],
                          capture_output=True, text=True, cwd=REPO, env=mpi_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.dist
def test_rank_failure_under_mpi_aborts_instead_of_hanging(env, tmp_path):
    """The corpus's last line has no text field: the rank that claims its unit fails while
    the other has finished its units and waits in the final gather (or, if rank 0 fails,
    rank 1 waits for it). The job must end with the error naming the line, not hang."""
    data = tmp_path / "corpus"
    write_corpus(data, {"a.jsonl": 20, "b.jsonl": 20}, seed=500)
    with open(data / "b.jsonl", "a") as f:
        f.write(json.dumps({"body": "no text field here"}) + "\n")
    out = tmp_path / "c"
    t0 = time.monotonic()
    proc = run_mpi(cache_args(env["teacher"], data, out, "--unit-bytes", "600"), timeout=240)
    assert proc.returncode != 0
    text = proc.stdout.replace("\n", " ")
    assert "has no field 'text'" in text and "b.jsonl" in text, proc.stdout[-3000:]
    errors = sorted((out / "errors").glob("rank*.txt"))
    assert len(errors) == 1 and "has no field 'text'" in errors[0].read_text()
    assert time.monotonic() - t0 < 200
    assert not (out / "manifest.json").exists()


_HANG_IN_MPI_INIT = """
import os, socket
a, b = socket.socketpair()          # a PMI server that never answers
os.set_inheritable(b.fileno(), True)
os.environ.update(PMI_FD=str(b.fileno()), PMI_RANK="0", PMI_SIZE="2")
from pipeline.common.distributed import init_distributed
init_distributed()
print("MPI_Init returned")
"""


def test_mpi_init_that_never_returns_exits_with_where_it_hung():
    """A pmi2 hang in MPI_Init (seen once on the two-node cluster) must end the rank, so
    srun --kill-on-bad-exit ends the step and slurm/cache.sh can launch it again."""
    env = dict(os.environ, SAMPLEDKD_MPI_INIT_TIMEOUT="2")
    env.pop("SLURM_NTASKS", None)
    r = subprocess.run([sys.executable, "-c", _HANG_IN_MPI_INIT], env=env, capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "MPI_Init returned" not in r.stdout
    assert "Timeout (0:00:02)!" in r.stderr and "init_distributed" in r.stderr, r.stderr[-2000:]
