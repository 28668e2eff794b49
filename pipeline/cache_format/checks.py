"""The format's checks, each in one place (docs/CACHE_FORMAT.md): a shard file against the entry
that vouches for it, and one sample's members decoded and checked against the header.

    problem = shard_file_problem(path, entry, source)   # size + sha256; None = as recorded
    for key, members in tar_samples(data):               # a shard's tar members by sample
        problems, sample = check_sample(codec, T, format_version, key, members, owner)

Every consumer calls these and nothing else computes a shard's sha256 or decodes a sample:
the reader (reader.py: raises ShardError naming the shard), stage 1's restart
(pipeline.stage1_cache.launch: collects the problems and stops the launch), the whole-cache
verification (verify.py) and the statistics and repair of tools/inspect_cache.py
(tests/test_cache_format_owner.py checks it). A new format version changes this module (and
the codec, manifest and writer it reads), not its consumers.

Problems are one line each. `shard_file_problem` names the file (and its unit); the problems
of `check_sample` name the sample (`sample {key}: ...`, or `key {key!r} ...` for a key of
the wrong form), and the caller names the shard.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache_format.codec import RecordCodec
from pipeline.cache_format.manifest import MANIFEST, UNIT_SHARD_RE, masked_format
from pipeline.common.files import sha256_file

TOKEN_BYTES = 4                                             # tokens.u32
UNIT_KEY_RE = re.compile(r"^u(\d{7})-w(\d{7})$")            # versions 2, 3: u{unit}-w{window}
RANK_KEY_RE = re.compile(r"^(\d{4})-(\d{9})$")              # version 1: {rank}-{window}
RANK_SHARD_RE = re.compile(r"^cache-r(\d{4})-(\d{6})\.tar$")  # version 1: cache-r{rank}-{n}
TAR_ERRORS = (tarfile.TarError, EOFError, ValueError)
"""What `tar_samples` raises for a damaged shard (a verifier reports it, a reader stops)."""


# -- a shard file -------------------------------------------------------------------------------
def shard_label(path: Path | str, entry: dict) -> str:
    """How a problem names a shard: its path, and its unit when the entry records one."""
    unit = entry.get("unit") if isinstance(entry, dict) else None
    return f"{path} (unit {unit})" if isinstance(unit, int) and not isinstance(unit, bool) \
        else str(path)


def shard_file_problem(path: Path, entry: dict, source: str = MANIFEST,
                       data: bytes | None = None) -> str | None:
    """None when the shard file at `path` is what `entry` records (its `bytes` and `sha256`);
    else the problem, one line naming the file and its unit (`shard_label`) and `source`,
    the file that holds the entry (manifest.json, or a done record ledger/unit-*.done.json).

    `data`: the file's bytes when the caller has read them (the reader and the verifier
    decode them next): those are checked. Without it the file is stat'ed and hashed in
    1 MiB blocks (a missing file is a problem, not an error). A size that differs is
    reported without hashing."""
    name = shard_label(path, entry)
    if data is None:
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().st_size
    else:
        size = len(data)
    if size != entry["bytes"]:
        return f"{name}: {size} bytes, {source} says {entry['bytes']} (truncated or replaced)"
    digest = sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        return f"{name}: sha256 mismatch with {source} (corrupted or replaced)"
    return None


def shard_owner(name: object) -> tuple[str, int] | None:
    """("unit", u) for a version-2/3 shard name, ("rank", r) for a version-1 one, else None:
    whose samples the shard may hold (`check_sample`'s `owner`)."""
    if not isinstance(name, str):
        return None
    if (um := UNIT_SHARD_RE.fullmatch(name)) is not None:
        return "unit", int(um.group(1))
    if (rm := RANK_SHARD_RE.fullmatch(name)) is not None:
        return "rank", int(rm.group(1))
    return None


def tar_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a shard's bytes, grouping consecutive members by
    key as webdataset does (key = the member's base name up to its first dot). Raises one of
    TAR_ERRORS: tarfile.TarError / EOFError for a damaged tar, ValueError for a member stored
    twice."""
    key, group = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield key, group
                group = {}
            key = k
            if ext in group:
                raise ValueError(f"sample {k}: member .{ext} appears twice")
            f = tf.extractfile(info)
            group[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, group


# -- a sample -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One window decoded (docs/CACHE_FORMAT.md, "Shards and samples")."""

    key: str
    tokens: np.ndarray          # [T] uint32: the inputs the teacher saw
    ids: np.ndarray             # [T, U] int64: class ids, the sentinel in an empty slot
    weight_codes: np.ndarray    # [T, U] int64: indices into the manifest's weight_codebook
    entropy_codes: np.ndarray   # [T] int64: the entropy byte, an index into entropy_codebook
    trainable: np.ndarray       # [T] bool: trainable.bits (version 3), else all True
    distinct: np.ndarray        # [T] int64: classes (non-sentinel slots) per position
    counts: np.ndarray | None = None   # [T] int64: version 4's count bytes U_t, else None


def _size(b: bytes | None) -> str:
    return "none" if b is None else f"{len(b)} B"


def check_sample(codec: RecordCodec, seq_len: int, format_version: int, key: str,
                 members: dict[str, bytes], owner: tuple[str, int] | None = None
                 ) -> tuple[list[str], Sample | None]:
    """Decode one sample (`members`: {extension: bytes}, e.g. from `tar_samples`) and check
    it against the header; returns (its problems, empty when it is sound; the decoded
    sample, or None when its members' sizes do not allow decoding).

    Checked: the key's form and owner (`owner`, from `shard_owner`: ("unit", u) wants
    u{unit:07d}-w{window:07d} of unit u, ("rank", r) or None wants version 1's
    {rank:04d}-{window:09d}); tokens.u32 of 4T bytes and kd.bin of (3U+1)T bytes (version 4:
    2T + 3R, and T count bytes in [1, U_max] summing to R = window_records); version 3
    (`format_version` 3, `masked_format`): trainable.bits of ceil(T/8) bytes with its
    padding bits 0; no other member; tokens < V; record ids < V or the sentinel, the
    sentinel's weight code 0 (any code < 2**w_bits and any entropy byte index their
    codebooks), no id twice in a position; version 3: no class record at a masked position
    and at least one at a trainable one."""
    T, V, S = seq_len, codec.vocab_size, codec.sentinel
    problems = []
    if owner is not None and owner[0] == "unit":
        km = UNIT_KEY_RE.match(key)
        if km is None:
            problems.append(f"key {key!r} is not unit-window (u{{unit:07d}}-w{{window:07d}})")
        elif int(km.group(1)) != owner[1]:
            problems.append(f"key {key} belongs to unit {int(km.group(1))}, shard is unit {owner[1]}")
    else:
        km = RANK_KEY_RE.match(key)
        if km is None:
            problems.append(f"key {key!r} is not rank-window ({{rank:04d}}-{{window:09d}})")
        elif owner is not None and int(km.group(1)) != owner[1]:
            problems.append(f"key {key} belongs to rank {int(km.group(1))}, shard is rank {owner[1]}")
    tok, kd = members.get("tokens.u32"), members.get("kd.bin")
    want = codec.window_bytes(T)
    if tok is None or kd is None or len(tok) != TOKEN_BYTES * T or len(kd) != want:
        how = (f"2T + 3 x {codec.window_records} records" if codec.allocated
               else f"{codec.bytes_per_position} x T={T}")
        problems.append(f"sample {key}: tokens.u32 {_size(tok)} (want {TOKEN_BYTES * T}), "
                        f"kd.bin {_size(kd)} (want {how} = {want})")
        return problems, None
    counts = None
    if codec.allocated:
        counts = np.frombuffer(kd, np.uint8, count=T).astype(np.int64)
        if counts.min() < 1 or counts.max() > codec.num_classes or counts.sum() != codec.window_records:
            problems.append(f"sample {key}: count bytes in [{counts.min()}, {counts.max()}] "
                            f"summing to {counts.sum()}; format {format_version} wants each in "
                            f"[1, {codec.num_classes}] summing to window_records="
                            f"{codec.window_records}")
            return problems, None
    masked = masked_format(format_version)
    expected = {"tokens.u32", "kd.bin"} | ({"trainable.bits"} if masked else set())
    trainable = np.ones(T, dtype=bool)
    if masked:
        bits = members.get("trainable.bits")
        if bits is None or len(bits) != (T + 7) // 8:
            problems.append(f"sample {key}: format version {format_version} needs a "
                            f"trainable.bits member of {(T + 7) // 8} B (ceil(T/8)), got "
                            f"{_size(bits)}")
            return problems, None
        flags = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")
        if flags[T:].any():
            problems.append(f"sample {key}: trainable.bits has padding bits set beyond T={T}")
        trainable = flags[:T].astype(bool)
    if set(members) != expected:
        problems.append(f"sample {key}: members {sorted(members)}, expected {sorted(expected)}")
    tokens = np.frombuffer(tok, dtype="<u4")
    if (tokens >= V).any():
        pos = int(np.argmax(tokens >= V))
        problems.append(f"sample {key}: token id {int(tokens[pos])} at position {pos} >= V={V} "
                        "(the student's embedding has V rows; written with another tokenizer?)")
    ids, wc, ec = codec.unpack(kd)
    pad = ids == S
    bad = (ids >= V) & ~pad
    if bad.any():
        problems.append(f"sample {key}: {int(bad.sum())} record ids outside V={V} and not the "
                        f"sentinel {S}, e.g. {ids[bad][:3].tolist()}")
    if (wc[pad] != 0).any():
        problems.append(f"sample {key}: {int((wc[pad] != 0).sum())} sentinel slot(s) with a "
                        "nonzero weight code")
    srt = np.sort(ids, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != S)
    if dup.any():
        problems.append(f"sample {key}: {int(dup.any(1).sum())} position(s) repeat a class id")
    nd = (~pad).sum(1)
    if masked and (nd[~trainable] != 0).any():
        problems.append(f"sample {key}: {int((nd[~trainable] != 0).sum())} masked position(s) "
                        "hold class records (trainable bit 0 means sentinel slots only)")
    if masked and (nd[trainable] == 0).any():
        problems.append(f"sample {key}: {int((nd[trainable] == 0).sum())} trainable position(s) "
                        "hold no class record")
    return problems, Sample(key, tokens, ids, wc, ec, trainable, nd, counts)
