"""Fake stage 2: join the torchrun world over gloo; with FAKE_WAIT_USR1=1 the first run
waits for SIGUSR1 (as a preempted trainer would) and 'checkpoints' on it."""

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline._fake import fail_if_asked, flag, record

if sys.argv[-1:] == ["--check"]:       # distill.sh's preflight: one process, before torchrun
    sys.exit(0)
out = Path(flag("--out"))
if not (Path(flag("--cache")) / "rank0.json").exists():
    sys.exit("fake distill: the cache stage has not run")
got: list[int] = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([rank])
dist.all_reduce(total)  # sum of ranks: world * (world - 1) / 2
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
record(out / f"start{restart}-rank{rank}.json", rank=rank, world=world, rank_sum=int(total))
dist.destroy_process_group()

if os.environ.get("FAKE_WAIT_USR1") == "1" and restart == 0:
    deadline = time.monotonic() + 120
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    record(out / f"usr1-rank{rank}.json", signals=len(got))
    sys.exit(0 if got else 5)
fail_if_asked("distill")
(out / "export").mkdir(parents=True, exist_ok=True)
record(out / f"done-rank{rank}.json")
