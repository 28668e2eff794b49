"""Test driver of tests/test_checkpoint_fallback.py: one torchrun launch trains a run, copies
and damages it, and resumes every copy, so process start-ups are paid once.

    torchrun --nproc_per_node 2 tests/drivers/checkpoint_fallback.py SPEC.json

SPEC: {"jobs": [...], "result": path}. Jobs, in order:
  {"name": N, "argv": [...]}      `pipeline.stage2_distill.trainer.run` on these flags; a ValueError is
                                  recorded, not raised; so is the step `Trainer.resume` returned
  {"copy": [src, dst]}            rank 0 copies a directory
  {"truncate": [path, n]}         rank 0 keeps the first n bytes of a file
  {"write": [path, text]}         rank 0 replaces a file's contents
  {"unlink_glob": [dir, pattern]} rank 0 deletes dir's files matching pattern (recursively)
Every file job ends with a barrier. Result (rank 0): [{"name", "ok", "error"?, "resumed"?}].
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

import pipeline.stage2_distill.trainer as D
from pipeline.common import config as C


def recording_trainer(facts: dict):
    class Recording(D.Trainer):
        def resume(self):
            pos = super().resume()
            facts["resumed"] = None if pos is None else pos.step
            return pos

    return Recording


def file_job(job: dict) -> None:
    if dist.get_rank() == 0:
        if "copy" in job:
            shutil.copytree(*job["copy"])
        if "truncate" in job:
            path, n = job["truncate"]
            os.truncate(path, n)
        if "write" in job:
            path, text = job["write"]
            Path(path).write_text(text)
        if "unlink_glob" in job:
            root, pattern = job["unlink_glob"]
            for p in Path(root).rglob(pattern):
                p.unlink()
    dist.barrier()


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = []
    for job in spec["jobs"]:
        if "argv" not in job:
            file_job(job)
            continue
        facts: dict = {}
        rec = {"name": job["name"]}
        try:
            D.run(C.parse(D.DistillConfig, job["argv"]), trainer_cls=recording_trainer(facts))
            rec["ok"] = True
        except ValueError as e:
            rec.update(ok=False, error=str(e))
        results.append({**rec, **facts})
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
