"""`python -m pipeline.distill ARGV` with every optimizer step delayed by $THROTTLE_S seconds,
so a test has room to signal or kill a run mid-way; the numerics are untouched.

    torchrun --nproc_per_node 2 tests/drivers/throttled_distill.py ARGV...
"""

from __future__ import annotations

import os
import sys
import time

import pipeline.stage2_distill.trainer as D


class Throttled(D.Trainer):
    def train_step(self, batches, step, epoch=0):
        time.sleep(float(os.environ.get("THROTTLE_S", "0")))
        return super().train_step(batches, step, epoch)


if __name__ == "__main__":
    D.main(sys.argv[1:], trainer_cls=Throttled)
