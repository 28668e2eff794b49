"""Loss recipes side by side: same cache, student, steps and windows; held-out perplexity.

    python tools/sweep_recipe.py --cache runs/demo/cache [--student assets_cache/student-L0-1-2-27-28-29] \
        [--steps 48] [--lr 1e-3] [--nproc 2] [--seeds 0 1 2] [--out runs/sweep] [--run NAME="FLAGS" ...]

Each run is `torchrun --nproc_per_node N -m pipeline.distill` (ZeRO-3, the flags shared by
all runs plus its own), then `python -m pipeline.evaluate --heldout` on its export (the
first --windows held-out windows, KL to --teacher). Runs happen one after the other, so
their train times are comparable; the table prints perplexity, KL and train seconds. Every
run is repeated for each --seeds value (the data order and the sampling draws), because at
demo scale two seeds of one recipe differ more than two recipes do: compare within a seed.
Without --run, every recipe of pipeline/stage2_distill/recipes/ but dense-kd (which needs the teacher online).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The recipes of pipeline/stage2_distill/recipes/ by name: each run is `--recipe NAME` (no recipe is
# written twice); --run NAME="FLAGS" adds other runs (FLAGS may start with --recipe).
sys.path.insert(0, str(REPO))
from pipeline.stage2_distill import recipes  # noqa: E402

DEFAULT_RUNS = {name: f"--recipe {name}" for name in recipes.names() if name != "dense-kd"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    assets = Path(os.environ.get("SAMPLEDKD_ASSETS", REPO / "assets_cache"))
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--student", type=Path, default=assets / "student-L0-1-2-27-28-29")
    ap.add_argument("--teacher", type=Path, default=assets / "teacher")
    ap.add_argument("--heldout", type=Path, default=assets / "corpus" / "heldout.jsonl")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "sweep")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="repeat every run per seed")
    ap.add_argument("--seq-len", type=int, default=256, help="held-out window length")
    ap.add_argument("--windows", type=int, default=24, help="held-out windows")
    ap.add_argument("--run", action="append", default=[], metavar='NAME="FLAGS"',
                    help="a named run: pipeline.distill flags added to the shared ones")
    args = ap.parse_args()
    runs = dict(r.split("=", 1) for r in args.run) if args.run else DEFAULT_RUNS
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    shared = ["--student", str(args.student), "--cache", str(args.cache), "--steps", str(args.steps),
              "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--warmup-steps", "4"]
    rows = []
    jobs = [(name, flags, seed) for seed in args.seeds for name, flags in runs.items()]
    for i, (name, flags, seed) in enumerate(jobs):
        out = args.out / f"run{i}"
        if out.exists():
            sys.exit(f"sweep_recipe: {out} exists; use another --out or delete it")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.nproc), "-m", "pipeline.distill", *shared, "--out", str(out),
               *shlex.split(flags), "--seed", str(seed)]
        print(f"=== {name}, seed {seed}\n$ {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        train_s = time.perf_counter() - t0
        ev = out / "eval"
        subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--model", str(out / "export"),
                        "--out", str(ev), "--heldout", str(args.heldout), "--teacher", str(args.teacher),
                        "--seq-len", str(args.seq_len), "--heldout-max-windows", str(args.windows)],
                       cwd=REPO, env={k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}, check=True)
        h = json.loads((ev / "results.json").read_text())["heldout"]
        steps = [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(steps[2:] or steps)     # the first steps pay warm-up costs
        rows.append((name, seed, flags, h["perplexity"], h["kl_to_teacher"], train_s, step_s))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.steps} steps x {args.micro_batch} x {args.nproc} windows, lr {args.lr}; "
                        f"held-out {args.windows} x {args.seq_len} tokens")
    for col in ("run", "seed", "perplexity", "vs no_kd", "KL(teacher || student)", "train s",
                "median step s", "flags"):
        table.add_column(col, justify="left" if col in ("run", "flags") else "right")
    base = {seed: ppl for name, seed, _, ppl, *_ in rows if "--recipe no-kd" in runs[name]}
    for name, seed, flags, ppl, kl, dt, step_s in rows:
        rel = f"{ppl / base[seed] - 1:+.1%}" if seed in base else "-"
        table.add_row(name, str(seed), f"{ppl:.1f}", rel, f"{kl:.3f}", f"{dt:.0f}", f"{step_s:.2f}", flags)
    Console().print(table)


if __name__ == "__main__":
    main()
