"""Test driver: one torchrun launch runs a list of jobs, so process start-ups are paid once.

    torchrun --nproc_per_node N tests/drivers/distill_jobs.py SPEC.json

SPEC: {"jobs": [...], "result": path (optional), "probe": [[token ids]] (optional)}. Jobs, in
order; each file job is rank 0's, then a barrier:
  {"name": N, "argv": [...]}      `pipeline.stage2_distill.trainer.run` on these flags (= `python
                                  -m pipeline.distill ARGV`); a ValueError is recorded, not raised
  {"rewind": [src, dst, tag]}     copy run directory src to dst, keep checkpoints up to tag
  {"copy": [src, dst]}            copy a directory
  {"replace": [src, dst]}         dst's contents replaced by src's (same path, other contents)
  {"poison": [ckpt, marker]}      a pickle that would create `marker` if a load ran it, in
                                  every rank's optimizer file of the latest checkpoint
  {"truncate": [path, n]}         keep the first n bytes of a file (a write cut short)
  {"write": [path, text]}         replace a file's contents
  {"unlink_glob": [dir, pattern]} delete dir's files matching pattern (recursively)
Each run records the facts the CLI cannot give through a `Trainer` subclass (no patching): the
step `Trainer.resume` returned ("resumed", when it returned); with "probe", ZeRO-3's partition
of every parameter after setup, and the live engine's logits on the probe input after training
(OUT/engine_logits.safetensors).
Result (rank 0): [{"name", "ok", "error"?, "resumed"?, "partition"?}, ...].
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import pipeline.stage2_distill.trainer as D
from pipeline.common import config as C


class Evil:
    """Unpickling calls open(path, "w"): the file appears if a load runs the pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def recording_trainer(probe, facts: dict):
    """A `Trainer` that records into `facts` the step it resumed from and, with a `probe`
    (token ids), its ZeRO-3 partition and the live engine's logits on the probe."""
    class Recording(D.Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            if probe is not None:
                facts["partition"] = [{"name": n, "ds_numel": int(p.ds_numel),
                                       "local": int(p.ds_tensor.numel()), "data": int(p.data.numel()),
                                       "status": p.ds_status.name}
                                      for n, p in self.engine.module.named_parameters()]

        def resume(self):
            pos = super().resume()
            facts["resumed"] = None if pos is None else pos.step
            return pos

        def export(self):
            path = super().export()
            if probe is None:
                return path
            ids = torch.tensor(probe, dtype=torch.long)
            with torch.no_grad():  # collective on every rank: ZeRO-3 gathers each layer's weights
                logits = self.engine.module(input_ids=ids).logits.float().contiguous()
            if self.rank == 0:
                from safetensors.torch import save_file
                save_file({"input_ids": ids, "logits": logits},
                          str(Path(self.cfg.out) / "engine_logits.safetensors"))
            return path

    return Recording


def file_job(job: dict) -> None:
    """The rank-0 file operations of one job, then a barrier."""
    if dist.get_rank() == 0:
        if "rewind" in job:       # copy a finished run; point ckpt/latest at an earlier checkpoint
            src, dst, tag = job["rewind"]
            shutil.copytree(src, dst)
            for d in (Path(dst) / "ckpt").glob("step*"):
                if d.name > tag:
                    shutil.rmtree(d)
            (Path(dst) / "ckpt" / "latest").write_text(tag)
        if "copy" in job:
            shutil.copytree(*job["copy"])
        if "replace" in job:
            src, dst = job["replace"]
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        if "poison" in job:
            from pipeline.common.safe_load import safe_globals

            ckpt, marker = map(Path, job["poison"])
            # every rank's optimizer file: each rank loads its own (one rank failing alone
            # would leave the other in a collective of this one-process driver)
            tag_dir = ckpt / (ckpt / "latest").read_text().strip()
            for target in tag_dir.glob("*_optim_states.pt"):
                with torch.serialization.safe_globals(safe_globals()):
                    sd = torch.load(target, weights_only=True)
                sd["evil"] = Evil(str(marker))
                torch.save(sd, target)
            # and its file records: they catch accidents (a truncated file), not tampering
            from pipeline.stage2_distill.checkpoint import write_file_record

            world = len(list(tag_dir.glob("rank*_files.json")))
            for r in range(world):
                write_file_record(tag_dir, r, world)
        if "truncate" in job:     # a file cut short, as a job killed while writing leaves it
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
    probe = spec.get("probe")
    results = []
    for job in spec["jobs"]:
        if "argv" not in job:
            file_job(job)
            continue
        facts: dict = {} if probe is None else {"partition": None}
        rec = {"name": job.get("name")}
        try:
            D.run(C.parse(D.DistillConfig, job["argv"]), trainer_cls=recording_trainer(probe, facts))
            rec["ok"] = True
        except ValueError as e:
            rec.update(ok=False, error=str(e))
        results.append({**rec, **facts})
    if dist.get_rank() == 0 and spec.get("result"):
        Path(spec["result"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
