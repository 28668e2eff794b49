"""The cache record format: 24-bit (id, weight-code) records + 1 entropy byte per position.

Versions 1-3 (fixed U): per position, U records of 3 bytes then 1 entropy byte: 3U + 1 = 37
bytes at U = 12. Version 4 (allocated U, `--class-budget B`): position t holds U_t records
(1 <= U_t <= U_max, sum over a window = the header's `window_records` R), so a window's
kd.bin is T count bytes, T entropy bytes, then the R records in position order:
2T + 3R bytes (2 + 3B per position; 37 B at B = 11.67). `RecordCodec.from_header` builds
the codec a cache's header describes; `unpack` returns [T, U_max] arrays either way
(sentinel-padded past U_t), the shape the loss takes.

    record (little-endian, 24 bits) = id | (weight_code << id_bits)
    id_bits = bit_length(V),  w_bits = 24 - id_bits,  sentinel id = 2**id_bits - 1

so V <= sentinel always, and the all-ones id marks an unused slot. Examples:
V=151,936 (Qwen) -> 18/6 bits, V=128,256 (Llama 3) -> 17/7, V=49,152 -> 16/8,
V=32,000 -> 15/9. V > 2**19 - 1 would leave fewer than 5 weight bits and is refused.

Weight codes and entropy bytes index float32 codebooks that travel in the manifest.
Weights are written by stochastic rounding onto the codebook, which preserves the
expectation (the cache stays unbiased; quantization adds variance only). Entropies round
to the nearest level; `EntropyCodebook.max_error` states the worst case.

This module imports nothing of ours.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 2
RECORD_BITS = 24
MIN_WEIGHT_BITS = 5
MAX_VOCAB = 2 ** (RECORD_BITS - MIN_WEIGHT_BITS) - 1  # 524,287
DEFAULT_WEIGHT_MIN = 2.0 ** -20  # smallest nonzero weight level (~9.5e-7)
# Priority-sampling weights max(p_i, tau) exceed 1 when tau does: that needs U+1 classes with
# u_i < p_i, a Poisson-binomial tail with mean sum(p) = 1 (~6e-11 per position at U = 12);
# tau > x needs U+1 of them with u_i < p_i / x, probability <= x**-(U+1) / (U+1)! (the union
# bound over (U+1)-subsets, sum(p) = 1): 2e-14 for x = 2 at U = 12, so the top level is 2 there,
# but 2.6e-4 at U = 4 (a 32k-position cache drew tau = 2.72 and stopped). `weight_max(U)` is the
# smallest power of two >= 2 with that bound <= WEIGHT_TAIL.
DEFAULT_WEIGHT_MAX = 2.0
WEIGHT_TAIL = 1e-13
MAX_ALLOCATED = 255               # U_max: the count byte's largest value


def weight_max(num_classes: int) -> float:
    """Top weight level for U = `num_classes`: P(tau > it) <= WEIGHT_TAIL per position."""
    k = int(num_classes) + 1
    x = DEFAULT_WEIGHT_MAX
    while -k * math.log(x) - math.lgamma(k + 1) > math.log(WEIGHT_TAIL):
        x *= 2
    return x


def _as_int64(name: str, a, ndim: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def stochastic_round(values: np.ndarray, levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map each value onto one of its two neighbouring codebook levels, keeping E[level] = value.

    `levels` is sorted ascending (float32 or float64). For `levels[j] <= x < levels[j+1]`
    the code is `j + 1` with probability `(x - levels[j]) / (levels[j+1] - levels[j])`,
    else `j`; so `E[levels[code]] = x` exactly (up to float rounding). Values equal to the
    top level map to it; values outside `[levels[0], levels[-1]]` are an error (nothing is
    silently clipped). Returns int64 codes of `values`' shape.
    """
    x = np.asarray(values, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64)
    if x.size and (not np.all(np.isfinite(x)) or x.min() < lv[0] or x.max() > lv[-1]):
        bad = x[~np.isfinite(x) | (x < lv[0]) | (x > lv[-1])]
        raise ValueError(f"values outside the codebook range [{lv[0]:.6g}, {lv[-1]:.6g}]: "
                         f"{bad[:5].tolist()} ({bad.size} in all)")
    j = np.clip(np.searchsorted(lv, x, side="right") - 1, 0, len(lv) - 2)
    lo, hi = lv[j], lv[j + 1]
    p_up = (x - lo) / (hi - lo)
    up = rng.random(x.shape) < p_up
    return (j + up).astype(np.int64)


@dataclass(frozen=True)
class WeightCodebook:
    """2**w_bits float32 levels: 0, then log-spaced from `w_min` to `w_max` (2; a cache
    uses `weight_max(U)`, 2 for U >= 12, and records the levels in its header).

    Log spacing gives a constant relative step: (w_max/w_min)**(1/(2**w_bits - 2)), e.g.
    1.26x at 6 bits, 1.06x at 8 bits.
    """

    w_bits: int
    w_min: float = DEFAULT_WEIGHT_MIN
    w_max: float = DEFAULT_WEIGHT_MAX

    @property
    def levels(self) -> np.ndarray:
        n = 2 ** self.w_bits
        nonzero = np.geomspace(self.w_min, self.w_max, n - 1)
        return np.concatenate([[0.0], nonzero]).astype(np.float32)

    def encode(self, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Stochastic rounding of weights in [0, w_max] onto the codebook (unbiased)."""
        return stochastic_round(weights, self.levels, rng)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.levels[codes]


@dataclass(frozen=True)
class EntropyCodebook:
    """256 levels in nats from 0 to ln V, quadratically spaced (dense near 0, where most
    positions of a trained LM are): level_k = ln V * (k / 255)**2. Round to nearest.
    """

    vocab_size: int

    @property
    def levels(self) -> np.ndarray:
        k = np.arange(256, dtype=np.float64)
        return (np.log(self.vocab_size) * (k / 255.0) ** 2).astype(np.float32)

    @property
    def max_error(self) -> float:
        """Worst-case |decode(encode(h)) - h| for h in [0, ln V]: half the widest gap."""
        lv = self.levels.astype(np.float64)
        return float(np.max(np.diff(lv)) / 2) + 1e-6  # + float32 rounding of the levels

    def encode(self, entropy: np.ndarray) -> np.ndarray:
        """Nearest level. Values a hair outside [0, ln V] (float error) round to the ends;
        anything further out is an error."""
        h = np.asarray(entropy, dtype=np.float64)
        top = float(np.log(self.vocab_size))
        if h.size and (not np.all(np.isfinite(h)) or h.min() < -1e-3 or h.max() > top + 1e-3):
            raise ValueError(f"entropy outside [0, ln V={top:.4f}]: min {h.min()}, max {h.max()}")
        # Inverse of the quadratic spacing, then round: exact nearest-level for monotone maps
        # up to ties; check the neighbour to be exact.
        k = np.clip(np.rint(255.0 * np.sqrt(np.clip(h, 0, top) / top)), 0, 255).astype(np.int64)
        lv = self.levels.astype(np.float64)
        for shift in (-1, 1):
            alt = np.clip(k + shift, 0, 255)
            better = np.abs(lv[alt] - h) < np.abs(lv[k] - h)
            k = np.where(better, alt, k)
        return k

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.levels[codes]


class RecordCodec:
    """Pack/unpack `[P, U]` ids + weight codes and `[P]` entropy codes to `[P, 3U+1]` bytes.

    Record k of a position sits at bytes 3k..3k+2 (little-endian, id in the low
    `id_bits`), the entropy byte last. Vectorized: no Python loop over positions.
    """

    def __init__(self, vocab_size: int, num_classes: int = 12, *, seq_len: int | None = None,
                 window_records: int | None = None):
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 2")
        if vocab_size > MAX_VOCAB:
            raise ValueError(
                f"vocab_size V={vocab_size} exceeds the version-{FORMAT_VERSION} record limit "
                f"{MAX_VOCAB} (2**19 - 1): 24-bit records would leave fewer than "
                f"{MIN_WEIGHT_BITS} weight bits")
        if not isinstance(num_classes, (int, np.integer)) or not 1 <= num_classes < vocab_size:
            raise ValueError(f"num_classes U={num_classes!r} must be in [1, V={vocab_size})")
        self.vocab_size = int(vocab_size)
        self.num_classes = int(num_classes)
        self.id_bits = self.vocab_size.bit_length()
        self.w_bits = RECORD_BITS - self.id_bits
        self.sentinel = (1 << self.id_bits) - 1
        # version 4: U_t records per position, R = window_records per window of seq_len
        self.allocated = window_records is not None
        if self.allocated:
            if not (isinstance(seq_len, (int, np.integer)) and seq_len >= 1
                    and isinstance(window_records, (int, np.integer))
                    and seq_len <= window_records <= self.num_classes * seq_len
                    and self.num_classes <= MAX_ALLOCATED):
                raise ValueError(f"allocated records: window_records={window_records!r} must be in "
                                 f"[T, U_max x T] for T={seq_len!r}, U_max={self.num_classes} <= "
                                 f"{MAX_ALLOCATED} (one count byte)")
            self.seq_len, self.window_records = int(seq_len), int(window_records)
            self.bytes_per_position = (2 * self.seq_len + 3 * self.window_records) / self.seq_len
        else:
            self.seq_len, self.window_records = seq_len, None
            self.bytes_per_position = 3 * self.num_classes + 1

    @classmethod
    def from_header(cls, h: dict) -> "RecordCodec":
        """The codec of a cache header or manifest (one with `window_records`: version 4's
        allocated records)."""
        if h.get("window_records") is not None:
            return cls(h["vocab_size"], h["num_classes"], seq_len=h["seq_len"],
                       window_records=h["window_records"])
        return cls(h["vocab_size"], h["num_classes"])

    def window_bytes(self, seq_len: int) -> int:
        """kd.bin's size for a window of `seq_len` positions."""
        if self.allocated:
            return 2 * seq_len + 3 * self.window_records
        return self.bytes_per_position * seq_len

    def __repr__(self) -> str:
        kind = (f"allocated U_t <= {self.num_classes}, {self.window_records} records per "
                f"T={self.seq_len}") if self.allocated else f"U={self.num_classes}"
        return (f"RecordCodec(V={self.vocab_size}, {kind}, id_bits={self.id_bits}, "
                f"w_bits={self.w_bits}, {self.bytes_per_position:g} B/position)")

    def pack(self, ids, weight_codes, entropy_codes) -> np.ndarray:
        """`ids [P,U]` (< V or the sentinel), `weight_codes [P,U]` (< 2**w_bits),
        `entropy_codes [P]` (< 256) -> uint8 `[P, 3U+1]`."""
        U = self.num_classes
        ids = _as_int64("ids", ids, 2)
        wc = _as_int64("weight_codes", weight_codes, 2)
        ec = _as_int64("entropy_codes", entropy_codes, 1)
        P = ids.shape[0]
        if ids.shape != (P, U) or wc.shape != (P, U) or ec.shape != (P,):
            raise ValueError(f"shapes ids {ids.shape}, weight_codes {wc.shape}, entropy_codes "
                             f"{ec.shape} do not match [P, U={U}] / [P]")
        bad_id = (ids < 0) | ((ids >= self.vocab_size) & (ids != self.sentinel))
        if bad_id.any():
            raise ValueError(f"ids must be in [0, V={self.vocab_size}) or the sentinel "
                             f"{self.sentinel}; got {ids[bad_id][:5].tolist()}")
        if wc.size and (wc.min() < 0 or wc.max() >= 1 << self.w_bits):
            raise ValueError(f"weight_codes must be in [0, {1 << self.w_bits}) for w_bits="
                             f"{self.w_bits}; got range [{wc.min()}, {wc.max()}]")
        if ec.size and (ec.min() < 0 or ec.max() > 255):
            raise ValueError(f"entropy_codes must be in [0, 255]; got [{ec.min()}, {ec.max()}]")
        rec = (ids | (wc << self.id_bits)).astype("<u4")          # [P, U] 24-bit values
        out = np.empty((P, 3 * U + 1), dtype=np.uint8)
        out[:, : 3 * U] = rec.view(np.uint8).reshape(P, U, 4)[:, :, :3].reshape(P, 3 * U)
        out[:, 3 * U] = ec
        return out

    def pack_allocated(self, ids, weight_codes, entropy_codes, counts) -> np.ndarray:
        """Version 4: `ids`/`weight_codes` [T, U_max] (slot k < counts[t] is position t's record
        k; slots beyond are ignored), `entropy_codes` [T], `counts` [T] (U_t, 1..U_max, summing
        to window_records) -> uint8 [2T + 3R]: counts, entropy bytes, records in position order."""
        counts = _as_int64("counts", counts, 1)
        T, R = counts.shape[0], self.window_records
        if not self.allocated or T != self.seq_len:
            raise ValueError(f"pack_allocated needs an allocated codec of T={T}; this is {self!r}")
        if counts.min() < 1 or counts.max() > self.num_classes or int(counts.sum()) != R:
            raise ValueError(f"counts must be in [1, {self.num_classes}] and sum to {R}; got range "
                             f"[{counts.min()}, {counts.max()}], sum {int(counts.sum())}")
        used = np.arange(self.num_classes)[None, :] < counts[:, None]        # [T, U_max]
        full = self.pack(np.where(used, ids, self.sentinel), np.where(used, weight_codes, 0),
                         entropy_codes)                                      # validates values
        rec = full[:, :3 * self.num_classes].reshape(T, self.num_classes, 3)[used]   # [R, 3]
        return np.concatenate([counts.astype(np.uint8), full[:, -1], rec.reshape(-1)])

    def unpack_allocated(self, buf) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Version 4's kd.bin -> (ids [T, U_max] sentinel-padded past U_t, weight codes (0 there),
        entropy codes [T], counts [T]). Raises ValueError when the size or counts disagree
        with the header (checks.check_sample reports them first)."""
        a = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) \
            else np.asarray(buf, dtype=np.uint8)
        T, R, U = self.seq_len, self.window_records, self.num_classes
        if a.size != 2 * T + 3 * R:
            raise ValueError(f"kd.bin of {a.size} bytes, want 2T + 3R = {2 * T + 3 * R} "
                             f"(T={T}, R={R})")
        counts = a[:T].astype(np.int64)
        if counts.min() < 1 or counts.max() > U or int(counts.sum()) != R:
            raise ValueError(f"count bytes in [{counts.min()}, {counts.max()}] summing to "
                             f"{int(counts.sum())}; want each in [1, {U}] summing to R={R}")
        r = a[2 * T:].reshape(R, 3).astype(np.int64)
        rec = r[:, 0] | (r[:, 1] << 8) | (r[:, 2] << 16)
        pos = np.repeat(np.arange(T), counts)
        slot = np.arange(R) - np.repeat(np.cumsum(counts) - counts, counts)
        ids = np.full((T, U), self.sentinel, dtype=np.int64)
        wc = np.zeros((T, U), dtype=np.int64)
        ids[pos, slot] = rec & self.sentinel
        wc[pos, slot] = rec >> self.id_bits
        return ids, wc, a[T:2 * T].astype(np.int64), counts

    def unpack(self, buf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 `[P, 3U+1]` (or flat bytes of P*(3U+1)) -> (ids, weight_codes, entropy_codes);
        an allocated codec: one window's kd.bin -> the [T, U_max] arrays (`unpack_allocated`)."""
        if self.allocated:
            return self.unpack_allocated(buf)[:3]
        U, B = self.num_classes, self.bytes_per_position
        a = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) \
            else np.asarray(buf, dtype=np.uint8)
        if a.size % B:
            raise ValueError(f"record buffer of {a.size} bytes is not a multiple of "
                             f"{B} bytes/position (U={U})")
        a = a.reshape(-1, B)
        r = a[:, : 3 * U].reshape(-1, U, 3).astype(np.int64)
        rec = r[:, :, 0] | (r[:, :, 1] << 8) | (r[:, :, 2] << 16)
        ids = rec & self.sentinel
        wc = rec >> self.id_bits
        return ids, wc, a[:, 3 * U].astype(np.int64)

    def weight_codebook(self) -> WeightCodebook:
        # allocated: a position may hold a single record, so tau's tail is U_t = 1's
        return WeightCodebook(self.w_bits, w_max=weight_max(1 if self.allocated else self.num_classes))

    def entropy_codebook(self) -> EntropyCodebook:
        return EntropyCodebook(self.vocab_size)
