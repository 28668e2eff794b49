"""Codec: bit layout against a hand-written reference, round trips, rounding, limits."""

import numpy as np
import pytest

from pipeline.cache_format.codec import (MAX_VOCAB, EntropyCodebook, RecordCodec, WeightCodebook,
                            stochastic_round)

VOCABS = [1_000, 32_000, 49_152, 128_256, 151_936, 524_287]


def _random_records(codec: RecordCodec, P: int, rng):
    ids = rng.integers(0, codec.vocab_size, size=(P, codec.num_classes))
    ids[rng.random(ids.shape) < 0.1] = codec.sentinel
    wc = rng.integers(0, 1 << codec.w_bits, size=ids.shape)
    ec = rng.integers(0, 256, size=P)
    return ids, wc, ec


@pytest.mark.parametrize("V", VOCABS)
def test_pack_unpack_identity(V):
    rng = np.random.default_rng(V)
    codec = RecordCodec(V, 12)
    ids, wc, ec = _random_records(codec, 500, rng)
    ids[0, :3] = [0, V - 1, codec.sentinel]          # the extremes
    buf = codec.pack(ids, wc, ec)
    assert buf.dtype == np.uint8 and buf.shape == (500, 37)
    ids2, wc2, ec2 = codec.unpack(buf)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(wc2, wc)
    np.testing.assert_array_equal(ec2, ec)
    ids3, _, _ = codec.unpack(buf.tobytes())         # flat bytes too
    np.testing.assert_array_equal(ids3, ids)


@pytest.mark.parametrize("V,id_bits,w_bits", [(151_936, 18, 6), (128_256, 17, 7),
                                              (49_152, 16, 8), (32_000, 15, 9),
                                              (524_287, 19, 5), (1_000, 10, 14)])
def test_bit_widths(V, id_bits, w_bits):
    c = RecordCodec(V)
    assert (c.id_bits, c.w_bits, c.sentinel) == (id_bits, w_bits, 2 ** id_bits - 1)
    assert c.sentinel >= V
    assert c.bytes_per_position == 37


def test_bit_layout_matches_hand_reference():
    # Record k at bytes 3k..3k+2, little-endian, id low, weight code high, entropy last.
    c = RecordCodec(151_936, 2)
    ids = np.array([[140_000, 5]])
    wc = np.array([[37, 0]])
    buf = c.pack(ids, wc, np.array([200]))
    expect = []
    for i, w in zip(ids[0], wc[0]):
        v = int(i) + (int(w) << 18)
        expect += [v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF]
    assert buf[0].tolist() == expect + [200]


def test_large_qwen_ids_survive():
    c = RecordCodec(151_936)
    ids = np.arange(131_072, 131_072 + 12 * 100).reshape(100, 12)
    out, _, _ = c.unpack(c.pack(ids, np.full(ids.shape, 63), np.zeros(100, int)))
    np.testing.assert_array_equal(out, ids)
    assert out.max() >= 131_072


def test_vocab_limit_refused():
    RecordCodec(MAX_VOCAB)
    with pytest.raises(ValueError, match=r"V=524288.*524287"):
        RecordCodec(524_288)


@pytest.mark.parametrize("bad", [
    dict(ids=np.array([[1000, 0]])),                 # id == V but not the sentinel
    dict(ids=np.array([[-1, 0]])),
    dict(wc=np.array([[1 << 14, 0]])),
    dict(ec=np.array([256])),
    dict(ids=np.array([[1.0, 2.0]])),                # wrong dtype
    dict(ids=np.array([1, 2])),                      # wrong shape
])
def test_pack_rejects_bad_input(bad):
    c = RecordCodec(1000, 2)
    args = dict(ids=np.array([[1, 2]]), wc=np.array([[0, 1]]), ec=np.array([3]))
    args.update(bad)
    with pytest.raises(ValueError):
        c.pack(args["ids"], args["wc"], args["ec"])


def test_unpack_rejects_partial_buffer():
    with pytest.raises(ValueError, match="multiple of 37"):
        RecordCodec(1000).unpack(b"\x00" * 40)


@pytest.mark.parametrize("x", [0.3, 1e-9, 0.0, 1.0, 0.7771])
def test_stochastic_rounding_is_unbiased(x):
    cb = WeightCodebook(6)
    lv = cb.levels.astype(np.float64)
    rng = np.random.default_rng(0)
    n = 200_000
    codes = cb.encode(np.full(n, x), rng)
    vals = lv[codes]
    assert set(np.unique(codes)) <= set(range(64))
    se = vals.std() / np.sqrt(n)
    assert abs(vals.mean() - x) <= 4 * se + 1e-12
    # Only the two neighbouring levels are ever used.
    assert len(np.unique(codes)) <= 2


def test_stochastic_rounding_below_smallest_level_and_out_of_range():
    cb = WeightCodebook(5)
    assert cb.levels[0] == 0 and cb.levels[1] == pytest.approx(2.0 ** -20)
    codes = cb.encode(np.full(100_000, 2.0 ** -22), np.random.default_rng(1))
    assert set(np.unique(codes)) == {0, 1}     # between 0 and the smallest nonzero level
    with pytest.raises(ValueError, match="outside the codebook"):
        cb.encode(np.array([2.5]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside the codebook"):
        stochastic_round(np.array([-0.1]), cb.levels, np.random.default_rng(0))


@pytest.mark.parametrize("V", [1_000, 49_152, 151_936])
def test_entropy_byte_round_trip_within_stated_bound(V):
    cb = EntropyCodebook(V)
    h = np.concatenate([np.linspace(0, np.log(V), 10_001), np.random.default_rng(0).random(1000)])
    err = np.abs(cb.decode(cb.encode(h)) - h)
    assert err.max() <= cb.max_error
    # Nearest level, brute force.
    brute = np.argmin(np.abs(cb.levels[None, :].astype(np.float64) - h[:, None]), axis=1)
    np.testing.assert_array_equal(np.abs(cb.levels[cb.encode(h)] - h), np.abs(cb.levels[brute] - h))
    assert cb.max_error < 0.05
    with pytest.raises(ValueError):
        cb.encode(np.array([np.log(V) + 1]))


def test_weight_max_covers_the_priority_threshold_tail():
    """The top weight level bounds tau with tail <= WEIGHT_TAIL. Independent check: for p
    uniform over n classes, P(tau > x) = P(Binomial(n, 1/(n x)) >= U+1) (exact, log-space sum),
    which is below the union bound; the chosen level passes and half of it (when > 2) fails."""
    import math

    from pipeline.cache_format.codec import WEIGHT_TAIL, weight_max

    def tail(U, x, n=100_000):
        q = 1.0 / (n * x)
        terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                 + j * math.log(q) + (n - j) * math.log1p(-q) for j in range(U + 1, U + 60)]
        m = max(terms)
        return math.exp(m) * sum(math.exp(t - m) for t in terms)

    assert weight_max(12) == 2.0 and weight_max(48) == 2.0     # the U = 12 format is unchanged
    for U in (2, 4, 8):
        x = weight_max(U)
        assert x > 2 and tail(U, x) <= WEIGHT_TAIL
        assert tail(U, x / 2) > WEIGHT_TAIL / 40    # not needlessly coarse (bound vs exact slack)
    assert RecordCodec(49152, 4).weight_codebook().levels[-1] == np.float32(weight_max(4))
    assert RecordCodec(49152, 12).weight_codebook().levels[-1] == np.float32(2.0)


def test_priority_u4_weights_encode():
    """Regression: a U = 4 priority cache drew tau = 2.72 on real text and the codebook (top 2)
    refused it. Flat rows over 1,000 classes: P(tau > 2) ~ P(Poisson(1/2) >= 5) = 1.7e-4, so
    30,000 rows hold some; all of them encode with the codec's U = 4 codebook."""
    import torch

    from pipeline.stage1_cache.class_sampler import sample_classes

    gen = torch.Generator().manual_seed(0)
    logits = torch.zeros(30_000, 1_000)
    _, w, _ = sample_classes(logits, 4, "priority", gen)
    w = w.numpy()
    assert (w > 2).any(), "the fixture must reach the old top level"
    codec = RecordCodec(1_000, 4)
    codes = codec.weight_codebook().encode(w, np.random.default_rng(0))
    assert codes.max() < 1 << codec.w_bits
