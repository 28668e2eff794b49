"""The checkpoint protocol of stage 2: what a checkpoint holds, how it is written, resumed.

    RUN/ckpt/latest                 the tag of the newest COMPLETE checkpoint (atomic rename)
    RUN/ckpt/step00000040/          DeepSpeed's files (model and optimizer shards, scheduler)
        sampledkd_meta.json         step, data position, world size, cache identity, config
        rank0000_state.pt           per rank: selection state, torch/numpy/python RNG states
        hf_config/                  the student's config, generation config, tokenizer

Crash safety (kill -9 at any moment): DeepSpeed's own `latest` is written by rank 0 before
its final barrier, i.e. possibly before the other ranks' shards and before our files exist.
So DeepSpeed does not write it; after a barrier that follows every file of the tag, rank 0
replaces `latest` atomically (temp file + rename). `latest` only ever names a complete
checkpoint.

Resume: the checkpoint's config is compared with the run's (`config_diff`): every setting
outside `RESUMABLE` must match, as must the world size and the cache's identity (same
`--cache` path, other contents = other targets). Metrics records after the checkpoint's
step are dropped (`truncate_metrics`): they were lost with the crash and will be recomputed.
Nothing is unpickled: rank states load with `weights_only=True`, DeepSpeed's files under
`refuse_unsafe`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.distributed import log
from pipeline.safe_load import refuse_unsafe

META = "sampledkd_meta.json"
LATEST = "latest"
# Settings that may differ between a checkpoint and a resumed run (`out`: a run directory
# may be moved or copied; the checkpoint is wherever it is found).
RESUMABLE = frozenset({"steps", "resume", "checkpoint_every", "log_every", "log_all_ranks",
                       "export", "out", "tensorboard", "wandb_project"})


@dataclass
class DataPosition:
    """Where the training loop stands: optimizer steps done, epoch, micro-batches of the
    epoch consumed. The loop owns it; checkpoints store it."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str:
    latest = Path(ckpt_dir) / LATEST
    if not latest.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no 'latest' file; not a DeepSpeed checkpoint directory "
                                "(expected RUN_DIR/ckpt written by pipeline.distill)")
    return latest.read_text().strip()


def rng_state() -> dict:
    """torch, numpy and python RNG states as tensors and JSON strings (loadable with
    `weights_only=True`)."""
    np_state = np.random.get_state()
    return {"torch_rng": torch.get_rng_state(),
            "numpy_rng": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
            "python_rng": json.dumps(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    name, keys, *rest = json.loads(state["numpy_rng"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = json.loads(state["python_rng"])
    random.setstate((version, tuple(internal), gauss))


def config_diff(meta: dict, config: dict, world: int, identity: str | None, cache: str,
                defaults: dict | None = None) -> list[str]:
    """Why a checkpoint with `meta` cannot be resumed by a run with this flat `config`,
    `world` size and cache `identity` (empty: it can). A setting the checkpoint does not
    record (added by a later version) counts as its value in `defaults`."""
    old = {**(defaults or {}), **meta["config"]}
    diffs = [f"--{k.replace('_', '-')}: checkpoint {old.get(k)!r}, now {v!r}"
             for k, v in config.items() if k not in RESUMABLE and old.get(k) != v]
    if meta["world_size"] != world:
        diffs.append(f"world size: checkpoint {meta['world_size']}, now {world}")
    if meta.get("cache_identity") is None:
        log(f"--resume: the checkpoint records no cache identity (written by an older version): "
            f"cannot check that --cache {cache} is the cache it trained on")
    elif meta["cache_identity"] != identity:
        diffs.append(f"--cache {cache}: the checkpoint trained on a cache with identity "
                     f"{meta['cache_identity'][:16]}, this directory now holds {str(identity)[:16]} "
                     "(re-cached or repaired since: its targets differ)")
    return diffs


class Checkpointer:
    """Writes and reads RUN/ckpt for one rank of a DeepSpeed job (collective calls)."""

    def __init__(self, out: Path, engine, comm, rank: int, world: int):
        self.dir = Path(out) / "ckpt"
        self.engine, self.comm, self.rank, self.world = engine, comm, rank, world
        self.saved_step: int | None = None

    def save(self, pos: DataPosition, rank_state: dict, meta: dict, hf_parts=()) -> None:
        """Write ckpt/step{N} on every rank, then point ckpt/latest at it.

        rank_state: this rank's tensors and JSON strings (RNG states are added); meta: rank
        0's JSON record (step and position are added); hf_parts: objects with
        `save_pretrained` (config, generation config, tokenizer) for hf_config/.
        """
        if self.saved_step == pos.step:
            return  # already on disk (e.g. a finished run resumed): never rewrite `latest`'s tag
        tag = tag_of(pos.step)
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=asdict(pos),
                                    save_latest=False)
        d = self.dir / tag
        torch.save({**rank_state, **rng_state()}, d / f"rank{self.rank:04d}_state.pt")
        if self.rank == 0:
            record = {**asdict(pos), "world_size": self.world, **meta}
            (d / META).write_text(json.dumps(record, indent=1))
            for part in hf_parts:
                part.save_pretrained(d / "hf_config")
        self.comm.barrier()                 # every rank's files of `tag` are complete
        if self.rank == 0:
            tmp = self.dir / (LATEST + ".tmp")
            tmp.write_text(tag)
            os.replace(tmp, self.dir / LATEST)
        self.comm.barrier()
        self.saved_step = pos.step
        log(f"checkpoint {d}")

    def resume(self, config: dict, identity: str | None, cache: str,
               defaults: dict | None = None) -> tuple[DataPosition, dict] | None:
        """Load the latest checkpoint into the engine: (data position, this rank's state),
        RNG states restored; None when there is none. Refuses one written by another
        configuration (`config_diff`), naming every difference."""
        if not (self.dir / LATEST).exists():
            log(f"--resume: no checkpoint in {self.dir}; starting fresh")
            return None
        tag = latest_tag(self.dir)
        meta = json.loads((self.dir / tag / META).read_text())
        diffs = config_diff(meta, config, self.world, identity, cache, defaults)
        if diffs:
            raise ValueError(f"{self.dir / tag} was written by another configuration:\n  "
                             + "\n  ".join(diffs) + "\nUse a new --out, or the same settings.")
        with refuse_unsafe(self.dir / tag, "checkpoint"):
            _, client = self.engine.load_checkpoint(str(self.dir), tag=tag)
        pos = DataPosition(client["step"], client["epoch"], client["batch_in_epoch"])
        self.saved_step = pos.step
        rs_path = self.dir / tag / f"rank{self.rank:04d}_state.pt"
        with refuse_unsafe(rs_path, "rank state"):
            state = torch.load(rs_path, weights_only=True)
        set_rng_state(state)
        log(f"resumed from {self.dir / tag} at step {pos.step}")
        return pos, state


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of `path` (JSONL) with `"step" <= step`; atomic rewrite."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
