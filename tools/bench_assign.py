"""Dynamic unit claiming vs a static split, with one of 4 ranks slowed down.

    python tools/bench_assign.py                 # 4 ranks, rank 1 slowed, 3 interleaved repeats
    python tools/bench_assign.py --ranks 4 --slow-rank 1 --slow-s 0.03 --repeats 3

The cache stage's ranks claim work units from the ledger (pipeline.stage1_cache.ledger), so a fast rank
takes more units. The static split gives unit u to rank u % world (the stage's test hook
`Hooks.static_units`, the assignment of a fixed rank-to-data mapping). One rank is slowed by
the hook `Hooks.after_batch`: S seconds of sleep after each of its teacher batches, which
makes it about 4x slower per unit at the defaults (a node with a slower GPU, a noisy
neighbour). The hooks reach the ranks as in the tests (tests/hooks: SAMPLEDKD_TEST_STATIC_UNITS=1
and SAMPLEDKD_TEST_SLOW_RANK="R:S", read by its sitecustomize, never by the stage). Both
modes cache the same units of the same tiny-teacher corpus with
`mpiexec -n RANKS python -m pipeline.cache`; runs are interleaved (dynamic, static, dynamic,
...) so drift hits both alike. Reported: the stage's loop wall time (manifest wall_time_s,
max over ranks), the units and windows each rank cached, and the ratio static/dynamic; every
run's records are compared key by key (the assignment must not change a byte).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))      # tests.hooks: how the hooks reach the ranks

from tests.hooks import hook_env  # noqa: E402

console = Console()
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "distillation", "answer", "question", "because"]


def digests(out: Path) -> dict[str, str]:
    m = json.loads((out / "manifest.json").read_text())
    d = {}
    for s in m["shards"]:
        with tarfile.open(out / s["file"]) as tf:
            for i in tf:
                d[i.name] = hashlib.sha256(tf.extractfile(i).read()).hexdigest()
    return d


def run(mode: str, args, teacher: Path, data: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = hook_env(os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                 "TOKENIZERS_PARALLELISM": "false",
                                 "SAMPLEDKD_TEST_SLOW_RANK": f"{args.slow_rank}:{args.slow_s}",
                                 "SAMPLEDKD_TEST_STATIC_UNITS": "1" if mode == "static" else "0"})
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(args.ranks), sys.executable, "-m", "pipeline.cache",
           "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--seq-len",
           str(args.seq_len), "--unit-bytes", str(args.unit_bytes), "--shard-samples", "8",
           "--batch-size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    (ranks,) = m["launches"].values()
    return {"wall": m["wall_time_s"], "units": {int(r): v["units"] for r, v in ranks.items()},
            "windows": {int(r): v["windows"] for r, v in ranks.items()}, "n_units": len(m["units"]),
            "digests": digests(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--slow-rank", type=int, default=1)
    ap.add_argument("--slow-s", type=float, default=0.03,
                    help="sleep after each batch (window) of the slow rank (0.03 s: ~4x slower here)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--docs", type=int, default=1920)
    ap.add_argument("--unit-bytes", type=int, default=3000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from pipeline.demo.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench_assign-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher = build_tiny_model(work / "teacher", arch="llama", hidden=64, layers=2)
        rng = np.random.default_rng(0)
        data = work / "corpus.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(20, 80))))})
                                + "\n" for _ in range(args.docs)))
        console.print(f"machine: {os.cpu_count()} cores visible, load {os.getloadavg()[0]:.1f}; "
                      f"{args.ranks} ranks, rank {args.slow_rank} sleeps {args.slow_s} s per batch")
        res: dict[str, list[dict]] = {"dynamic": [], "static": []}
        for i in range(args.repeats):
            for mode in ("dynamic", "static"):
                r = run(mode, args, teacher, data, work / f"{mode}-{i}")
                res[mode].append(r)
                console.print(f"  repeat {i} {mode}: loop {r['wall']:.1f} s, units per rank "
                              f"{[r['units'].get(k, 0) for k in range(args.ranks)]}, load "
                              f"{os.getloadavg()[0]:.1f}", style="dim")
        same = len({json.dumps(r["digests"], sort_keys=True) for rs in res.values() for r in rs}) == 1
        t = Table(title=f"cache stage, {args.ranks} ranks, rank {args.slow_rank} slowed, "
                        f"{res['dynamic'][0]['n_units']} units, median of {args.repeats}")
        for c in ("assignment", "loop s (median)", "units per rank (last run)",
                  "windows per rank (last run)", "vs dynamic"):
            t.add_column(c, justify="right")
        dyn = statistics.median(r["wall"] for r in res["dynamic"])
        for mode, rs in res.items():
            wall = statistics.median(r["wall"] for r in rs)
            last = rs[-1]
            t.add_row(mode, f"{wall:.1f}", str([last["units"].get(k, 0) for k in range(args.ranks)]),
                      str([last["windows"].get(k, 0) for k in range(args.ranks)]), f"{wall / dyn:.2f}x")
        console.print(t)
        # Every rank claims until nothing is left, so in the dynamic runs each rank works about
        # the whole loop: its windows are its speed. Fast ranks' mean / the slow rank's.
        slow = [r["windows"].get(args.slow_rank, 0) for r in res["dynamic"]]
        fast = [statistics.mean(v for k, v in r["windows"].items() if k != args.slow_rank)
                for r in res["dynamic"]]
        console.print(f"measured slowdown of rank {args.slow_rank} (dynamic runs: fast ranks' "
                      f"windows / its windows): {statistics.median(f / max(s, 1) for f, s in zip(fast, slow)):.1f}x")
        console.print(f"records identical in every run (dynamic and static): {same}")


if __name__ == "__main__":
    main()
