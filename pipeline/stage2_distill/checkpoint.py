"""The checkpoint protocol of stage 2: what a checkpoint holds, how it is written, resumed.

    RUN/ckpt/latest                 the tag of the newest COMPLETE checkpoint (atomic rename)
    RUN/ckpt/step00000040/          DeepSpeed's files (model and optimizer shards, scheduler)
        sampledkd_meta.json         step, data position, world size, cache identity, config
        rank0000_state.pt           per rank: selection state, torch/numpy/python RNG states
        hf_config/                  the student's config, generation config, tokenizer
        rank0000_files.json         per rank: size and sha256 of the files that rank owns
    RUN/ckpt/set_aside/step00000040 a checkpoint a resumed run wrote again, kept unchanged

Crash safety (kill -9 at any moment): DeepSpeed's own `latest` is written by rank 0 before
its final barrier, i.e. possibly before the other ranks' shards and before our files exist.
So DeepSpeed does not write it; after a barrier that follows every file of the tag, each
rank hashes the files it owns (DeepSpeed's `zero_pp_rank_{r}_*` and our
`rank{r:04d}_state.pt` are rank r's, every other file rank 0's: each rank reads back what
it just wrote, from its own page cache) into its file record (atomic write); after a second
barrier rank 0 replaces `latest` atomically (temp file + rename). `latest` only ever names
a complete checkpoint whose every file is recorded.

Resume takes the newest checkpoint that verifies: `latest`'s tag, then every other
`step*` directory, newest first (`candidates`; a `latest` naming no directory is reported
as damage). A checkpoint verifies (`verify_checkpoint`) when its meta parses, every rank's
file record exists and every recorded file has its recorded size and sha256; rank r checks
record r, and the verdicts are all-gathered, so every rank takes the same decision. Each
skipped checkpoint is logged with its files and why; with none left every rank raises the
same ValueError. A damaged checkpoint is never deleted or written to: when the resumed run
reaches the step of a checkpoint newer than the resumed one (damaged, or of the lost
trajectory) it first moves that directory, as it is, to `set_aside/`. A checkpoint of a version before
file records (no record) is trusted when its meta parses, every rank's state file exists
and every `.pt` file ends with a complete zip directory (a truncated file does not).
Cost: the save reads back and hashes every byte it wrote, the resume every byte it loads
(sha256 at ~0.5-2 GB/s per core; each rank its own share: for an 8B student with Adam,
~128 GB in all, ~16 GB a rank on 8 ranks, ~10-30 s).

The chosen checkpoint's config is compared with the run's (`config_diff`): every setting
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
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.common.distributed import log
from pipeline.common.files import sha256_file, write_json_atomic
from pipeline.common.safe_load import refuse_unsafe

META = "sampledkd_meta.json"
LATEST = "latest"
RECORD = "rank{:04d}_files.json"           # RECORD.format(rank)
_RECORD_RE = re.compile(r"rank(\d{4})_files\.json")   # .match: also its temporary files
_STEP_RE = re.compile(r"step\d{8}")
# Which rank wrote (and so records) a file of a tag; any other file is rank 0's.
_OWNER_RE = re.compile(r"zero_pp_rank_(\d+)_|rank(\d{4})_state\.pt$")
SET_ASIDE = "set_aside"
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


def _owner(rel: str, world: int) -> int:
    """The rank that records file `rel` of a checkpoint: the rank its name says wrote it
    (DeepSpeed's `zero_pp_rank_{r}_*`, our `rank{r:04d}_state.pt`), else rank 0."""
    m = _OWNER_RE.search(Path(rel).name)
    return int(m.group(1) or m.group(2)) % world if m else 0


def _files(d: Path) -> list[str]:
    """Every file under checkpoint directory `d` but the file records (relative, sorted)."""
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                  if p.is_file() and not _RECORD_RE.match(p.name))


def write_file_record(d: Path, rank: int, world: int) -> None:
    """Write d/rank{r:04d}_files.json: size and sha256 of every file of checkpoint directory
    `d` that rank `rank` owns (`_owner`). Call when every file of `d` is complete. Reads
    each file once in 1 MiB blocks (sha256: ~0.5-2 GB/s a core)."""
    files = {rel: {"bytes": (d / rel).stat().st_size, "sha256": sha256_file(d / rel)}
             for rel in _files(d) if _owner(rel, world) == rank}
    write_json_atomic(d / RECORD.format(rank), {"rank": rank, "world_size": world, "files": files})


def _file_problem(d: Path, rel: str, want: dict) -> str | None:
    path = d / rel
    if not path.is_file():
        return f"{rel}: missing"
    try:
        size = path.stat().st_size
        got = sha256_file(path) if size == want["bytes"] else None
    except OSError as e:         # a rank that raised here would leave the others in a collective
        return f"{rel}: unreadable ({e.strerror})"
    if size != want["bytes"]:
        return f"{rel}: size {size}, recorded {want['bytes']}"
    if got != want["sha256"]:
        return f"{rel}: sha256 {got[:16]}.., recorded {want['sha256'][:16]}.."
    return None


@dataclass
class Verdict:
    """What `verify_checkpoint` found. problems: "FILE: why" (FILE relative to the
    checkpoint directory), empty when intact; legacy: the checkpoint has no file record."""

    problems: list[str] = field(default_factory=list)
    legacy: bool = False


def verify_checkpoint(d: Path, part: int = 0, parts: int = 1) -> Verdict:
    """Check checkpoint directory `d`: its meta parses, every rank's file record exists and
    every file recorded by a rank r with r % parts == part (all, by default) has its recorded
    size and sha256 (reads them all: the cost of loading them). Rank r of a job passes
    (r, world) and the job unites the verdicts. With no record at all (a version before
    file records; `legacy`): every rank's state file must exist and every .pt file must end
    with a complete zip directory (torch.save's format; a truncated file has none)."""
    d = Path(d)
    if not d.is_dir():
        return Verdict([f"{d.name}: not a directory"])
    problems, world = [], None
    try:
        meta = json.loads((d / META).read_text())
        world = int(meta["world_size"])
        if "step" not in meta or "config" not in meta:
            raise KeyError("step or config")
    except FileNotFoundError:
        problems.append(f"{META}: missing")
    except OSError as e:
        problems.append(f"{META}: unreadable ({e.strerror})")
    except ValueError as e:            # JSONDecodeError, UnicodeDecodeError, a bad world size
        problems.append(f"{META}: not valid JSON ({e})")
    except (KeyError, TypeError):
        problems.append(f"{META}: no step, world_size or config")
    records = sorted(int(m.group(1)) for p in d.iterdir() if (m := _RECORD_RE.fullmatch(p.name)))
    mine = [r for r in (range(world) if world is not None else records) if r % parts == part]
    if not records:
        problems += [f"rank{r:04d}_state.pt: missing" for r in mine
                     if not (d / f"rank{r:04d}_state.pt").is_file()]
        problems += [f"{rel}: incomplete (no zip directory at its end: truncated?)" for rel in _files(d)
                     if rel.endswith(".pt") and _owner(rel, parts) == part
                     and not zipfile.is_zipfile(d / rel)]
        return Verdict(problems, legacy=True)
    for r in mine:
        name = RECORD.format(r)
        try:
            files = json.loads((d / name).read_text())["files"]
            problems += [p for rel, want in files.items() if (p := _file_problem(d, rel, want))]
        except FileNotFoundError:
            problems.append(f"{name}: missing (rank {r}'s file record)")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"{name}: unreadable ({e!r})")
    return Verdict(problems)


def candidates(ckpt_dir: Path) -> tuple[list[str], list[str]]:
    """The tags resume tries, in order: `latest`'s, then every other step directory, newest
    first; and what is wrong with `latest` (a tag naming no directory)."""
    ckpt_dir = Path(ckpt_dir)
    steps = sorted((p.name for p in ckpt_dir.glob("step*") if _STEP_RE.fullmatch(p.name) and p.is_dir()),
                   reverse=True)
    latest, first, damage = ckpt_dir / LATEST, [], []
    if latest.exists():
        tag = latest.read_text(errors="replace").strip()
        if tag and "/" not in tag and tag not in (".", "..") and (ckpt_dir / tag).is_dir():
            first = [tag]
        else:
            damage.append(f"{latest}: names {tag[:40]!r}, which is no checkpoint directory of {ckpt_dir}")
    return first + [t for t in steps if t not in first], damage


class Checkpointer:
    """Writes and reads RUN/ckpt for one rank of a DeepSpeed job (collective calls)."""

    def __init__(self, out: Path, engine, comm, rank: int, world: int):
        self.dir = Path(out) / "ckpt"
        self.engine, self.comm, self.rank, self.world = engine, comm, rank, world
        self.saved_step: int | None = None
        # Step directories newer than the resumed checkpoint (damaged, or of the lost
        # trajectory): set aside, never overwritten, when this run writes their step again.
        self.stale: set[str] = set()

    def save(self, pos: DataPosition, rank_state: dict, meta: dict, hf_parts=()) -> None:
        """Write ckpt/step{N} on every rank, record its files, then point ckpt/latest at it.

        rank_state: this rank's tensors and JSON strings (RNG states are added); meta: rank
        0's JSON record (step and position are added); hf_parts: objects with
        `save_pretrained` (config, generation config, tokenizer) for hf_config/.
        """
        if self.saved_step == pos.step:
            return  # already on disk (e.g. a finished run resumed): never rewrite `latest`'s tag
        tag = tag_of(pos.step)
        d = self.dir / tag
        if tag in self.stale:
            if self.rank == 0 and d.exists():
                aside, n = self.dir / SET_ASIDE / tag, 0
                while aside.exists():
                    n += 1
                    aside = self.dir / SET_ASIDE / f"{tag}.{n}"
                aside.parent.mkdir(exist_ok=True)
                os.replace(d, aside)
                log(f"checkpoint {tag}: {d} predates the resume (skipped as damaged, or newer than "
                    f"the resumed step): moved unchanged to {aside}; delete it when no longer needed")
            self.comm.barrier()             # no rank writes into `d` before it is moved
            self.stale.discard(tag)
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=asdict(pos),
                                    save_latest=False)
        torch.save({**rank_state, **rng_state()}, d / f"rank{self.rank:04d}_state.pt")
        if self.rank == 0:
            record = {**asdict(pos), "world_size": self.world, **meta}
            (d / META).write_text(json.dumps(record, indent=1))
            for part in hf_parts:
                part.save_pretrained(d / "hf_config")
        self.comm.barrier()                 # every rank's files of `tag` are complete
        write_file_record(d, self.rank, self.world)
        self.comm.barrier()                 # every file of `tag` is recorded
        if self.rank == 0:
            tmp = self.dir / (LATEST + ".tmp")
            tmp.write_text(tag)
            os.replace(tmp, self.dir / LATEST)
        self.comm.barrier()
        self.saved_step = pos.step
        log(f"checkpoint {d}")

    def _intact(self, tags: list[str], damage: list[str]) -> tuple[str | None, bool]:
        """The first of `tags` that verifies on every rank, and whether it has no file record
        (None: none does). Every skipped one is logged and appended to `damage`."""
        for tag in tags:
            d = self.dir / tag
            v = verify_checkpoint(d, self.rank, self.world)
            verdicts = self.comm.allgather_object((v.problems, v.legacy))   # the same on every rank
            problems = list(dict.fromkeys(p for probs, _ in verdicts for p in probs))
            if not problems:
                return tag, any(legacy for _, legacy in verdicts)
            damage.append(f"{d}: " + "; ".join(problems))
            log(f"--resume: skipping {d}: " + "; ".join(problems))
        return None, False

    def resume(self, config: dict, identity: str | None, cache: str,
               defaults: dict | None = None) -> tuple[DataPosition, dict] | None:
        """Load the newest checkpoint that verifies on every rank (module docstring) into the
        engine: (data position, this rank's state), RNG states restored; None when there is
        none (no checkpoint; or no `latest`, i.e. none was ever completed, and no intact
        step directory). Raises ValueError on every rank when `latest` exists but no
        checkpoint verifies, naming each damaged file, and for a checkpoint written by
        another configuration (`config_diff`), naming every difference."""
        found = (*candidates(self.dir), (self.dir / LATEST).exists()) if self.rank == 0 else None
        tags, damage, has_latest = self.comm.bcast_object(found)    # one listing for every rank
        if not tags and not damage:
            log(f"--resume: no checkpoint in {self.dir}; starting fresh")
            return None
        for why in damage:
            log(f"--resume: {why}")
        tag, legacy = self._intact(tags, damage)
        if tag is None and not has_latest:
            log(f"--resume: {self.dir} has no 'latest' (no checkpoint was completed) and no intact "
                "step directory; starting fresh")
            self.stale = set(tags)
            return None
        if tag is None:
            raise ValueError(f"--resume: no checkpoint in {self.dir} is intact:\n  " + "\n  ".join(damage)
                             + "\nNothing was changed. Restore the damaged files from a copy, or start "
                             f"fresh: a new --out, or move {self.dir} out of the run directory.")
        if legacy:
            log(f"--resume: {self.dir / tag} has no file record (written by a version before file "
                "records): its meta parses, every rank's state file is there and every .pt file ends "
                "complete, but sizes and hashes cannot be checked; trusting it")
        meta = json.loads((self.dir / tag / META).read_text())
        diffs = config_diff(meta, config, self.world, identity, cache, defaults)
        if diffs:
            raise ValueError(f"{self.dir / tag} was written by another configuration:\n  "
                             + "\n  ".join(diffs) + "\nUse a new --out, or the same settings.")
        with refuse_unsafe(self.dir / tag, "checkpoint"):
            _, client = self.engine.load_checkpoint(str(self.dir), tag=tag)
        pos = DataPosition(client["step"], client["epoch"], client["batch_in_epoch"])
        self.saved_step = pos.step
        self.stale = {t for t in tags if _STEP_RE.fullmatch(t) and int(t[4:]) > pos.step}
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
