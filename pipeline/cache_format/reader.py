"""Cache shards -> training batches.

    reader = CacheReader(cache_dir, rank, world, micro_batch=4, seed=0)
    reader.check_student(tokenizer, vocab_size)         # fingerprint and V must match
    for batch in reader.batches(epoch=0):               # exactly reader.steps_per_epoch(0)
        batch.input_ids [B,T] int64, batch.ids [B,T,U] int64 (sentinel >= V = unused slot),
        batch.weights [B,T,U] float32 (p_hat), batch.entropy [B,T] float32, batch.keys,
        batch.trainable [B,T] bool (a chat cache's training targets; all True otherwise)

Epoch plan (any number of ranks up to the number of windows N, not of shards). A window is
(shard, sample index in the shard's tar); the manifest gives every shard's `samples`, so
the plan is computed from the manifest alone, without opening a shard:
  1. the shard list is permuted with (seed, epoch), and each shard's samples with
     (seed, epoch, shard's manifest index); laid end to end they form the epoch's window
     sequence G of N windows;
  2. every rank gets P = (N // world // micro_batch) * micro_batch windows, rank r the
     contiguous block G[r*P : (r+1)*P]; the last N - world*P windows (fewer than
     world * micro_batch; random windows of the epoch's last shards) wait for the next
     epoch's permutation. Every rank runs the same P // micro_batch steps (ZeRO's
     collectives stay in lockstep) and no window is used twice in an epoch.
  3. a rank reads the shards its block covers, in G's order, one at a time: each is read
     whole, verified (size + sha256), and the rank keeps only its windows of it (in the
     shard's permuted order), then a shuffle buffer of `shuffle_buffer` windows mixes them.
I/O: a block is contiguous in G, so a rank reads about 1/world of the shards plus at most
two boundary shards it shares with its neighbours: an epoch reads at most
shards + world - 1 shard files in all (a 1-shard cache on 2 ranks: both read it). Memory:
one shard's bytes, this rank's windows of it and the shuffle buffer.
The order is a pure function of (seed, epoch, rank, world), so a resumed run skips the
batches it already consumed (collated and decoded only from `skip` on) and continues
exactly.

Shards are verified against the manifest's sha256 as they are opened
(checks.shard_file_problem): a truncated or flipped shard raises an error naming the file
instead of yielding wrong data. Shard names are checked at construction (plain
`cache-*.tar` shard names inside the cache directory: a manifest never makes the reader open
a file elsewhere). Samples are decoded from raw bytes (no pickle) and checked by
checks.check_sample (keys, member sizes, tokens and record ids < V, empty slots unweighted,
no class twice in a position, version 3's trainable.bits), then dequantized by codebook
lookup; a sample that fails is a ShardError naming the shard, the sample and each problem.

`trainable` (format version 3, chat caches): position p is a training target iff bit p of
the sample's `trainable.bits` is set (np.packbits, bitorder little). Masked positions hold
only sentinel records (checked), and a consumer must still AND `trainable` into every
position that gets a loss or enters a statistic. Versions 1 and 2 (text caches) have no
such member: every position is trainable. A version-3 sample without the member, or with
one of another size or nonzero padding bits, is a ShardError.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache_format.checks import check_sample, shard_file_problem, shard_owner
from pipeline.cache_format.codec import RecordCodec
from pipeline.cache_format.manifest import load_manifest, shard_path


@dataclass
class CacheBatch:
    input_ids: torch.Tensor     # [B, T] int64
    ids: torch.Tensor           # [B, T, U] int64
    weights: torch.Tensor       # [B, T, U] float32
    entropy: torch.Tensor       # [B, T] float32
    keys: list[str]
    trainable: torch.Tensor | None = None   # [B, T] bool; None given -> all True

    def __post_init__(self):
        if self.trainable is None:
            self.trainable = torch.ones(self.input_ids.shape, dtype=torch.bool,
                                        device=self.input_ids.device)

    def to(self, device) -> "CacheBatch":
        return CacheBatch(self.input_ids.to(device), self.ids.to(device), self.weights.to(device),
                          self.entropy.to(device), self.keys, self.trainable.to(device))


class ShardError(ValueError):
    """A shard is missing, damaged or holds records that cannot be right."""


class CacheReader:
    def __init__(self, cache_dir: str | Path, rank: int = 0, world: int = 1, micro_batch: int = 1,
                 seed: int = 0, shuffle_buffer: int = 64, verify: bool = True):
        self.dir = Path(cache_dir)
        self.manifest = m = load_manifest(self.dir)
        self.rank, self.world, self.micro_batch = rank, world, micro_batch
        self.seed, self.shuffle_buffer, self.verify = seed, shuffle_buffer, verify
        self.codec = RecordCodec.from_header(m)
        if (self.codec.id_bits, self.codec.w_bits) != (m["id_bits"], m["w_bits"]):
            raise ValueError(f"{self.dir}/manifest.json: id/w bits {m['id_bits']}/{m['w_bits']} "
                             f"disagree with V={m['vocab_size']}")
        self.weight_levels = np.asarray(m["weight_codebook"], dtype=np.float32)
        self.entropy_levels = np.asarray(m["entropy_codebook"], dtype=np.float32)
        self.seq_len = m["seq_len"]
        self.shards = m["shards"]
        # Every shard entry names a file inside the cache directory (manifest.shard_path),
        # checked before anything is opened: a bad manifest fails at setup, not mid-epoch.
        for s in self.shards:
            shard_path(self.dir, s.get("file") if isinstance(s, dict) else s)
            n = s.get("samples") if isinstance(s, dict) else None
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                # The epoch plan is computed from these counts before any shard is opened.
                raise ValueError(f"{self.dir}/manifest.json: shard entry {s!r:.200} has no sample "
                                 "count (`samples`); restore the manifest the cache stage wrote")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        # Any world works up to the number of windows; a rank with fewer windows than one
        # micro-batch runs 0 steps (pipeline.distill refuses that: "fewer than one global batch").
        self.windows = sum(int(s["samples"]) for s in self.shards)

    # -- compatibility ----------------------------------------------------------------------
    def check_student(self, tokenizer, vocab_size: int) -> None:
        """The student must share the teacher's tokenizer and have at least V logits
        (`vocab_size` = its logits dimension): cached ids < V index its logits. More logits
        than V (a padded output layer, as Qwen2.5-0.5B's 151,936 over 151,665 tokens) are
        fine: the student's softmax runs over all of them and learns ~0 on the extra ones."""
        from pipeline.common.text import tokenizer_fingerprint

        m = self.manifest
        fp = tokenizer_fingerprint(tokenizer)
        problems = []
        if fp != m["tokenizer_fingerprint"]:
            problems.append(f"tokenizer fingerprint: cache {m['tokenizer_fingerprint'][:16]}... "
                            f"(teacher {m['teacher']}), student {fp[:16]}... "
                            f"({tokenizer.name_or_path})")
        if vocab_size < m["vocab_size"]:
            problems.append(f"vocabulary size: cache V={m['vocab_size']}, student V={vocab_size} "
                            f"(the student has {vocab_size} logits, fewer than the cache's "
                            f"{m['vocab_size']} classes, its tokenizer's; it needs at least V)")
        if problems:
            raise ValueError(f"student does not match cache {self.dir}: " + "; ".join(problems))

    # -- epoch plan -----------------------------------------------------------------------
    def windows_per_rank(self) -> int:
        """P: the windows every rank uses per epoch (a multiple of micro_batch)."""
        return self.windows // self.world // self.micro_batch * self.micro_batch

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """The same for every rank and every epoch: N // world // micro_batch."""
        return self.windows_per_rank() // self.micro_batch

    def rank_plan(self, epoch: int, rank: int | None = None) -> list[tuple[int, np.ndarray]]:
        """[(shard's manifest index, its sample indices this rank uses, in use order)], in
        reading order: `rank`'s block G[rank*P : (rank+1)*P] of the epoch's window sequence
        (module docstring). Only the shards the block covers are listed (each once)."""
        rank = self.rank if rank is None else rank
        per = self.windows_per_rank()
        a, b = rank * per, (rank + 1) * per
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        sizes = np.array([self.shards[i]["samples"] for i in perm], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        plan = []
        j = max(int(np.searchsorted(starts, a, side="right")) - 1, 0)
        while j < len(perm) and starts[j] < b:
            lo, hi = max(a, starts[j]) - starts[j], min(b, starts[j + 1]) - starts[j]
            if hi > lo:
                within = np.random.default_rng([self.seed, epoch, int(perm[j])]).permutation(sizes[j])
                plan.append((int(perm[j]), within[lo:hi]))
            j += 1
        return plan

    # -- pipeline stages ------------------------------------------------------------------
    def _open_verified(self, items):
        """{url, shard, take} -> {url, stream, shard, take}, after checking size and sha256
        against the manifest. The shard's bytes are dropped before the next one is read."""
        for item in items:
            s = item["shard"]
            path = shard_path(self.dir, s["file"])
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ShardError(f"shard {path}: cannot read ({e})") from e
            if self.verify and (problem := shard_file_problem(path, s, data=data)) is not None:
                raise ShardError(f"shard {problem}; re-cache it or restore it")
            yield {"url": str(path), "stream": io.BytesIO(data), "shard": s, "take": item["take"]}
            del data

    @staticmethod
    def _take_windows(items):
        """Verified shards -> this rank's windows of each, in the plan's order. A shard holding
        another number of samples than the manifest says is refused: the plan counted them."""
        from webdataset import tariterators
        import webdataset as wds

        for item in items:
            take = item.pop("take")
            want = {int(i): None for i in take}
            n = 0
            for n, sample in enumerate(tariterators.group_by_keys(
                    tariterators.tar_file_expander([item], handler=wds.reraise_exception),
                    handler=wds.reraise_exception), start=1):
                if n - 1 in want:
                    want[n - 1] = sample
            if n != item["shard"]["samples"]:
                raise ShardError(f"shard {item['url']}: {n} samples, manifest says "
                                 f"{item['shard']['samples']}; re-cache it or restore it")
            for i in take:
                yield want[int(i)]
            item = want = sample = None     # free this shard before the next one is read

    def _decode(self, sample: dict) -> dict:
        """A webdataset sample ({"__key__", "__url__", extension: bytes}) -> arrays, after
        checks.check_sample; any problem is a ShardError naming the shard and the sample."""
        url, key = sample.get("__url__"), sample.get("__key__")
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        problems, s = check_sample(self.codec, self.seq_len, self.manifest["format_version"], key,
                                   members, shard_owner(Path(url).name if url else None))
        if problems:
            raise ShardError(f"shard {url}, {'; '.join(problems)}; the shard is damaged: check it "
                             f"with `python tools/inspect_cache.py {self.dir} --verify`, then "
                             "re-cache it or restore it")
        return {"key": key, "tokens": s.tokens, "ids": s.ids,
                "weights": self.weight_levels[s.weight_codes],
                "entropy": self.entropy_levels[s.entropy_codes], "trainable": s.trainable}

    @staticmethod
    def _collate(samples: list[dict]) -> CacheBatch:
        return CacheBatch(
            input_ids=torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
            ids=torch.from_numpy(np.stack([s["ids"] for s in samples])),
            weights=torch.from_numpy(np.stack([s["weights"] for s in samples])),
            entropy=torch.from_numpy(np.stack([s["entropy"] for s in samples])),
            keys=[s["key"] for s in samples],
            trainable=torch.from_numpy(np.stack([s["trainable"] for s in samples])))

    def pipeline(self, epoch: int, skip: int = 0):
        """This rank's batches of `epoch` (webdataset stages), the first `skip` neither
        collated nor decoded."""
        import webdataset as wds

        def node_split(src):
            # Explicit node splitter: this rank's shards of the epoch plan, in reading order,
            # each with the sample indices it takes from it.
            by_file = {d["url"]: d for d in src}
            for i, take in self.rank_plan(epoch):
                s = self.shards[i]
                yield {**by_file[s["file"]], "shard": s, "take": take}

        def drop(src):
            for i, raw in enumerate(src):
                if i >= skip:
                    yield raw

        return wds.DataPipeline(
            wds.SimpleShardList([s["file"] for s in self.shards]),    # every shard, manifest order
            node_split,                                                 # -> this rank's, this epoch
            wds.split_by_worker,                                        # DataLoader workers, if any
            self._open_verified,                                        # bytes + sha256 check
            self._take_windows,                                         # -> this rank's windows
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                        rng=random.Random(f"{self.seed}-{epoch}-{self.rank}")),
            wds.batched(self.micro_batch, collation_fn=None, partial=False),
            drop,                                                       # resume: consumed batches
            wds.map(lambda raw: self._collate([self._decode(r) for r in raw])),  # -> arrays
        )

    def first_windows(self, n: int) -> list[dict]:
        """The first `n` windows of the cache in manifest order (shards in manifest order,
        samples in file order), decoded and verified: a fixed set (validation)."""
        items, left = [], n
        for s in self.shards:
            if left <= 0:
                break
            take = np.arange(min(left, s["samples"]))
            items.append({"url": str(shard_path(self.dir, s["file"])), "shard": s, "take": take})
            left -= len(take)
        out = []
        for raw in self._take_windows(self._open_verified(items)):
            out.append(self._decode(raw))
        return out

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[CacheBatch]:
        """This rank's batches of `epoch`, exactly `steps_per_epoch(epoch)` of them, after
        skipping the first `skip` (resume)."""
        steps = self.steps_per_epoch(epoch)
        if skip >= steps:
            return
        n = skip
        for batch in self.pipeline(epoch, skip):
            yield batch
            n += 1
        if n != steps:      # the plan counted every window from the manifest
            raise ShardError(f"cache {self.dir}: epoch {epoch} gave rank {self.rank} {n} batches, "
                             f"the plan {steps}")
