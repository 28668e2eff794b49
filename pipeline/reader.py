"""Cache shards -> training batches.

    reader = CacheReader(cache_dir, rank, world, micro_batch=4, seed=0)
    reader.check_student(tokenizer, vocab_size)         # fingerprint and V must match
    for batch in reader.batches(epoch=0):               # exactly reader.steps_per_epoch(0)
        batch.input_ids [B,T] int64, batch.ids [B,T,U] int64 (sentinel >= V = unused slot),
        batch.weights [B,T,U] float32 (p_hat), batch.entropy [B,T] float32, batch.keys

Every epoch permutes the shard list with (seed, epoch) and gives rank r the shards
perm[r::world] (an explicit node splitter); each rank then runs the same number of steps,
min over ranks of (its windows // micro_batch), so ZeRO's collectives stay in lockstep and
no window is used twice in an epoch (a rank with more windows leaves its last few for the
next epoch's permutation). The order is a pure function of (seed, epoch, rank), so a
resumed run skips the batches it already consumed and continues exactly.

Shards are verified against the manifest's sha256 as they are opened: a truncated or
flipped shard raises an error naming the file instead of yielding wrong data. Shard names
are checked at construction (plain `cache-r*-*.tar` names inside the cache directory: a
manifest never makes the reader open a file elsewhere). Samples are decoded from raw bytes
(no pickle) and dequantized by codebook lookup; record ids and tokens must be < V.
"""

from __future__ import annotations

import hashlib
import io
import random
from functools import partial
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.codec import RecordCodec
from pipeline.manifest import load_manifest, shard_path


@dataclass
class CacheBatch:
    input_ids: torch.Tensor     # [B, T] int64
    ids: torch.Tensor           # [B, T, U] int64
    weights: torch.Tensor       # [B, T, U] float32
    entropy: torch.Tensor       # [B, T] float32
    keys: list[str]

    def to(self, device) -> "CacheBatch":
        return CacheBatch(self.input_ids.to(device), self.ids.to(device), self.weights.to(device),
                          self.entropy.to(device), self.keys)


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
        self.shards = m["shards"]
        # Every shard entry names a file inside the cache directory (manifest.shard_path),
        # checked before anything is opened: a bad manifest fails at setup, not mid-epoch.
        for s in self.shards:
            shard_path(self.dir, s.get("file") if isinstance(s, dict) else s)
        if len(self.shards) < world:
            raise ValueError(f"cache {self.dir} has {len(self.shards)} shard(s) for {world} ranks; "
                             "every rank needs at least one: re-cache with a smaller --shard-samples")

    # -- compatibility ----------------------------------------------------------------------
    def check_student(self, tokenizer, vocab_size: int) -> None:
        """The student must share the teacher's tokenizer and V: ids index its logits."""
        from pipeline.data import tokenizer_fingerprint

        m = self.manifest
        fp = tokenizer_fingerprint(tokenizer)
        problems = []
        if fp != m["tokenizer_fingerprint"]:
            problems.append(f"tokenizer fingerprint: cache {m['tokenizer_fingerprint'][:16]}... "
                            f"(teacher {m['teacher']}), student {fp[:16]}... "
                            f"({tokenizer.name_or_path})")
        if vocab_size != m["vocab_size"]:
            problems.append(f"vocabulary size: cache V={m['vocab_size']}, student V={vocab_size}")
        if problems:
            raise ValueError(f"student does not match cache {self.dir}: " + "; ".join(problems))

    # -- epoch plan -----------------------------------------------------------------------
    def _rank_shards(self, epoch: int, rank: int) -> list[dict]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm[rank::self.world]]

    def steps_per_epoch(self, epoch: int = 0) -> int:
        per_rank = [sum(s["samples"] for s in self._rank_shards(epoch, r)) for r in range(self.world)]
        return min(per_rank) // self.micro_batch

    # -- pipeline stages ------------------------------------------------------------------
    def _open_verified(self, items):
        """{url, shard} -> {url, stream}, after checking size and sha256 against the manifest."""
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
            yield {"url": str(path), "stream": io.BytesIO(data)}

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
        return {"key": key, "tokens": tokens, "ids": ids,
                "weights": self.weight_levels[wc], "entropy": self.entropy_levels[ec]}

    @staticmethod
    def _collate(samples: list[dict]) -> CacheBatch:
        return CacheBatch(
            input_ids=torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
            ids=torch.from_numpy(np.stack([s["ids"] for s in samples])),
            weights=torch.from_numpy(np.stack([s["weights"] for s in samples])),
            entropy=torch.from_numpy(np.stack([s["entropy"] for s in samples])),
            keys=[s["key"] for s in samples])

    def pipeline(self, epoch: int):
        import webdataset as wds
        from webdataset import tariterators

        by_file = {s["file"]: s for s in self.shards}

        def node_split(src):
            # Explicit node splitter: the shard list permuted with (seed, epoch), then
            # every world-th shard from this rank's offset.
            urls = [d["url"] for d in src]
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(urls))
            for i in perm[self.rank::self.world]:
                yield {"url": urls[i], "shard": by_file[urls[i]]}

        return wds.DataPipeline(
            wds.SimpleShardList([s["file"] for s in self.shards]),    # every shard, manifest order
            node_split,                                                 # -> this rank's, this epoch
            wds.split_by_worker,                                        # DataLoader workers, if any
            self._open_verified,                                        # bytes + sha256 check
            partial(tariterators.tar_file_expander, handler=wds.reraise_exception),  # members
            partial(tariterators.group_by_keys, handler=wds.reraise_exception),     # -> windows
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                        rng=random.Random(f"{self.seed}-{epoch}-{self.rank}")),
            wds.map(self._decode),                                      # raw bytes -> arrays
            wds.batched(self.micro_batch, collation_fn=self._collate, partial=False),
        )

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[CacheBatch]:
        """This rank's batches of `epoch`, exactly `steps_per_epoch(epoch)` of them, after
        skipping the first `skip` (resume)."""
        steps = self.steps_per_epoch(epoch)
        for i, batch in enumerate(self.pipeline(epoch)):
            if i >= steps:
                return
            if i >= skip:
                yield batch
