"""Stage 1 (pipeline.cache, format version 2: work units and a ledger) end to end on tiny
real teachers, one rank in process: the reference cache against independent references
(tests/cache_stage.py: shards read with `tarfile`, records unpacked by hand, windows
re-tokenized, records recomputed from the teacher's full HF forward), --max-windows, the
per-window random streams, V = 151,665 (18 id bits) and the storage at T = 2,048.

Several ranks under mpiexec: tests/test_cache_mpi.py; restarts, damage and bad input:
tests/test_cache_resume.py. The T=2048 storage test is marked `slow`.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from cache_stage import env, ref1  # noqa: F401  (fixtures)
from cache_stage import (CORPUS, SHARD_RE, T, U, big_tokenizer, cache_args, check_cache,
                         check_rank_counts, decode_kd, full_logits, launch_info, load_model,
                         main_args, make_docs, manifest_of, parse_key, read_shards, recompute,
                         unit_documents, write_jsonl)
from pipeline.stage1_cache.run import main as cache_main
from references import reference_windows


# The fixtures `env` (the tiny teacher and corpus) and `ref1` (the one-rank reference cache)
# come from cache_stage, built once per session.


# -- one rank: the reference cache against the independent references ---------------------------

def test_one_rank_cache_matches_the_references(env, ref1):
    """Units partition the corpus; every window of every unit is present once with the
    per-document tokens of the unit's own documents; all records recompute from the
    teacher; the dropped padded mass equals the full forward's; per-unit counts and the
    rank's reading counts equal the reference."""
    out, plan, expected = ref1["out"], ref1["plan"], ref1["expected"]
    m = manifest_of(out)
    V = len(env["tok"])
    assert m["format_version"] == 2 and m["vocab_size"] == V and V < 4096
    assert m["teacher_logits"] == 4096 and (m["id_bits"], m["w_bits"]) == (V.bit_length(),
                                                                          24 - V.bit_length())
    # The units partition the corpus: in file order, every document exactly once.
    assert [f["path"] for f in plan["files"]] == sorted(CORPUS)
    n_units = len(plan["units"])
    assert n_units >= 40 and len(m["units"]) == n_units
    all_docs = [d for name in sorted(CORPUS) for d in env["docs"][name]]
    assert [d for u in range(n_units) for d in expected[u]["docs"]] == all_docs
    assert sum(e["bytes"] for e in expected.values()) == sum(
        (env["data"] / f).stat().st_size for f in CORPUS)
    assert {plan["files"][x["file"]]["path"] for x in plan["units"]} == set(CORPUS)
    n_windows = sum(len(e["windows"]) for e in expected.values())
    assert n_windows >= 120, n_windows
    samples = check_cache(out, expected, model=env["model"], recompute_every=1)
    # Shards: at most --shard-samples windows, in window order, named for unit and launch 1.
    for s in m["shards"]:
        u, launch, n = (int(x) for x in SHARD_RE.fullmatch(s["file"]).groups())
        assert launch == 1 and s["unit"] == u and 1 <= s["samples"] <= 2
        keys = sorted(k for k, e in samples.items() if e["file"] == s["file"])
        assert [parse_key(k)[1] for k in keys] == s["windows"] == \
            list(range(2 * n, 2 * n + s["samples"]))
    for x in m["units"]:
        e = expected[x["unit"]]
        assert (x["documents"], x["tokens"], x["sha256"]) == (e["documents"], e["tokens"],
                                                             e["sha256"]), x
        assert (x["launch"], x["rank"]) == (1, 0)
    check_rank_counts(m, expected)
    assert m["world_size"] == 1 and list(m["launches"]) == ["1"]
    # Dropped mass: what the teacher's softmax over all 4096 logits puts beyond V.
    dropped = sum(float(torch.softmax(full_logits(env["model"], np.frombuffer(
        e["tokens.u32"], dtype="<u4")).double(), -1)[:, V:].sum()) for e in samples.values())
    assert dropped > 0
    assert m["stats"]["dropped_mass_sum"] == pytest.approx(dropped, rel=1e-4)
    assert launch_info(out, 1)["status"] == "finished"


def test_max_windows_takes_the_first_windows_in_unit_order(env, ref1, tmp_path):
    """--max-windows N: the unit plan is cut after the unit holding window N (in unit
    order) and that unit is cached up to it; the records are the full cache's."""
    expected = ref1["expected"]
    counts = [len(expected[u]["windows"]) for u in range(len(expected))]
    n_full = next(i for i in range(len(counts)) if sum(counts[:i + 1]) >= 8 and counts[i] >= 2)
    n = sum(counts[:n_full]) + 1                   # one window into unit n_full
    out = tmp_path / "c"
    cache_main(main_args(env, out, "--max-windows", str(n), "--batch-size", "2"))
    m = manifest_of(out)
    assert [x["unit"] for x in m["units"]] == list(range(n_full + 1))
    want = {u: dict(expected[u]) for u in range(n_full + 1)}
    want[n_full]["windows"] = expected[n_full]["windows"][:1]
    check_cache(out, want, reference=ref1["samples"])
    assert m["samples"] == n and m["max_windows"] == n


def test_identical_windows_get_their_own_draws_and_a_rerun_the_same(env, tmp_path):
    """Records are drawn from a stream of their own (unit, window): two units holding the same
    text (two copies of one file), and windows of one unit holding the same tokens (one
    document repeated), get other sampled classes and weights, from the same teacher
    distribution; every (unit, window) is byte-identical in a second run with other batches.
    Compared on the records decoded by hand (decode_kd), not on a recomputation with the
    stage's own generators (which would pass if every window shared one stream)."""
    doc = "the teacher answers because the quick brown fox jumps over the lazy dog 42"
    data = tmp_path / "corpus"
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(data / name, [doc] * 80)
    size = (data / "a.jsonl").stat().st_size
    unit_bytes = size + size // 2                  # one file fits a unit, the two do not
    outs = {bs: tmp_path / f"batch{bs}" for bs in (3, 1)}
    for bs, out in outs.items():
        cache_main(cache_args(env["teacher"], data, out, "--unit-bytes", str(unit_bytes),
                              "--shard-samples", "4", "--batch-size", str(bs)))
    plan = json.loads((outs[3] / "units.json").read_text())
    assert [(u["file"], u["last_file"]) for u in plan["units"]] == [(0, 0), (1, 1)], plan["units"]
    m = manifest_of(outs[3])
    assert (m["sampler"], m["num_classes"]) == ("priority", U)
    samples, again = read_shards(outs[3]), read_shards(outs[1])
    # The same (unit, window): the same bytes, whatever the batches.
    assert sorted(again) == sorted(samples)
    for key, e in samples.items():
        assert again[key]["tokens.u32"] == e["tokens.u32"], key
        assert again[key]["kd.bin"] == e["kd.bin"], f"{key}: another draw in a rerun"

    tokens = {parse_key(k): e["tokens.u32"] for k, e in samples.items()}
    records = {parse_key(k): decode_kd(e["kd.bin"], m) for k, e in samples.items()}
    by_tokens: dict[bytes, list[tuple[int, int]]] = {}
    for uk in sorted(tokens):
        by_tokens.setdefault(tokens[uk], []).append(uk)
    pairs = [(a, b) for g in by_tokens.values() for i, a in enumerate(g) for b in g[i + 1:]]
    n = len(reference_windows([doc] * 80, env["tok"], T))
    assert sorted(uk for uk in tokens) == [(u, k) for u in (0, 1) for k in range(n)]
    assert {((0, k), (1, k)) for k in range(n)} <= set(pairs)      # unit 1 repeats unit 0
    assert any(a[0] == b[0] for a, b in pairs), "no two windows of one unit hold the same tokens"
    sentinel = (1 << m["id_bits"]) - 1
    for a, b in pairs:
        (ids_a, w_a, h_a), (ids_b, w_b, h_b) = records[a], records[b]
        # same tokens, same teacher: the same distributions (entropy bytes within one step)...
        assert np.abs(h_a - h_b).max() <= 2 * m["entropy_max_error"] + 1e-6, (a, b)
        # ...from which other classes were drawn: the sets differ at most positions (all
        # but a few here, U = 12 of a few hundred classes; one shared stream: none)
        set_a = [set(r[r != sentinel].tolist()) for r in ids_a]
        set_b = [set(r[r != sentinel].tolist()) for r in ids_b]
        differ = sum(x != y for x, y in zip(set_a, set_b))
        assert differ >= T // 2, f"windows {a} and {b}: {T - differ} of {T} positions drew the same classes"
        assert not np.array_equal(w_a, w_b), f"windows {a} and {b}: the same weights"
    assert len({e["kd.bin"] for e in samples.values()}) == len(samples)


# -- V = 151,665 (18 id bits) ---------------------------------------------------------------------

def test_qwen_vocab_ids_above_17_bits_round_trip(tmp_path, env):
    """Qwen2.5's shape: 151,936 logits over a tokenizer of 151,665 tokens. V = 151,665 needs
    the 18th id bit for ids >= 131,072 (the research code masked them); the 271 padded
    logits are dropped (records never name them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.demo.tiny import tiny_config

    n_logits, V, high = 151_936, 151_665, 131_072
    teacher = tmp_path / "qwen"
    tok = big_tokenizer(V)
    assert len(tok) == V
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", n_logits, hidden=32, layers=1,
                                                         heads=4, eos_token_id=0))
    with torch.no_grad():   # favour ids >= 2**17 (and the padding): large random logits
        head = model.get_output_embeddings().weight
        g = torch.Generator().manual_seed(0)
        head[high:] = torch.randn(n_logits - high, head.shape[1], generator=g) * 2.0
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(teacher)         # what the stage loads: Qwen2Tokenizer
    ids = tok("naïve", add_special_tokens=False)["input_ids"]
    assert len(tok) == V and len(ids) == 6 and max(ids) < 257 and tok.decode(ids) == "naïve"
    data = write_jsonl(tmp_path / "corpus.jsonl", make_docs(20, seed=11))
    out = tmp_path / "cache"
    cache_main(cache_args(teacher, data, out, "--max-windows", "3"))
    m = manifest_of(out)
    assert (m["vocab_size"], m["teacher_logits"], m["id_bits"], m["w_bits"]) == (V, n_logits, 18, 6)
    samples = read_shards(out)
    assert sorted(samples) == [f"u0000000-w{k:07d}" for k in range(3)]
    model = load_model(teacher)
    docs, _ = unit_documents(data, json.loads((out / "units.json").read_text()), 0)
    ref = reference_windows(docs, tok, T)
    n_high = 0
    for key, e in samples.items():
        u, k = parse_key(key)
        tokens = np.frombuffer(e["tokens.u32"], dtype="<u4")
        np.testing.assert_array_equal(tokens, ref[k])
        ids, weights, entropy = decode_kd(e["kd.bin"], m)
        r_ids, r_w, r_h, _, _ = recompute(model, tokens, u, k, m)
        np.testing.assert_array_equal(ids, r_ids)
        np.testing.assert_array_equal(weights, r_w)
        np.testing.assert_array_equal(entropy, r_h)
        n_high += int((ids >= high).sum())
        assert ids.max() < V, "a record names a padded logit"
    assert n_high >= 0.5 * 3 * T * U, f"only {n_high} records with ids >= {high}"
    assert m["stats"]["dropped_mass_max"] > 0
    # The reader returns the same high ids.
    from pipeline.cache_format.reader import CacheReader

    batch = next(CacheReader(out, micro_batch=3, shuffle_buffer=0).batches(0))
    for b, key in enumerate(batch.keys):
        ids, _, _ = decode_kd(samples[key]["kd.bin"], m)
        np.testing.assert_array_equal(batch.ids[b].numpy(), ids)


# -- storage at T = 2048 ---------------------------------------------------------------------------

@pytest.mark.slow
def test_storage_at_2048_tokens_is_within_3_percent_of_41_bytes(env, tmp_path):
    """37 B of records + 4 B of token per position; tar headers (512 B per member) and the
    end-of-archive padding (blocks of 10,240 B) are the overhead. Measured: 16 windows in
    one shard = 1,361,920 B = 41.5625 B/position (+1.37%); before mtime=0 was an int, a PAX
    header per member made it 1,402,880 B = 42.81 B/position (+4.4%). The sampler does not
    change the size (always U records per position): topk keeps the test fast."""
    seq_len, windows = 2048, 16
    docs = make_docs(1500, seed=5)
    data = write_jsonl(tmp_path / "big.jsonl", docs)
    assert len(reference_windows(docs, env["tok"], seq_len)) >= windows
    out = tmp_path / "c"
    cache_main(["--teacher", str(env["teacher"]), "--data", str(data), "--out", str(out),
                "--seq-len", str(seq_len), "--num-classes", "12", "--max-windows", str(windows),
                "--sampler", "topk", "--shard-samples", str(windows)])
    m = manifest_of(out)
    positions = windows * seq_len
    on_disk = sum(f.stat().st_size for f in out.glob("*.tar"))
    assert m["positions"] == positions and m["bytes"] == on_disk
    assert m["bytes_per_position"] == 37
    per_position = on_disk / positions
    assert per_position <= (37 + 4) * 1.03, f"{per_position:.4f} B/position"
    # Every member has exactly one 512 B header (no PAX/GNU extension headers).
    with tarfile.open(next(out.glob("*.tar"))) as tf:
        assert all(m.offset_data - m.offset == 512 for m in tf.getmembers())
    print(f"storage: {on_disk} B for {positions} positions = {per_position:.4f} B/position "
          f"({per_position / 41 - 1:+.2%} over 41)")


def test_a_cache_written_before_sampler_chunk_was_recorded_resumes_only_with_its_value():
    """The sampler's draws depend on its chunk; old headers lack the key and used 2048."""
    from pipeline.cache_format.manifest import header_diff

    old = {"sampler": "priority", "seed": 0}                       # no sampler_chunk
    assert header_diff(old, {**old, "sampler_chunk": 2048}) == []
    diff = header_diff(old, {**old, "sampler_chunk": 64})
    assert len(diff) == 1 and "sampler_chunk: cache has 2048, this run has 64" in diff[0], diff
