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

Shards are verified against the manifest's sha256 as they are opened: a truncated or
flipped shard raises an error naming the file instead of yielding wrong data. Shard names
are checked at construction (plain `cache-*.tar` shard names inside the cache directory: a
manifest never makes the reader open a file elsewhere). Samples are decoded from raw bytes
(no pickle) and dequantized by codebook lookup; record ids and tokens must be < V.

`trainable` (format version 3, chat caches): position p is a training target iff bit p of
the sample's `trainable.bits` is set (np.packbits, bitorder little). Masked positions hold
only sentinel records, but the reader does not rely on it: a consumer must AND `trainable`
into every position that gets a loss or enters a statistic. Versions 1 and 2 (text caches)
have no such member: every position is trainable. A version-3 sample without the member,
or with one of another size or nonzero padding bits, is a ShardError.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache_format.codec import RecordCodec
from pipeline.cache_format.manifest import MASKED_FORMAT_VERSION, load_manifest, shard_path


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
        self.codec = RecordCodec(m["vocab_size"], m["num_classes"])
        if (self.codec.id_bits, self.codec.w_bits) != (m["id_bits"], m["w_bits"]):
            raise ValueError(f"{self.dir}/manifest.json: id/w bits {m['id_bits']}/{m['w_bits']} "
                             f"disagree with V={m['vocab_size']}")
        self.weight_levels = np.asarray(m["weight_codebook"], dtype=np.float32)
        self.entropy_levels = np.asarray(m["entropy_codebook"], dtype=np.float32)
        self.seq_len = m["seq_len"]
        self.masked = m["format_version"] >= MASKED_FORMAT_VERSION   # samples carry trainable.bits
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
            if self.verify:
                if len(data) != s["bytes"]:
                    raise ShardError(f"shard {path}: {len(data)} bytes, manifest says {s['bytes']} "
                                     "(truncated?); re-cache it or restore it")
                if hashlib.sha256(data).hexdigest() != s["sha256"]:
                    raise ShardError(f"shard {path}: sha256 mismatch with manifest.json (corrupted); "
                                     "re-cache it or restore it")
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
        url, key = sample.get("__url__"), sample.get("__key__")
        T, B = self.seq_len, self.codec.bytes_per_position
        tok, kd = sample.get("tokens.u32"), sample.get("kd.bin")
        if tok is None or kd is None or len(tok) != 4 * T or len(kd) != B * T:
            raise ShardError(f"shard {url}, sample {key}: expected tokens.u32 of {4 * T} B and "
                             f"kd.bin of {B * T} B, got {len(tok or b'')} and {len(kd or b'')}")
        tokens = np.frombuffer(tok, dtype="<u4")
        if (tokens >= self.codec.vocab_size).any():
            pos = int(np.argmax(tokens >= self.codec.vocab_size))
            raise ShardError(f"shard {url}, sample {key}: token id {int(tokens[pos])} at position "
                             f"{pos} >= V={self.codec.vocab_size} (the student's embedding has V "
                             "rows); the shard is damaged or was written with another "
                             "tokenizer: check it with `python tools/inspect_cache.py "
                             f"{self.dir} --verify`, then re-cache it or restore it")
        ids, wc, ec = self.codec.unpack(kd)
        bad = (ids >= self.codec.vocab_size) & (ids != self.codec.sentinel)
        if bad.any() or (wc[ids == self.codec.sentinel] != 0).any():
            raise ShardError(f"shard {url}, sample {key}: records with ids outside V="
                             f"{self.codec.vocab_size} or weighted padding; the shard is damaged")
        return {"key": key, "tokens": tokens, "ids": ids, "weights": self.weight_levels[wc],
                "entropy": self.entropy_levels[ec], "trainable": self._trainable(sample)}

    def _trainable(self, sample: dict) -> np.ndarray:
        """[T] bool: from `trainable.bits` (version 3), else all True."""
        T = self.seq_len
        if not self.masked:
            return np.ones(T, dtype=bool)
        bits, n = sample.get("trainable.bits"), (T + 7) // 8
        where = f"shard {sample.get('__url__')}, sample {sample.get('__key__')}"
        if bits is None or len(bits) != n:
            raise ShardError(f"{where}: format version {self.manifest['format_version']} needs a "
                             f"trainable.bits member of {n} B, got "
                             f"{'none' if bits is None else f'{len(bits)} B'}; the shard is "
                             "damaged: re-cache it or restore it")
        flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
        if flags[T:].any():
            raise ShardError(f"{where}: trainable.bits has padding bits set beyond T={T}; the "
                             "shard is damaged: re-cache it or restore it")
        return flags[:T].astype(bool)

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
