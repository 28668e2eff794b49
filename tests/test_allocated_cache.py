"""Stage 1 writing allocated records (format 4, `--class-budget B`) end to end on the tiny
teacher of tests/cache_stage.py, one rank in process: the header, every sample's kd.bin
decoded by a decoder written here from docs/CACHE_FORMAT.md, the reader's arrays against it,
each window recomputed from the teacher's full HF forward, the counts against the greedy
allocation of the exact (float64) variance curves, `tools/inspect_cache.py --verify --json`,
identical windows getting identical counts but their own draws, a rerun's bytes, and the
flags refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cache_stage import env  # noqa: F401  (fixture)
from cache_stage import (REPO, SEED, SMALL, T, expected_units, full_logits, make_docs,
                         manifest_of, parse_key, read_shards, run_inspect, write_corpus,
                         write_jsonl)
from pipeline.stage1_cache.run import main as cache_main

BUDGET = 5.5
CEILING = 22                     # ceil(4 x 5.5), the default ceiling
R = round(BUDGET * T)            # 176 records per window of T = 32


def decode_v4(kd: bytes, m: dict):
    """From the doc alone: T count bytes, T entropy bytes, then R records of 3 bytes (r = b0 |
    b1 << 8 | b2 << 16, id = r & (2**id_bits - 1), code = r >> id_bits) in position order.
    Returns (counts [T], ids [T, U_max] with the sentinel past U_t, codes [T, U_max] (0
    there), entropy bytes [T]) as numpy arrays."""
    V, T_, R_, U_max = m["vocab_size"], m["seq_len"], m["window_records"], m["num_classes"]
    id_bits = V.bit_length()
    sentinel = 2 ** id_bits - 1
    assert len(kd) == 2 * T_ + 3 * R_, (len(kd), T_, R_)
    counts, entropy = list(kd[:T_]), list(kd[T_:2 * T_])
    ids = [[sentinel] * U_max for _ in range(T_)]
    codes = [[0] * U_max for _ in range(T_)]
    off = 2 * T_
    for t, c in enumerate(counts):
        assert 1 <= c <= U_max, (t, c)
        for k in range(c):
            r = kd[off] | kd[off + 1] << 8 | kd[off + 2] << 16
            ids[t][k], codes[t][k] = r & sentinel, r >> id_bits
            off += 3
    assert off == len(kd), "count bytes do not add up to window_records"
    return np.array(counts), np.array(ids), np.array(codes), np.array(entropy)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Windows of 32 positions gain nothing from intra-op threads and lose a lot on a busy
    2-core box (as tests/test_selection_learned.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stage_args(env: dict, data, *extra: str) -> list[str]:
    """Teacher temperature 1.5: the sharpened tiny teacher's positions then range from peaked
    to flat, U_t from 2 to the ceiling, and the allocation's cut lies on gains far above the
    fp32 noise of the stage's inputs."""
    return ["--teacher", str(env["teacher"]), "--data", str(data), "--seq-len", str(T),
            "--class-budget", str(BUDGET), "--seed", str(SEED), "--unit-bytes", "400",
            "--shard-samples", "2", "--teacher-temperature", "1.5", *extra]


@pytest.fixture(scope="module")
def alloc(env, tmp_path_factory):
    """A corpus of 3 small files plus two identical ones (their units hold the same windows),
    cached with --class-budget 5.5 in batches of 2 (32 windows)."""
    root = tmp_path_factory.mktemp("allocated")
    data = root / "corpus"
    write_corpus(data, SMALL, seed=300)
    twin = make_docs(6, seed=401)
    for name in ("p.jsonl", "q.jsonl"):
        write_jsonl(data / name, twin)
    out = root / "c"
    args = stage_args(env, data)
    cache_main([*args, "--batch-size", "2", "--out", str(out)])
    m = manifest_of(out)
    samples = read_shards(out)
    decoded = {k: decode_v4(e["kd.bin"], m) for k, e in samples.items()}
    return SimpleNamespace(root=root, data=data, out=out, args=args, m=m, samples=samples,
                           decoded=decoded)


def test_header_and_every_sample_decode_by_hand(env, alloc):
    m, V = alloc.m, len(env["tok"])
    header = json.loads((alloc.out / "header.json").read_text())
    assert m["format_version"] == header["format_version"] == 4
    assert m["class_budget"] == BUDGET and m["window_records"] == R == 176
    assert m["class_ceiling"] == m["num_classes"] == CEILING
    assert (m["vocab_size"], m["id_bits"], m["sentinel"]) == (V, V.bit_length(),
                                                             2 ** V.bit_length() - 1)
    assert m["bytes_per_position"] == (2 * T + 3 * R) / T
    assert "count bytes" in m["layout"]["kd.bin"] and m["layout"] == header["layout"]
    # a position may hold one record: the codebook's top level is weight_max(1) = 2**22
    assert m["weight_codebook"][-1] == 2.0 ** 22 and len(m["weight_codebook"]) == 2 ** m["w_bits"]
    plan = json.loads((alloc.out / "units.json").read_text())
    expected = expected_units(env, plan, data=alloc.data)
    want = {f"u{u:07d}-w{k:07d}": e["windows"][k] for u, e in expected.items()
            for k in range(len(e["windows"]))}
    assert sorted(alloc.samples) == sorted(want) and len(want) >= 10
    assert m["samples"] == len(want) and m["positions"] == len(want) * T
    S = m["sentinel"]
    for key, e in alloc.samples.items():
        assert len(e["kd.bin"]) == 2 * T + 3 * R
        np.testing.assert_array_equal(np.frombuffer(e["tokens.u32"], "<u4"), want[key])
        counts, ids, codes, ecodes = alloc.decoded[key]
        assert counts.sum() == R and counts.min() >= 1 and counts.max() <= CEILING
        for t in range(T):
            real = ids[t][ids[t] != S]
            assert (real < V).all() and len(set(real.tolist())) == len(real), (key, t)
            assert (codes[t][ids[t] == S] == 0).all(), (key, t)
    all_counts = np.concatenate([d[0] for d in alloc.decoded.values()])
    assert len(set(all_counts.tolist())) >= 10 and all_counts.max() == CEILING, \
        "the allocation should range from peaked to flat positions"


def test_the_reader_yields_the_hand_decoded_records(alloc):
    from pipeline.cache_format.reader import CacheReader

    m = alloc.m
    wl = np.asarray(m["weight_codebook"], dtype=np.float32)
    el = np.asarray(m["entropy_codebook"], dtype=np.float32)
    reader = CacheReader(alloc.out, micro_batch=2, shuffle_buffer=0)
    seen = []
    for batch in reader.batches(0):
        assert batch.ids.shape == batch.weights.shape == (2, T, CEILING)
        for b, key in enumerate(batch.keys):
            _, ids, codes, ecodes = alloc.decoded[key]
            np.testing.assert_array_equal(batch.ids[b].numpy(), ids, err_msg=key)
            np.testing.assert_array_equal(batch.weights[b].numpy(), wl[codes], err_msg=key)
            np.testing.assert_array_equal(batch.entropy[b].numpy(), el[ecodes], err_msg=key)
            np.testing.assert_array_equal(batch.input_ids[b].numpy(),
                                          np.frombuffer(alloc.samples[key]["tokens.u32"], "<u4"))
            assert batch.trainable[b].all()
            seen.append(key)
    assert len(seen) == len(set(seen)) == len(alloc.samples) // 2 * 2


def test_records_recompute_from_the_teacher_and_counts_are_the_dense_greedy_optimum(env, alloc):
    """Each window from the full HF forward (not the stage's chunked lm_head): the stage's
    sampler seeded by (seed, unit, window) with the window's R records gives the same counts,
    ids and weight codes (the stage's plumbing); independently of the sampler, the entropy
    bytes are within the codebook's error of the dense entropy, and the counts are a greedy
    optimum of the float64 variance curves: no position's next record gains more than any
    position's last record (up to the fp32 noise of the stage's inputs)."""
    from pipeline.cache_format.codec import RecordCodec
    from pipeline.cache_format.shards import window_generators
    from pipeline.stage1_cache import class_budget as cb
    from pipeline.stage1_cache.class_budget import sample_allocated

    m, model = alloc.m, env["model"]
    V, S = m["vocab_size"], m["sentinel"]
    book = RecordCodec.from_header(m).weight_codebook()
    worst = 0.0
    for key, e in sorted(alloc.samples.items()):
        u, k = parse_key(key)
        counts, ids, codes, ecodes = alloc.decoded[key]
        tokens = np.frombuffer(e["tokens.u32"], "<u4")
        logits = full_logits(model, tokens)[:, :V] / m["teacher_temperature"]
        gen, rng = window_generators(m["seed"], u, k, torch.device("cpu"))
        r_ids, r_w, _, r_sizes = sample_allocated(logits, R, CEILING, gen,
                                                  chunk_size=m["sampler_chunk"], sentinel=S)
        r_codes = book.encode(r_w.numpy(), rng)
        np.testing.assert_array_equal(counts, r_sizes.numpy(), err_msg=f"counts of {key}")
        np.testing.assert_array_equal(ids, r_ids.numpy(), err_msg=f"ids of {key}")
        np.testing.assert_array_equal(codes, np.where(ids == S, 0, r_codes),
                                      err_msg=f"codes of {key}")
        p = torch.softmax(logits.double(), -1)
        dense_h = -torch.where(p > 0, p * torch.log(p), 0.0).sum(-1).numpy()
        h = np.asarray(m["entropy_codebook"])[ecodes]
        assert np.abs(h - dense_h).max() <= m["entropy_max_error"] + 1e-5, key
        top = torch.sort(p, dim=1, descending=True).values[:, :CEILING]
        curves = cb.variance_curves(top, (p * p).sum(-1), CEILING).numpy()
        gains = np.maximum(curves[:, :-1] - curves[:, 1:], 0.0)      # gain of record k+1
        c = counts
        nxt = np.where(c < CEILING, gains[np.arange(T), np.minimum(c, CEILING - 1) - 1], -np.inf)
        last = np.where(c > 1, gains[np.arange(T), np.maximum(c, 2) - 2], np.inf)
        worst = max(worst, float(nxt.max() - last.min()))
    assert worst <= 1e-6, f"a position's next record gains {worst:.3g} more than another's last"


def test_inspect_cache_verifies_and_reports_the_allocation(alloc):
    m = alloc.m
    proc = run_inspect(alloc.out, "--verify", "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    assert rep["verify"]["ok"] and not rep["verify"]["bad_shards"]
    d = rep["distinct"]
    positions = len(alloc.samples) * T
    nonempty = np.concatenate([(ids != m["sentinel"]).sum(1) for _, ids, _, _ in
                               alloc.decoded.values()])
    total = sum(int(c.sum()) for c, _, _, _ in alloc.decoded.values())
    sentinels = sum(int((ids[np.arange(CEILING)[None, :] < c[:, None]] == m["sentinel"]).sum())
                    for c, ids, _, _ in alloc.decoded.values())
    assert total == len(alloc.samples) * R
    assert d["allocated"] is True and len(d["hist"]) == CEILING + 1
    assert sum(d["hist"]) == d["positions"] == positions == rep["positions"]
    assert d["hist"] == np.bincount(nonempty, minlength=CEILING + 1).tolist()
    assert d["mean"] * positions == pytest.approx(total - sentinels, rel=1e-12)
    assert (d["min"], d["max"]) == (int(nonempty.min()), int(nonempty.max()))
    assert rep["record_bytes_per_position"] == (2 * T + 3 * R) / T
    s = rep["settings"]
    assert (s["class_budget"], s["window_records"], s["num_classes"]) == (BUDGET, R, CEILING)
    table = run_inspect(alloc.out)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "records per position U_t" in table.stdout and "--class-budget 5.5" in table.stdout


def test_identical_windows_get_identical_counts_and_their_own_draws(alloc):
    """U_t is a function of the teacher's probabilities, not of the draws: the units of the
    two identical files hold the same windows, with the same count (and entropy) bytes but
    records drawn from their own (unit, window) streams."""
    by_tokens: dict[bytes, list[str]] = {}
    for key, e in sorted(alloc.samples.items()):
        by_tokens.setdefault(e["tokens.u32"], []).append(key)
    pairs = [(a, b) for g in by_tokens.values() for i, a in enumerate(g) for b in g[i + 1:]
             if parse_key(a)[0] != parse_key(b)[0]]
    assert len(pairs) >= 2, "the twin files should give windows of the same tokens"
    for a, b in pairs:
        ca, ids_a, codes_a, ea = alloc.decoded[a]
        cb_, ids_b, codes_b, eb = alloc.decoded[b]
        np.testing.assert_array_equal(ca, cb_, err_msg=f"counts of {a} and {b}")
        np.testing.assert_array_equal(ea, eb, err_msg=f"entropy bytes of {a} and {b}")
        assert not (np.array_equal(ids_a, ids_b) and np.array_equal(codes_a, codes_b)), \
            f"{a} and {b} hold the same draws"


def test_a_rerun_with_other_batches_writes_the_same_bytes(env, alloc, tmp_path):
    out = tmp_path / "again"
    cache_main([*alloc.args, "--batch-size", "3", "--out", str(out)])

    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}

    first, again = digests(alloc.out), digests(out)
    assert len(first) >= 5 and again == first
    assert [(s["file"], s["sha256"]) for s in manifest_of(out)["shards"]] == \
        [(s["file"], s["sha256"]) for s in alloc.m["shards"]]


# -- refused before anything is written --------------------------------------------------------

REFUSED = [
    (["--class-budget", "0.5"], "--class-budget 0.5 must be in [1, 2] (the floor of 1 record(s) "
                                "a position and the ceiling of 2)"),
    (["--class-budget", "30", "--class-ceiling", "20"],
     "--class-budget 30.0 must be in [1, 20] (the floor of 1 record(s) a position and the "
     "ceiling of 20)"),
    (["--class-budget", "300"], "--class-budget 300.0 must be in [1, 255] (the floor of 1 "
                                "record(s) a position and the ceiling of 255)"),
    (["--class-budget", "12", "--class-ceiling", "300"],
     "--class-ceiling 300 must be in [1, 255] (a position's count is one byte)"),
    (["--class-budget", "12", "--sampler", "topk"],
     "--class-budget allocates priority samples only; --sampler topk keeps a fixed U (use "
     "--num-classes)"),
    (["--class-budget", "12", "--data-format", "chat"],
     "--class-budget applies to text caches; a chat cache keeps a fixed U (--num-classes)"),
    (["--class-ceiling", "20"], "--class-ceiling 20 applies with --class-budget"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_bad_budgets_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys,
                                                                          flags, message):
    """As `python -m pipeline.cache` runs main (pipeline/cache.py): the configuration error
    on stderr, no traceback, exit status 1, no cache directory."""
    from pipeline.common.errors import clean_errors

    out = tmp_path / "c"
    argv = ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data.jsonl"),
            "--out", str(out), "--seq-len", str(T), *flags]
    with pytest.raises(SystemExit) as e:
        with clean_errors("pipeline.cache"):
            cache_main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["pipeline.cache: error: invalid cache configuration:", f"  - {message}"], err
    assert not out.exists()


def test_the_command_line_refuses_a_budget_below_the_floor(tmp_path):
    out = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cache", "--teacher", str(tmp_path / "t"),
                        "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
                        "--class-budget", "0.5"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "pipeline.cache: error: invalid cache configuration:",
        "  - --class-budget 0.5 must be in [1, 2] (the floor of 1 record(s) a position and the "
        "ceiling of 2)"], r.stderr[-2000:]
    assert not out.exists()
