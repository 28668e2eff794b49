"""Format 4 (allocated records, `--class-budget B`) without a teacher: a sample assembled byte
by byte from docs/CACHE_FORMAT.md ("Allocated records" and "Records (3 bytes)") and read by
checks.check_sample; RecordCodec.pack_allocated against a decoder written here from the doc;
damaged samples reported as one-line problems; and class_budget.sample_allocated against a
dense float64 reference (its U_t equal to the greedy allocation of the exact variance curves,
its weights unbiased class by class, z-scores over many draws)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from pipeline.cache_format.checks import check_sample
from pipeline.cache_format.codec import RecordCodec
from pipeline.stage1_cache import class_budget as cb
from pipeline.stage1_cache.class_budget import sample_allocated


# -- a decoder and an encoder written from docs/CACHE_FORMAT.md alone --------------------------

def doc_record(class_id: int, code: int, id_bits: int) -> bytes:
    """One record: r = id | code << id_bits, 24-bit little-endian."""
    r = class_id | (code << id_bits)
    assert 0 <= r < 1 << 24
    return struct.pack("<I", r)[:3]


def doc_kd(records: list[list[tuple[int, int]]], entropy: list[int], id_bits: int,
           counts: list[int] | None = None) -> bytes:
    """kd.bin of version 4: T count bytes, T entropy bytes, then every position's records in
    position order. `counts` overrides the count bytes (to damage a sample)."""
    counts = [len(r) for r in records] if counts is None else counts
    out = bytes(counts) + bytes(entropy)
    for pos in records:
        for class_id, code in pos:
            out += doc_record(class_id, code, id_bits)
    return out


def doc_decode(kd: bytes, V: int, T: int, R: int, U_max: int):
    """(ids [T][U_max], codes [T][U_max], entropy bytes [T], counts [T]) as plain lists: slot k
    of position t holds record sum(U_0..U_{t-1}) + k for k < U_t, the sentinel with code 0
    beyond."""
    id_bits = V.bit_length()
    sentinel = 2 ** id_bits - 1
    assert len(kd) == 2 * T + 3 * R, (len(kd), T, R)
    counts, entropy = list(kd[:T]), list(kd[T:2 * T])
    assert sum(counts) == R and all(1 <= c <= U_max for c in counts)
    ids = [[sentinel] * U_max for _ in range(T)]
    codes = [[0] * U_max for _ in range(T)]
    off = 2 * T
    for t in range(T):
        for k in range(counts[t]):
            r = kd[off] | kd[off + 1] << 8 | kd[off + 2] << 16
            ids[t][k], codes[t][k] = r & sentinel, r >> id_bits
            off += 3
    assert off == len(kd)
    return ids, codes, entropy, counts


# -- a sample built by hand -------------------------------------------------------------------

V_HAND, T_HAND, UMAX_HAND = 49_152, 4, 4       # 16 id bits, 8 weight bits
BITS_HAND = 16
S_HAND = 2 ** 16 - 1
KEY, UNIT = "u0000003-w0000001", 3
# position 1 holds the sentinel between two records; id 12345 at positions 1 and 2 (legal:
# ids are distinct within a position only); weight code 0 on a real class (legal)
HAND = [[(49_151, 255)],
        [(0, 1), (S_HAND, 0), (12_345, 200)],
        [(12_345, 7), (40_001, 0)],
        [(32_768, 128)]]
HAND_ENTROPY = [0, 255, 17, 99]
HAND_TOKENS = [0, 49_151, 7, 30_000]


def hand_members(records=HAND, counts=None) -> dict[str, bytes]:
    return {"tokens.u32": struct.pack("<4I", *HAND_TOKENS),
            "kd.bin": doc_kd(records, HAND_ENTROPY, BITS_HAND, counts)}


def hand_codec(u_max: int = UMAX_HAND, records: int = 7) -> RecordCodec:
    return RecordCodec(V_HAND, u_max, seq_len=T_HAND, window_records=records)


def test_a_sample_assembled_from_the_doc_checks_and_decodes():
    members = hand_members()
    assert len(members["kd.bin"]) == 2 * 4 + 3 * 7 == 29
    codec = hand_codec()
    assert (codec.id_bits, codec.w_bits, codec.sentinel) == (16, 8, S_HAND)
    assert codec.window_bytes(T_HAND) == 29
    problems, s = check_sample(codec, T_HAND, 4, KEY, members, ("unit", UNIT))
    assert problems == []
    S = S_HAND
    want_ids = [[49_151, S, S, S], [0, S, 12_345, S], [12_345, 40_001, S, S], [32_768, S, S, S]]
    want_codes = [[255, 0, 0, 0], [1, 0, 200, 0], [7, 0, 0, 0], [128, 0, 0, 0]]
    assert s.key == KEY
    assert s.ids.tolist() == want_ids
    assert s.weight_codes.tolist() == want_codes
    assert s.entropy_codes.tolist() == HAND_ENTROPY
    assert s.counts.tolist() == [1, 3, 2, 1]
    assert s.distinct.tolist() == [1, 2, 2, 1]          # non-sentinel slots
    assert s.tokens.tolist() == HAND_TOKENS and s.trainable.all()
    # the doc decoder agrees, and the codec writes exactly the bytes assembled by hand
    assert doc_decode(members["kd.bin"], V_HAND, 4, 7, 4) == (want_ids, want_codes, HAND_ENTROPY,
                                                              [1, 3, 2, 1])
    packed = codec.pack_allocated(np.array(want_ids), np.array(want_codes),
                                  np.array(HAND_ENTROPY), np.array([1, 3, 2, 1]))
    assert packed.dtype == np.uint8 and packed.tobytes() == members["kd.bin"]


def _swap(pos: int, slot: int, rec: tuple[int, int]):
    out = [list(p) for p in HAND]
    out[pos][slot] = rec
    return out


# (what, members, codec, a fragment of the one problem expected)
DAMAGED = [
    ("kd.bin one byte short", {"kd.bin": hand_members()["kd.bin"][:-1]}, hand_codec(),
     "kd.bin 28 B (want 2T + 3 x 7 records = 29)"),
    ("a record more and a count byte summing to R+1",
     {"kd.bin": doc_kd([*HAND[:3], [(32_768, 128), (5, 5)]], HAND_ENTROPY, BITS_HAND)},
     hand_codec(), "kd.bin 32 B (want 2T + 3 x 7 records = 29)"),
    ("count bytes summing to R+1 at the right size", hand_members(counts=[1, 3, 2, 2]),
     hand_codec(), "count bytes in [1, 3] summing to 8; format 4 wants each in [1, 4] summing "
                   "to window_records=7"),
    ("count bytes summing to R-1 at the right size", hand_members(counts=[1, 2, 2, 1]),
     hand_codec(), "count bytes in [1, 2] summing to 6;"),
    ("a count byte of 0", hand_members(counts=[0, 4, 2, 1]), hand_codec(),
     "count bytes in [0, 4] summing to 7;"),
    ("a count above U_max", hand_members(counts=[4, 1, 1, 1]), hand_codec(u_max=3),
     "count bytes in [1, 4] summing to 7; format 4 wants each in [1, 3]"),
    ("a class twice in a position", hand_members(_swap(1, 1, (12_345, 3))), hand_codec(),
     "1 position(s) repeat a class id"),
    ("a weighted sentinel", hand_members(_swap(1, 1, (S_HAND, 9))), hand_codec(),
     "1 sentinel slot(s) with a nonzero weight code"),
    ("an id >= V", hand_members(_swap(0, 0, (50_000, 3))), hand_codec(),
     "1 record ids outside V=49152 and not the sentinel 65535"),
    ("no kd.bin", {"kd.bin": None}, hand_codec(), "kd.bin none (want 2T + 3 x 7 records = 29)"),
]


@pytest.mark.parametrize("what,change,codec,fragment", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_samples_are_one_line_problems(what, change, codec, fragment):
    members = {**hand_members(), **change}
    members = {k: v for k, v in members.items() if v is not None}
    problems, _ = check_sample(codec, T_HAND, 4, KEY, members, ("unit", UNIT))
    assert len(problems) == 1, problems
    p = problems[0]
    assert "\n" not in p and p.startswith(f"sample {KEY}: "), p
    assert fragment in p, p


@pytest.mark.parametrize("V", [49_152, 151_936, 128_256])
def test_pack_allocated_round_trips_through_the_doc_decoder(V):
    """Random ids (distinct per position, some sentinels inside a count), codes and counts;
    garbage in the slots past each count is ignored by the writer."""
    rng = np.random.default_rng(V)
    T, U_max = 48, 20
    counts = rng.integers(1, U_max + 1, T)
    counts[:2] = [1, U_max]
    R = int(counts.sum())
    codec = RecordCodec(V, U_max, seq_len=T, window_records=R)
    assert codec.id_bits == V.bit_length() and codec.w_bits == 24 - V.bit_length()
    S = codec.sentinel
    ids = np.stack([rng.choice(V, U_max, replace=False) for _ in range(T)])
    ids[0, 0], ids[1, 0], ids[1, 1] = V - 1, 0, V - 1
    codes = rng.integers(0, 1 << codec.w_bits, (T, U_max))
    codes[1, :2] = [(1 << codec.w_bits) - 1, 0]
    used = np.arange(U_max)[None, :] < counts[:, None]
    empty = used & (rng.random((T, U_max)) < 0.1)
    empty[:2] = False
    ids[empty], codes[empty] = S, 0
    entropy = rng.integers(0, 256, T)
    want_ids = np.where(used, ids, S)
    want_codes = np.where(used, codes, 0)
    garbage_ids = np.where(used, ids, V - 1)            # valid ids past the counts: dropped
    garbage_codes = np.where(used, codes, 3)
    kd = codec.pack_allocated(garbage_ids, garbage_codes, entropy, counts).tobytes()
    assert len(kd) == 2 * T + 3 * R
    d_ids, d_codes, d_entropy, d_counts = doc_decode(kd, V, T, R, U_max)
    assert d_ids == want_ids.tolist() and d_codes == want_codes.tolist()
    assert d_entropy == entropy.tolist() and d_counts == counts.tolist()
    u_ids, u_codes, u_entropy, u_counts = codec.unpack_allocated(kd)
    np.testing.assert_array_equal(u_ids, want_ids)
    np.testing.assert_array_equal(u_codes, want_codes)
    np.testing.assert_array_equal(u_entropy, entropy)
    np.testing.assert_array_equal(u_counts, counts)
    problems, s = check_sample(codec, T, 4, KEY, {"tokens.u32": np.zeros(T, "<u4").tobytes(),
                                                  "kd.bin": kd}, ("unit", UNIT))
    assert problems == [] and s.counts.tolist() == counts.tolist()


def test_pack_allocated_refuses_counts_off_the_budget():
    codec = hand_codec()
    ids, codes, h = np.zeros((4, 4), int), np.zeros((4, 4), int), np.zeros(4, int)
    ids[:] = np.arange(4)
    for counts in ([1, 3, 2, 2], [0, 4, 2, 1], [5, 1, 1, 0]):
        with pytest.raises(ValueError, match="counts must be in"):
            codec.pack_allocated(ids, codes, h, np.array(counts))


# -- sample_allocated against a dense float64 reference ----------------------------------------

@pytest.fixture
def one_thread():
    """Chunks of 64 rows gain nothing from intra-op threads and lose a lot on a busy 2-core
    box (as tests/test_selection_learned.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CEILING, RECORDS, ROWS = 12, 46, 8          # 5.75 records a position on average


def synthetic_logits(V: int) -> torch.Tensor:
    """8 rows mixing peaked and flat distributions (shuffled over V): a spike, Zipf laws of
    exponents 0.6 .. 3, Gaussian logits, a row of 5 equal finite logits (the rest -inf:
    fewer classes than the ceiling; allocated all 5, kept exactly) and three classes of 0.3
    over a flat tail of 0.1."""
    g = torch.Generator().manual_seed(V)
    rank = torch.arange(1, V + 1, dtype=torch.float64)
    rows = []
    spike = torch.zeros(V, dtype=torch.float64)
    spike[0] = 14.0
    rows.append(spike)
    for alpha in (0.6, 3.0):
        rows.append(-alpha * torch.log(rank))
    rows.append(0.5 * torch.randn(V, generator=g, dtype=torch.float64))
    five = torch.full((V,), -math.inf, dtype=torch.float64)
    five[:5] = 0.0
    rows.append(five)
    rows.append(-1.2 * torch.log(rank))
    two = torch.full((V,), math.log(0.1 / (V - 3)), dtype=torch.float64)
    two[:3] = math.log(0.3)
    rows.append(two)
    rows.append(-2.0 * torch.log(rank))
    z = torch.stack([r[torch.randperm(V, generator=g)] for r in rows])
    return z.float()


def dense_reference(logits: torch.Tensor, records: int):
    """(p [P, V] float64, the sizes allocated from the exact curves, the curves)."""
    p = torch.softmax(logits.double(), dim=-1)
    top = torch.sort(p, dim=1, descending=True).values[:, :CEILING]
    curves = cb.variance_curves(top, (p * p).sum(1), CEILING)
    sizes = cb.allocate(curves, records, 1, CEILING)
    # the fixture must not put the allocation's cut on a near-tie of two marginal gains
    # (fp32 logits vs float64 here): the last gain taken clears the first one left by far
    gains = (curves[:, :-1] - curves[:, 1:]).clamp_min(0).flatten().sort(descending=True).values
    extra = records - logits.shape[0]
    assert gains[extra - 1] > 1.05 * gains[extra] + 1e-7, (gains[extra - 1], gains[extra])
    return p, sizes, curves


def threshold(p: np.ndarray, k: int) -> float:
    """tau with sum_i min(1, p_i / tau) = k (bisection), the inclusion threshold of size k."""
    lo, hi = 1e-18, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(1.0, p / mid).sum() > k else (lo, mid)
    return hi


@pytest.mark.parametrize("V", [4096, 4099], ids=["blocked", "no-block-width"])
def test_allocated_sizes_are_the_dense_greedy_allocation(V):
    logits = synthetic_logits(V)
    p, want, _ = dense_reference(logits, RECORDS)
    assert 1 <= int(want.min()) and int(want.max()) <= CEILING and len(set(want.tolist())) >= 4
    S = (1 << V.bit_length()) - 1
    ids, w, h, sizes = sample_allocated(logits, RECORDS, CEILING, torch.Generator().manual_seed(0))
    assert ids.shape == w.shape == (ROWS, CEILING) and h.shape == sizes.shape == (ROWS,)
    assert sizes.tolist() == want.tolist()
    assert int(sizes.sum()) == RECORDS
    past = torch.arange(CEILING)[None, :] >= sizes[:, None]
    assert (ids[past] == S).all() and (w[past] == 0).all()
    for t in range(ROWS):
        real = ids[t][ids[t] != S]
        assert len(set(real.tolist())) == len(real), f"row {t} repeats a class"
        assert (p[t, real] > 0).all(), f"row {t} holds a class of probability 0"
        assert (w[t][ids[t] != S] > 0).all() and (w[t][ids[t] == S] == 0).all()
    assert int(want[4]) == 5 and sorted(ids[4][:5].tolist()) == torch.nonzero(p[4]).flatten().tolist()
    torch.testing.assert_close(w[4][:5].double(), p[4, ids[4][:5]], rtol=1e-6, atol=0)
    logp = torch.log_softmax(logits.double(), -1)
    dense_h = -(torch.where(p > 0, p * logp, 0.0)).sum(1)
    torch.testing.assert_close(h.double(), dense_h, rtol=0, atol=1e-4)


@pytest.mark.parametrize("V", [4096, 4099], ids=["blocked", "no-block-width"])
def test_slots_beyond_the_classes_of_nonzero_probability_hold_the_sentinel(V):
    """Rows of 3 finite logits with U_t forced to 5 (10 records over 2 positions, ceiling 5):
    the 3 classes kept with their exact p, 2 sentinel slots of weight 0 inside U_t."""
    z = torch.full((2, V), -math.inf)
    z[0, [7, 100, V - 1]] = torch.tensor([1.0, 0.0, -2.0])
    z[1, [0, 1, 2]] = torch.tensor([0.0, 0.0, 3.0])
    p = torch.softmax(z.double(), -1)
    S = (1 << V.bit_length()) - 1
    ids, w, _, sizes = sample_allocated(z, 10, 5, torch.Generator().manual_seed(3))
    assert sizes.tolist() == [5, 5]
    for t in range(2):
        real = ids[t][ids[t] != S]
        assert sorted(real.tolist()) == torch.nonzero(p[t] > 0).flatten().tolist()
        torch.testing.assert_close(w[t][ids[t] != S].double(), p[t, real], rtol=1e-5, atol=0)
        assert (w[t][ids[t] == S] == 0).all() and int((ids[t] == S).sum()) == 2


@pytest.mark.parametrize("V,dense_fraction", [(4096, 0.25), (4096, 1.0), (4099, 0.25), (4099, 1.0)],
                         ids=["blocked", "blocked-sparse", "no-block-width", "no-block-width-sparse"])
def test_allocated_weights_are_unbiased_class_by_class(V, dense_fraction, one_thread):
    """Each call samples COPIES copies of the 8 rows (independent draws; the allocation of
    COPIES x RECORDS records gives every copy the sizes of one copy, checked); over
    CALLS x COPIES draws each class's mean weight is p within 5 standard errors, and the
    classes kept at every draw with one weight have their exact p. V = 4096 takes the blocked
    path (128-wide blocks), 4099 the other; dense_fraction 1.0 keeps the sampler off its dense
    path (light classes drawn by proposals), 0.25 (the default) takes it on these rows."""
    COPIES, CALLS = 250, 10
    draws = COPIES * CALLS
    logits = synthetic_logits(V)
    p, want, _ = dense_reference(logits, RECORDS)
    big = logits.repeat(COPIES, 1)
    S = (1 << V.bit_length()) - 1
    g = torch.Generator().manual_seed(11)
    n = ROWS * (V + 1)
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    w_min = torch.full((n,), math.inf, dtype=torch.float64)
    w_max = torch.full((n,), -math.inf, dtype=torch.float64)
    # the classes of p <= 1e-3 of each row, tested in aggregate: their summed weight per draw
    small = torch.cat([(p > 0) & (p <= 1e-3), torch.zeros(ROWS, 1, dtype=torch.bool)], 1)
    tail_sum = torch.zeros(draws, ROWS, dtype=torch.float64)
    for c in range(CALLS):
        ids, w, _, sizes = sample_allocated(big, COPIES * RECORDS, CEILING, g,
                                            dense_fraction=dense_fraction)
        assert (sizes.view(COPIES, ROWS) == want).all(), "a copy got other sizes"
        past = torch.arange(CEILING)[None, :] >= sizes[:, None]
        assert (ids[past] == S).all() and (w[past] == 0).all() and ((ids == S) == (w == 0)).all()
        srt = torch.sort(ids, dim=1).values
        assert not ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] != S)).any(), "a row repeats a class"
        cls = torch.where(ids == S, V, ids)
        flat = ((torch.arange(big.shape[0]) % ROWS)[:, None] * (V + 1) + cls).flatten()
        wd = w.double().flatten()
        total.index_add_(0, flat, wd)
        total_sq.index_add_(0, flat, wd * wd)
        hits.index_add_(0, flat, (wd > 0).double())
        w_min.scatter_reduce_(0, flat, wd, "amin")
        w_max.scatter_reduce_(0, flat, wd, "amax")
        in_tail = small.flatten()[flat].view(w.shape)
        tail_sum[c * COPIES:(c + 1) * COPIES] = torch.where(in_tail, w.double(), 0.0).sum(1).view(
            COPIES, ROWS)

    def per_class(x):
        return x.view(ROWS, V + 1)[:, :V]

    mean = per_class(total) / draws
    se = (per_class(total_sq) / draws - mean ** 2).clamp_min(0).sqrt() / math.sqrt(draws)
    hits, w_min, w_max = per_class(hits), per_class(w_min), per_class(w_max)
    tested = exact = tails = 0
    for t in range(ROWS):
        pt = p[t].numpy()
        tau = threshold(pt, int(want[t]))
        expected_hits = draws * np.minimum(1.0, pt / tau)
        for i in np.nonzero(pt > 1e-3)[0]:
            where = f"row {t} class {i}: p {pt[i]:.4g}, mean {float(mean[t, i]):.4g}"
            if hits[t, i] == draws and w_min[t, i] == w_max[t, i]:   # kept exactly every time
                assert float(w_min[t, i]) == pytest.approx(pt[i], rel=1e-5), where
                exact += 1
            elif hits[t, i] == 0:
                assert expected_hits[i] < 10, f"{where}: never drawn, ~{expected_hits[i]:.0f} expected"
            else:
                z = (float(mean[t, i]) - pt[i]) / float(se[t, i])
                assert abs(z) < 5.0, f"{where}, z = {z:.2f}"
                tested += 1
        # classes of probability 0 are never drawn
        assert float(hits[t][torch.from_numpy(pt == 0)].sum()) == 0
        # the tail in aggregate, where its draws are frequent enough for a z-score (not the
        # spike's tail: a tail class wins its one slot in ~4e-4 of the draws)
        tail = (pt > 0) & (pt <= 1e-3)
        if expected_hits[tail].sum() >= 100:
            s_mean = float(tail_sum[:, t].mean())
            s_se = float(tail_sum[:, t].std()) / math.sqrt(draws)
            z = (s_mean - pt[tail].sum()) / s_se
            assert abs(z) < 5.0, f"row {t}: tail weight {s_mean:.4g}, mass {pt[tail].sum():.4g}, z = {z:.2f}"
            tails += 1
    assert tested >= 200 and exact >= 5 and tails >= 4, (tested, exact, tails)
