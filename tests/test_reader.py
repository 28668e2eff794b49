"""pipeline.cache_format.reader.CacheReader on a real cache written by pipeline.cache (tiny teacher).

References are independent of the reader: shards are read with `tarfile` and the 24-bit
records unpacked by hand with the manifest's codebooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache_format.reader import CacheReader, ShardError
from references import move_shard_outside

T = 64
WINDOWS = 23          # shards of 3: 7 full shards and one of 2 (unequal shards on purpose)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "42", "answer", "question", "because"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from pipeline.stage1_cache.run import main as cache_main
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("reader")
    teacher = build_tiny_model(root / "teacher", vocab_size=4096, hidden=32, layers=1)
    rng = np.random.default_rng(0)
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(150):
            doc = " ".join(rng.choice(WORDS, int(rng.integers(1, 50))))
            f.write(json.dumps({"text": doc}) + "\n")
    out = root / "cache"
    cache_main(["--teacher", str(teacher), "--data", str(root / "corpus.jsonl"), "--out", str(out),
                "--seq-len", str(T), "--max-windows", str(WINDOWS), "--shard-samples", "3"])
    return out


def manifest_of(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def reference(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> tokens, ids, weights, entropy, decoded by hand from the tar files."""
    m = manifest_of(cache)
    U, id_bits = m["num_classes"], m["vocab_size"].bit_length()
    wl = np.asarray(m["weight_codebook"], dtype=np.float32)
    el = np.asarray(m["entropy_codebook"], dtype=np.float32)
    out: dict[str, dict] = {}
    for shard in sorted(cache.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for mem in tf.getmembers():
                key, ext = mem.name.split(".", 1)
                out.setdefault(key, {"shard": shard.name})[ext] = tf.extractfile(mem).read()
    for key, s in out.items():
        s["tokens"] = np.frombuffer(s.pop("tokens.u32"), dtype="<u4").astype(np.int64)
        a = np.frombuffer(s.pop("kd.bin"), dtype=np.uint8).reshape(T, 3 * U + 1).astype(np.int64)
        rec = a[:, 0:3 * U:3] + (a[:, 1:3 * U:3] << 8) + (a[:, 2:3 * U:3] << 16)
        s["ids"] = rec & ((1 << id_bits) - 1)
        s["weights"] = wl[rec >> id_bits]
        s["entropy"] = el[a[:, 3 * U]]
    return out


def epoch_keys(reader: CacheReader, epoch: int, skip: int = 0) -> list[list[str]]:
    return [b.keys for b in reader.batches(epoch, skip=skip)]


def test_batches_equal_the_shards_decoded_by_hand(cache):
    ref = reference(cache)
    assert len(ref) == WINDOWS
    reader = CacheReader(cache, micro_batch=2, seed=3)
    seen = []
    for b in reader.batches(0):
        assert b.input_ids.shape == (2, T) and b.input_ids.dtype == torch.int64
        assert b.ids.shape == b.weights.shape == (2, T, 12) and b.entropy.shape == (2, T)
        assert b.ids.dtype == torch.int64 and b.weights.dtype == b.entropy.dtype == torch.float32
        for i, key in enumerate(b.keys):
            r = ref[key]
            np.testing.assert_array_equal(b.input_ids[i].numpy(), r["tokens"])
            np.testing.assert_array_equal(b.ids[i].numpy(), r["ids"])
            np.testing.assert_array_equal(b.weights[i].numpy(), r["weights"])
            np.testing.assert_array_equal(b.entropy[i].numpy(), r["entropy"])
        seen += b.keys
    assert len(seen) == reader.steps_per_epoch(0) * 2 == (WINDOWS // 2) * 2
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("world,micro_batch", [(2, 1), (2, 2), (3, 2), (2, 3)])
def test_epoch_plan_equal_steps_and_no_window_twice(cache, world, micro_batch):
    readers = [CacheReader(cache, r, world, micro_batch=micro_batch, seed=5, shuffle_buffer=8)
               for r in range(world)]
    shard_of = {k: s["shard"] for k, s in reference(cache).items()}
    for epoch in range(4):
        steps = {r.steps_per_epoch(epoch) for r in readers}
        assert len(steps) == 1, f"epoch {epoch}: steps differ across ranks: {steps}"
        (n,) = steps
        assert n >= 1
        keys = [epoch_keys(r, epoch) for r in readers]
        assert [len(k) for k in keys] == [n] * world, "a rank ran a different number of steps"
        flat = [k for rank in keys for batch in rank for k in batch]
        assert all(len(batch) == micro_batch for rank in keys for batch in rank)
        assert len(set(flat)) == len(flat), f"epoch {epoch}: a window was used twice"
        # Ranks take contiguous blocks of the epoch's window sequence: together they touch
        # at most every shard once plus one shared boundary shard per pair of neighbours.
        shards = [{shard_of[k] for batch in rank for k in batch} for rank in keys]
        assert sum(map(len, shards)) <= len(set(shard_of.values())) + world - 1


def test_skip_yields_exactly_the_tail(cache):
    reader = CacheReader(cache, 1, 2, micro_batch=2, seed=1, shuffle_buffer=16)
    full = list(reader.batches(2))
    assert len(full) == reader.steps_per_epoch(2) >= 3
    for k in (0, 1, len(full) - 1, len(full), len(full) + 3):
        tail = list(reader.batches(2, skip=k))
        assert [b.keys for b in tail] == [b.keys for b in full[k:]]
        for a, b in zip(tail, full[k:]):
            assert (a.ids == b.ids).all() and (a.weights == b.weights).all()
            assert (a.input_ids == b.input_ids).all() and (a.entropy == b.entropy).all()


def test_orders_are_deterministic_and_differ_between_epochs(cache):
    reader = CacheReader(cache, micro_batch=1, seed=0, shuffle_buffer=8)
    e0, e0_again, e1 = epoch_keys(reader, 0), epoch_keys(reader, 0), epoch_keys(reader, 1)
    assert e0 == e0_again
    assert e0 != e1 and sorted(e0) == sorted(e1)       # every window, another order
    assert epoch_keys(CacheReader(cache, micro_batch=1, seed=1, shuffle_buffer=8), 0) != e0


def _broken_copy(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    return bad, bad / manifest_of(bad)["shards"][2]["file"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing"])
def test_damaged_shard_raises_shard_error_naming_it(cache, tmp_path, damage):
    bad, shard = _broken_copy(cache, tmp_path)
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[:len(data) // 2])
        expect = "truncated"
    elif damage == "flip":
        data[2000:2008] = bytes(255 - x for x in data[2000:2008])   # inside the first kd.bin
        shard.write_bytes(bytes(data))
        expect = "sha256 mismatch"
    else:
        shard.unlink()
        expect = "cannot read"
    damaged_keys = {k for k, s in reference(cache).items() if s["shard"] == shard.name}
    reader = CacheReader(bad, micro_batch=1, shuffle_buffer=0)
    got: list[str] = []
    with pytest.raises(ShardError, match=expect) as e:
        for b in reader.batches(0):
            got += b.keys
    assert str(shard) in str(e.value)
    assert not damaged_keys & set(got), "samples of the damaged shard were yielded"


def test_bad_records_without_verification_are_still_caught(cache, tmp_path):
    """verify=False skips the hash; records with an id outside V are then still refused."""
    bad, shard = _broken_copy(cache, tmp_path)
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        kd = next(m for m in tf.getmembers() if m.name.endswith(".kd.bin"))
    # The first record's 3 bytes -> id = 2**id_bits - 2 (>= V, not the sentinel).
    m = manifest_of(bad)
    rec = (2 ** m["id_bits"] - 2).to_bytes(3, "little")
    data[kd.offset_data:kd.offset_data + 3] = rec
    shard.write_bytes(bytes(data))
    reader = CacheReader(bad, micro_batch=1, shuffle_buffer=0, verify=False)
    with pytest.raises(ShardError, match=f"ids outside V={m['vocab_size']}") as e:
        for _ in reader.batches(0):
            pass
    assert shard.name in str(e.value)


def test_check_student_names_both_sides(cache, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.demo.tiny import train_tokenizer

    m = manifest_of(cache)
    reader = CacheReader(cache)
    teacher_tok = AutoTokenizer.from_pretrained(m["teacher"])
    V = m["vocab_size"]                       # the tokenizer's classes (the teacher pads to 4096)
    assert V == len(teacher_tok) < 4096
    reader.check_student(teacher_tok, 4096)   # the teacher's own logits (padded): fine
    reader.check_student(teacher_tok, V)      # exactly V: fine
    with pytest.raises(ValueError, match=rf"cache V={V}, student V={V - 1}"):
        reader.check_student(teacher_tok, V - 1)
    other = train_tokenizer(["a completely different corpus of words"] * 4, vocab_size=300)
    other.save_pretrained(tmp_path / "student")
    other = AutoTokenizer.from_pretrained(tmp_path / "student")
    with pytest.raises(ValueError, match="tokenizer fingerprint") as e:
        reader.check_student(other, 4096)
    msg = str(e.value)
    assert m["tokenizer_fingerprint"][:16] in msg and m["teacher"] in msg
    assert str(tmp_path / "student") in msg


def test_unreadable_caches_are_refused(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json does not exist"):
        CacheReader(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="the cache run did not finish"):
        CacheReader(partial)
    n = len(manifest_of(cache)["shards"])        # more ranks than shards: read inside shards
    assert CacheReader(cache, 0, n + 1).steps_per_epoch(0) == WINDOWS // (n + 1)


# -- hostile or damaged manifests and shards (issue 16) -------------------------------------------

_OPENED: list[str] = []
_WATCHED: list[str] = []
_AUDIT_INSTALLED: list = []


def _audit_open(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if any(w in path for w in _WATCHED):
            _OPENED.append(path)


@pytest.fixture
def opened():
    """Paths opened (Python's `open` audit event) under the folders appended to the
    returned watch list, collected until the test ends."""
    if _audit_open not in _AUDIT_INSTALLED:       # audit hooks cannot be removed: add once
        sys.addaudithook(_audit_open)
        _AUDIT_INSTALLED.append(_audit_open)
    _OPENED.clear()
    yield _WATCHED, _OPENED
    _WATCHED.clear()
    _OPENED.clear()


def _move_shard_outside(cache: Path, tmp_path: Path, entry: str) -> tuple[Path, Path, str]:
    """The cache with its third shard moved outside it (tests/references.py)."""
    return move_shard_outside(cache, tmp_path, 2, entry)


@pytest.mark.parametrize("entry", ["relative", "absolute"])
def test_shard_outside_the_cache_dir_is_refused_before_it_is_opened(cache, tmp_path, entry,
                                                                    opened):
    """A manifest entry `../outside/x.tar` or `/abs/x.tar` is refused when the reader is
    built, although the file it names is a real shard with the manifest's sha256."""
    bad, target, name = _move_shard_outside(cache, tmp_path, entry)
    watched, seen = opened
    watched.append(str(target.parent))
    with pytest.raises(ValueError) as e:
        CacheReader(bad, micro_batch=1)
    msg = str(e.value)
    assert str(bad / "manifest.json") in msg, msg            # the manifest
    assert repr(name) in msg, msg                             # the entry
    assert "plain file name in the cache directory" in msg, msg   # the rule
    assert seen == [], f"opened outside the cache: {seen}"
    target.read_bytes()                                       # the watch does see an open
    assert seen == [str(target)]


def test_token_id_outside_v_raises_shard_error_naming_it(cache, tmp_path):
    """A token id >= V in a shard whose manifest sha256 and size match (so only a token
    check can catch it) raises ShardError naming the shard, the sample, the id and V."""
    bad, shard = _broken_copy(cache, tmp_path)
    m = manifest_of(bad)
    V = m["vocab_size"]
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tf:
        mem = next(x for x in tf.getmembers() if x.name.endswith(".tokens.u32"))
    key = mem.name.split(".", 1)[0]
    off = mem.offset_data + 4 * 5                       # position 5 of the first window
    data[off:off + 4] = (V + 7).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    for s in m["shards"]:
        if s["file"] == shard.name:
            s["sha256"], s["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (bad / "manifest.json").write_text(json.dumps(m))
    reader = CacheReader(bad, micro_batch=1, shuffle_buffer=0)
    with pytest.raises(ShardError) as e:
        for _ in reader.batches(0):
            pass
    msg = str(e.value)
    for part in (str(shard), f"sample {key}", f"token id {V + 7}", f"V={V}", "re-cache"):
        assert part in msg, f"{part!r} not in {msg!r}"


# -- any number of training ranks (issue 10, item 5) ----------------------------------------------
# Ranks take windows inside shards: a cache is read by up to as many ranks as it has windows.
# The references are independent of the plan: the windows decoded by hand from the tar files
# (`reference`), and the files the reader really opens (Python's `open` audit event).


@pytest.fixture(scope="module")
def few_shards(cache) -> dict[str, Path]:
    """{"one": 9 windows in 1 shard, "three": 14 windows in 3 shards of 5, 5, 4}, written by the
    real stage with the `cache` fixture's teacher and corpus."""
    from pipeline.stage1_cache.run import main as cache_main

    m = manifest_of(cache)
    out = {}
    for name, windows, per_shard, shards in (("one", 9, 16, 1), ("three", 14, 5, 3)):
        out[name] = cache.parent / f"cache_{name}"
        cache_main(["--teacher", m["teacher"], "--data", str(cache.parent / "corpus.jsonl"),
                    "--out", str(out[name]), "--seq-len", str(T), "--max-windows", str(windows),
                    "--shard-samples", str(per_shard)])
        mm = manifest_of(out[name])
        assert len(mm["shards"]) == shards and len(reference(out[name])) == windows == mm["samples"]
    return out


def _cache_of(name, cache, few_shards) -> Path:
    return cache if name == "eight" else few_shards[name]


# (cache, world, micro_batch): 1 shard on 2 ranks, 3 shards on 4, more ranks than shards,
# as many ranks as windows (1 each), and a world that divides nothing evenly.
PLANS = [("one", 2, 1), ("one", 2, 2), ("one", 9, 1), ("three", 4, 1), ("three", 4, 2),
         ("three", 14, 1), ("eight", 5, 2), ("eight", 11, 1), ("eight", 3, 3)]


@pytest.mark.parametrize("name,world,micro_batch", PLANS)
def test_any_world_up_to_the_window_count_partitions_every_epoch(cache, few_shards, name, world,
                                                                 micro_batch):
    c = _cache_of(name, cache, few_shards)
    ref = reference(c)
    N = len(ref)
    readers = [CacheReader(c, r, world, micro_batch=micro_batch, seed=7, shuffle_buffer=4)
               for r in range(world)]
    steps = N // world // micro_batch
    assert steps >= 1
    used_ever: set[str] = set()
    for epoch in range(4):
        assert {r.steps_per_epoch(epoch) for r in readers} == {steps}
        per_rank = [list(r.batches(epoch)) for r in readers]
        assert [len(b) for b in per_rank] == [steps] * world, "ranks ran different step counts"
        flat = []
        for batches in per_rank:
            for b in batches:
                assert len(b.keys) == micro_batch
                for i, key in enumerate(b.keys):      # the right window's data under its key
                    np.testing.assert_array_equal(b.input_ids[i].numpy(), ref[key]["tokens"])
                    np.testing.assert_array_equal(b.ids[i].numpy(), ref[key]["ids"])
                    np.testing.assert_array_equal(b.weights[i].numpy(), ref[key]["weights"])
                flat += b.keys
        assert len(set(flat)) == len(flat), f"epoch {epoch}: a window was used twice"
        assert set(flat) <= ref.keys()
        leftovers = ref.keys() - set(flat)
        assert len(flat) == world * steps * micro_batch
        assert len(leftovers) == N - world * steps * micro_batch < world * micro_batch
        used_ever |= set(flat)
    if world * micro_batch < N:      # leftovers wait for another epoch: no window starves
        assert used_ever == ref.keys()


def test_more_ranks_than_windows_run_no_step(few_shards):
    r = CacheReader(few_shards["one"], 3, 10, micro_batch=1)
    assert r.steps_per_epoch(0) == 0 and list(r.batches(0)) == []
    assert CacheReader(few_shards["one"], 0, 5, micro_batch=2).steps_per_epoch(0) == 0


@pytest.mark.parametrize("name,world", [("one", 2), ("three", 4)])
def test_order_is_a_pure_function_of_seed_epoch_rank_world(cache, few_shards, name, world):
    c = _cache_of(name, cache, few_shards)

    def order(rank, epoch=0, seed=0, w=world):
        return epoch_keys(CacheReader(c, rank, w, micro_batch=1, seed=seed, shuffle_buffer=3), epoch)

    for rank in range(world):
        assert order(rank) == order(rank)                          # fresh readers, same order
    base = [order(r) for r in range(world)]
    assert [order(r, epoch=1) for r in range(world)] != base
    assert [order(r, seed=1) for r in range(world)] != base
    assert order(0, w=world + 1) != base[0]


@pytest.mark.parametrize("name,world,micro_batch", [("one", 2, 2), ("three", 4, 1), ("eight", 3, 2)])
def test_skip_is_exactly_the_tail_on_every_rank(cache, few_shards, name, world, micro_batch):
    c = _cache_of(name, cache, few_shards)
    for rank in range(world):
        reader = CacheReader(c, rank, world, micro_batch=micro_batch, seed=2, shuffle_buffer=5)
        full = list(reader.batches(1))
        assert len(full) == reader.steps_per_epoch(1)
        for k in range(len(full) + 2):
            tail = list(reader.batches(1, skip=k))
            assert [b.keys for b in tail] == [b.keys for b in full[k:]]
            for a, b in zip(tail, full[k:]):
                assert (a.ids == b.ids).all() and (a.weights == b.weights).all()
                assert (a.input_ids == b.input_ids).all() and (a.entropy == b.entropy).all()


@pytest.mark.parametrize("name,world,micro_batch", [("one", 2, 1), ("three", 4, 1), ("eight", 3, 2),
                                                    ("eight", 5, 1)])
def test_a_rank_opens_only_the_shards_holding_its_windows(cache, few_shards, opened, name, world,
                                                          micro_batch):
    """Every shard a rank opens holds one of its windows and is opened once; all ranks
    together open at most every shard plus one boundary shard per pair of neighbours."""
    c = _cache_of(name, cache, few_shards)
    shard_of = {k: s["shard"] for k, s in reference(c).items()}
    n_shards = len(set(shard_of.values()))
    watched, seen = opened
    watched.append(str(c))
    total = 0
    for epoch in range(3):
        for rank in range(world):
            reader = CacheReader(c, rank, world, micro_batch=micro_batch, seed=4, shuffle_buffer=2)
            seen.clear()
            keys = [k for b in reader.batches(epoch) for k in b.keys]
            tars = [Path(p).name for p in seen if p.endswith(".tar")]
            assert len(tars) == len(set(tars)), f"rank {rank} opened a shard twice: {tars}"
            assert set(tars) == {shard_of[k] for k in keys}, f"rank {rank}: {tars}"
            total += len(tars)
        assert total <= n_shards + world - 1
        total = 0


def test_shard_holding_another_sample_count_than_the_manifest_is_refused(few_shards, tmp_path):
    """Without verification, the plan's sample counts are still checked against the tar."""
    bad = tmp_path / "cache"
    shutil.copytree(few_shards["three"], bad)
    m = manifest_of(bad)
    m["shards"][1]["samples"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    readers = [CacheReader(bad, r, 2, micro_batch=1, verify=False, shuffle_buffer=0) for r in range(2)]
    with pytest.raises(ShardError, match=f"{m['shards'][1]['file']}: 5 samples, manifest says 6"):
        for r in readers:
            for _ in r.batches(0):
                pass
    m["shards"][1]["samples"] = "5"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="no sample count"):
        CacheReader(bad)
