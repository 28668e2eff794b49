"""One work unit's shards and their records (docs/CACHE_FORMAT.md has the byte layout).

`UnitWriter` writes a unit's windows as WebDataset shards (`*.tar.tmp`, fsynced, hashed,
renamed) and returns the entries its done record lists; `encode_window` rounds and packs a
window's sampled classes into records; `window_generators` gives window k of a unit its
random streams; `empty_stats` / `add_stats` keep the per-unit statistics the manifest sums,
and `add_sample_stats` / `add_shard_stats` recompute them from written records
(checks.check_sample decodes them).

Chat caches (format version 3) pass each window's `trainable` flags [T]: masked positions
(False) are packed as U sentinel records of weight code 0 (their entropy byte is kept), the
sample gains `trainable.bits` (np.packbits of the flags, bitorder little), and the entropy
and distinct-class histograms count trainable positions only (`trainable_positions` counts
them). Text caches (trainable None) are written exactly as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.cache_format.checks import Sample, check_sample, shard_owner, tar_samples
from pipeline.cache_format.codec import RecordCodec
from pipeline.cache_format.manifest import masked_format, unit_shard_name, window_key
from pipeline.common.files import sha256_file


class UnitWriter:
    """The shards of one work unit: `cache-u{unit:07d}-l{launch:06d}-{n:04d}.tar`.

    Each shard is written as `*.tar.tmp`, fsynced, hashed and renamed when it holds
    --shard-samples windows (or at the unit's end); the unit counts as cached only when the
    ledger holds its done record, which lists these entries. The launch number in the name
    means a unit recomputed by a later launch (after a kill or a quarantine) never reuses a
    name; keys and bytes do not depend on it.
    """

    def __init__(self, out: Path, unit: int, launch: int, header: dict):
        self.out, self.unit, self.launch, self.header = out, unit, launch, header
        self.entries: list[dict] = []
        self.writer = None
        self.stats = empty_stats(header["num_classes"],
                                 masked=masked_format(header.get("format_version")))
        self.shard = self._fresh()

    def _fresh(self) -> dict:
        return {"samples": 0, "positions": 0, "windows": []}

    def _finish_shard(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())     # durable before the done record names its hash
        self.entries.append({"file": final.name, "unit": self.unit, **self.shard,
                             "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)})
        os.replace(tmp, final)
        self.shard = self._fresh()

    def write(self, k: int, tokens: np.ndarray, records: np.ndarray, ecodes, n_distinct,
              truncated: int, dropped_mass: np.ndarray | None = None,
              trainable: np.ndarray | None = None) -> None:
        import webdataset as wds

        if self.writer is None:
            # mtime must be the int 0: a float mtime makes tarfile (PAX format; webdataset
            # does not pass its `format` on) add a 1 KiB PAX header to every member, 2 KiB
            # per window = +2.4% at T=2048.
            pattern = str(self.out / unit_shard_name(self.unit, self.launch, 0)).replace(
                "-0000.tar", "-%04d.tar.tmp")
            self.writer = wds.ShardWriter(pattern, maxcount=self.header["shard_samples"],
                                          post=self._finish_shard, verbose=0, encoder=False,
                                          mtime=0)
        sample = {"__key__": window_key(self.unit, k),
                  "tokens.u32": tokens.astype("<u4").tobytes(),
                  "kd.bin": records.tobytes()}
        if trainable is not None:
            sample["trainable.bits"] = trainable_bits(trainable)
        self.writer.write(sample)
        self.shard["samples"] += 1
        self.shard["positions"] += len(tokens)
        self.shard["windows"].append(k)
        add_stats(self.stats, ecodes, n_distinct, truncated, len(tokens), dropped_mass, trainable)
        if self.writer.count >= self.writer.maxcount:
            # Finish (hash, rename) a full shard now, not when the next window arrives.
            self.writer.finish()

    def close(self) -> list[dict]:
        if self.writer is not None:
            self.writer.close()
        return self.entries

    def abandon(self) -> None:
        """After an error: close the open `*.tar.tmp` without finishing it (it stays an
        unfinished shard, no record names it), so no half-closed tar stream is left for
        the garbage collector to flush into a closed file."""
        if self.writer is not None and self.writer.tarstream is not None:
            self.writer.tarstream.close()
            self.writer.tarstream = None
        self.writer = None


def empty_stats(num_classes: int, masked: bool = False) -> dict:
    # distinct_hist[k] = positions with k distinct classes, k = 0..U (masked: trainable ones)
    st = {"entropy_code_hist": [0] * 256, "distinct_hist": [0] * (num_classes + 1),
          "positions": 0, "samples": 0, "rskd_truncated_positions": 0,
          "dropped_mass_sum": 0.0, "dropped_mass_max": 0.0}
    return st | {"trainable_positions": 0} if masked else st


def add_stats(st: dict, ecodes, n_distinct, truncated: int, positions: int,
              dropped_mass: np.ndarray | None, trainable: np.ndarray | None = None) -> None:
    """Add one window. With `trainable` [T], the entropy and distinct-class histograms count
    its trainable positions only; the teacher-side counts (rskd truncations, dropped mass)
    stay over every position the teacher saw."""
    st["samples"] += 1
    st["positions"] += positions
    if trainable is not None:
        trainable = np.asarray(trainable, dtype=bool)
        st["trainable_positions"] += int(trainable.sum())
        ecodes, n_distinct = np.asarray(ecodes)[trainable], np.asarray(n_distinct)[trainable]
    st["entropy_code_hist"] = (np.asarray(st["entropy_code_hist"])
                               + np.bincount(ecodes, minlength=256)).tolist()
    st["distinct_hist"] = (np.asarray(st["distinct_hist"])
                           + np.bincount(n_distinct, minlength=len(st["distinct_hist"]))).tolist()
    st["rskd_truncated_positions"] += int(truncated)
    if dropped_mass is not None and len(dropped_mass):
        st["dropped_mass_sum"] += float(np.sum(dropped_mass, dtype=np.float64))
        st["dropped_mass_max"] = max(st["dropped_mass_max"], float(np.max(dropped_mass)))


def add_sample_stats(st: dict, sample: Sample, masked: bool) -> None:
    """Add a decoded sample's record statistics as its writer did (`add_stats`: entropy and
    distinct-class histograms, over trainable positions when `masked`; positions, samples).
    The teacher-side counts (rskd truncations, dropped mass) are not in the records."""
    add_stats(st, sample.entropy_codes, sample.distinct, 0, len(sample.entropy_codes), None,
              sample.trainable if masked else None)


def add_shard_stats(st: dict, path: Path, codec: RecordCodec, seq_len: int,
                    format_version: int) -> None:
    """Add every sample of the shard at `path` to `st` (`add_sample_stats`). A sample that
    does not decode or check (checks.check_sample) raises ValueError naming the shard."""
    masked = masked_format(format_version)
    for key, members in tar_samples(path.read_bytes()):
        problems, sample = check_sample(codec, seq_len, format_version, key, members,
                                        shard_owner(path.name))
        if problems:
            raise ValueError(f"shard {path}: {'; '.join(problems)}")
        add_sample_stats(st, sample, masked)


def encode_window(codec: RecordCodec, ids, w, h, rng: np.random.Generator,
                  trainable: np.ndarray | None = None, counts: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(records, entropy codes [T], distinct classes per position [T]). Every position is
    rounded (the rounding stream is consumed as for a text window, so a trainable position's
    record equals the text path's); then positions with `trainable` False get U sentinel
    slots of weight code 0. An allocated codec (format 4) takes `counts` [T], the U_t of
    each position (slots past it hold the sentinel)."""
    wc = codec.weight_codebook().encode(w, rng)
    ec = codec.entropy_codebook().encode(h)
    if trainable is not None:
        masked = ~np.asarray(trainable, dtype=bool)
        ids = np.where(masked[:, None], codec.sentinel, ids)
        wc = np.where(masked[:, None], 0, wc)
    if codec.allocated:
        records = codec.pack_allocated(ids, wc, ec, counts)
    else:
        records = codec.pack(ids, wc, ec)
    return records, ec, (ids != codec.sentinel).sum(1)


def trainable_bits(trainable: np.ndarray) -> bytes:
    """The `trainable.bits` member: np.packbits of the T flags, bitorder little (position p
    is bit p % 8 of byte p // 8; the last byte's unused high bits are 0)."""
    return np.packbits(np.asarray(trainable, dtype=bool), bitorder="little").tobytes()


def window_generators(seed: int, unit: int, k: int, device: torch.device):
    """Independent torch (sampling) and numpy (rounding) streams for window k of a unit:
    the records depend only on (seed, unit, window), not on ranks, batches or launches."""
    ss = np.random.SeedSequence([seed, unit, k])
    s_torch, s_np = ss.generate_state(2, dtype=np.uint64)
    gen = torch.Generator(device=device).manual_seed(int(s_torch) & (2**63 - 1))
    return gen, np.random.default_rng(int(s_np))
