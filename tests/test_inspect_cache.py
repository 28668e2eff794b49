"""tools/inspect_cache.py's report on a real tiny cache of format version 2 (work units, the
ledger's done records; docs/CACHE_FORMAT.md): the storage numbers, the dropped mass, the
entropy and distinct-class statistics, the table, the manifest's layout against a decoder
written from the format doc alone, stray files, the plot and a missing manifest. Every
expected number is recomputed from the files themselves (tests/inspect_tool.py). --verify,
--quarantine and version-1 caches: tests/test_inspect_cache_verify.py."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inspect_tool import cache, stage  # noqa: F401  (fixtures)
from inspect_tool import (ROOT, SHARD_NAME, T, TEACHER_LOGITS, U, WINDOWS, SHARD_SAMPLES,
                          all_samples, decoded_records, read_json, run_tool, shard_files,
                          tar_samples, units_on_disk)


# The fixtures `stage` (the tiny cache and the stage's arguments) and `cache` (its directory)
# come from inspect_tool, built once per session.


def test_storage_numbers(stage):
    from transformers import AutoTokenizer

    cache = stage.cache
    m = json.loads((cache / "manifest.json").read_text())
    V = m["vocab_size"]
    # V is the tokenizer's class count, not the teacher's padded logits dimension
    assert V == len(AutoTokenizer.from_pretrained(stage.teacher)) < TEACHER_LOGITS
    rep = read_json(cache)
    on_disk = sum(os.stat(p).st_size for p in shard_files(cache))
    _, _, samples = decoded_records(cache, V)
    assert samples == WINDOWS
    assert rep["samples"] == WINDOWS
    assert rep["positions"] == WINDOWS * T
    # shards per unit from the file names and tar members: each unit's windows 0, 1, ...
    # in shards of SHARD_SAMPLES windows, the last one possibly shorter
    units = units_on_disk(cache)
    assert len(units) >= 3, "the fixture should cut the corpus into several units"
    for u, shards in units.items():
        keys = [k for _, ks in shards for k in ks]
        assert keys == [f"u{u:07d}-w{w:07d}" for w in range(len(keys))], (u, keys)
        assert [len(ks) for _, ks in shards[:-1]] == [SHARD_SAMPLES] * (len(shards) - 1)
        assert [int(SHARD_NAME.match(n).group(3)) for n, _ in shards] == list(range(len(shards)))
    assert any(len(shards) > 1 for shards in units.values()), "a unit with several shards"
    windows = [len([k for _, ks in shards for k in ks]) for shards in units.values()]
    assert sum(windows) == WINDOWS
    assert rep["shards"] == len(shard_files(cache)) == sum(-(-n // SHARD_SAMPLES) for n in windows)
    assert rep["bytes_on_disk"] == on_disk
    assert rep["missing_shards"] == [] and rep["stray_files"] == []
    bpp = on_disk / (WINDOWS * T)
    assert rep["bytes_per_position"] == pytest.approx(bpp, rel=1e-12)
    assert rep["record_bytes_per_position"] == 37
    assert rep["reduction_vs_bf16"] == pytest.approx(2 * V / bpp, rel=1e-12)
    assert rep["reduction_vs_fp32"] == pytest.approx(4 * V / bpp, rel=1e-12)
    assert rep["reduction_vs_top128"] == pytest.approx(128 * 6 / bpp, rel=1e-12)
    # tar overhead: everything that is not 37 B of records + 4 B of tokens per position
    payload = WINDOWS * T * (37 + 4)
    assert rep["tar_overhead_fraction"] == pytest.approx((on_disk - payload) / payload)
    s = rep["settings"]
    assert (s["sampler"], s["seq_len"], s["num_classes"], s["vocab_size"]) == ("rskd", T, U, V)
    assert (s["id_bits"], s["w_bits"]) == (V.bit_length(), 24 - V.bit_length())
    assert s["rskd_truncated_fraction"] == pytest.approx(
        m["stats"]["rskd_truncated_positions"] / (WINDOWS * T))
    assert s["teacher_logits"] == TEACHER_LOGITS


def test_dropped_mass_matches_the_teacher(stage):
    """The report's probability mass on the teacher's padded logits (>= V), recomputed here
    by running the teacher on the cached tokens: softmax(logits / 0.1) summed over the
    columns >= V, mean and max over every position."""
    import torch
    from transformers import AutoModelForCausalLM

    m = json.loads((stage.cache / "manifest.json").read_text())
    V = m["vocab_size"]
    tokens = np.stack([np.frombuffer(x["tokens.u32"], "<u4")
                       for x in all_samples(stage.cache).values()]).astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(stage.teacher, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(tokens)).logits.double() / 0.1
    assert logits.shape == (WINDOWS, T, TEACHER_LOGITS)
    dropped = torch.softmax(logits, -1)[..., V:].sum(-1)
    s = read_json(stage.cache)["settings"]
    assert dropped.mean().item() > 1e-6, "the fixture's padded logits should carry some mass"
    assert s["dropped_mass_mean"] == pytest.approx(dropped.mean().item(), rel=1e-4)
    assert s["dropped_mass_max"] == pytest.approx(dropped.max().item(), rel=1e-4)


def test_entropy_and_distinct_statistics(cache):
    m = json.loads((cache / "manifest.json").read_text())
    rep = read_json(cache)
    ec, distinct, _ = decoded_records(cache, m["vocab_size"])
    h = np.asarray(m["entropy_codebook"], dtype=np.float64)[ec]
    e = rep["entropy"]
    assert h.std() > 0.1, "the fixture should spread entropies (teacher temperature 0.1)"
    assert e["mean"] == pytest.approx(h.mean(), rel=1e-9)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):   # lower quantile = numpy's inverted_cdf
        assert e["quantiles"][f"p{round(q * 100):02d}"] == pytest.approx(
            np.quantile(h, q, method="inverted_cdf"), rel=1e-9)
    assert sum(e["hist_counts"]) == WINDOWS * T
    d = rep["distinct"]
    assert d["mean"] == pytest.approx(distinct.mean(), rel=1e-9)
    assert (d["min"], d["max"]) == (distinct.min(), distinct.max())
    assert d["fraction_padded"] == pytest.approx((distinct < U).mean())
    assert d["hist"] == np.bincount(distinct, minlength=U + 1).tolist()
    assert 0 < d["fraction_padded"] < 1, "the fixture should pad some positions, not all"


def test_table_output(cache):
    proc = run_tool(cache)
    assert proc.returncode == 0, proc.stderr
    # the fixture's padded logits carry ~0.1 of the mass (test_dropped_mass_matches_the_teacher)
    for word in ("bytes on disk", "reduction vs bf16", "entropy histogram", "rskd",
                 "dropped mass", "NOT about 0"):
        assert word in proc.stdout


def decode_as_documented(path: Path, m: dict) -> dict[str, dict]:
    """A decoder written from docs/CACHE_FORMAT.md alone: a POSIX tar, two members per
    sample `{key}.tokens.u32` (T uint32 LE) and `{key}.kd.bin` (T positions of 3U + 1 bytes:
    U records, then the entropy byte); record r = b0 | b1 << 8 | b2 << 16, id = r &
    (2**id_bits - 1) with id_bits = bit_length(vocab_size), weight code = r >> id_bits,
    weight = weight_codebook[code], entropy = entropy_codebook[byte]. Plain Python."""
    V, U_, T_ = m["vocab_size"], m["num_classes"], m["seq_len"]
    id_bits = V.bit_length()
    B = 3 * U_ + 1
    out: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, _, ext = member.name.partition(".")
            raw = tf.extractfile(member).read()
            sample = out.setdefault(key, {})
            if ext == "tokens.u32":
                assert len(raw) == 4 * T_
                sample["tokens"] = [int.from_bytes(raw[4 * t:4 * t + 4], "little")
                                    for t in range(T_)]
                continue
            assert ext == "kd.bin" and len(raw) == B * T_, (member.name, len(raw))
            ids, codes, weights, entropies = [], [], [], []
            for t in range(T_):
                pos = raw[t * B:(t + 1) * B]
                row = [pos[3 * k] | pos[3 * k + 1] << 8 | pos[3 * k + 2] << 16 for k in range(U_)]
                ids.append([r & (2 ** id_bits - 1) for r in row])
                codes.append([r >> id_bits for r in row])
                weights.append([m["weight_codebook"][r >> id_bits] for r in row])
                entropies.append(m["entropy_codebook"][pos[3 * U_]])
            sample |= {"ids": ids, "codes": codes, "weights": weights, "entropy": entropies}
    return out


def test_manifest_layout_and_a_decoder_written_from_the_format_doc(cache):
    """The manifest carries `layout` (the header's, describing the same key and record
    layout as docs/CACHE_FORMAT.md), and decode_as_documented, which knows only the doc and
    the manifest's fields, decodes every shard to the ids, weights and entropies that
    pipeline.cache_format.codec gives; the keys and the shard entries agree with the doc's naming."""
    from pipeline.cache_format.codec import RecordCodec

    m = json.loads((cache / "manifest.json").read_text())
    header = json.loads((cache / "header.json").read_text())
    doc = (ROOT / "docs" / "CACHE_FORMAT.md").read_text()
    layout = m["layout"]
    assert layout == header["layout"]
    assert {"container", "tokens.u32", "kd.bin", "record", "weight", "entropy",
            "classes"} <= set(layout)
    for phrase in ("u{unit:07d}-w{window:07d}", "b0 | b1 << 8 | b2 << 16"):
        assert phrase in doc and phrase in json.dumps(layout), phrase
    assert m["format_version"] == 2 and "version 2" in doc
    V, U_ = m["vocab_size"], m["num_classes"]
    id_bits = V.bit_length()
    assert (m["id_bits"], m["w_bits"], m["sentinel"]) == (id_bits, 24 - id_bits, 2 ** id_bits - 1)
    assert (m["bytes_per_position"], len(m["weight_codebook"]),
            len(m["entropy_codebook"])) == (3 * U_ + 1, 2 ** (24 - id_bits), 256)

    codec = RecordCodec(V, U_)
    wlevels = codec.weight_codebook().levels
    elevels = codec.entropy_codebook().levels
    assert np.array_equal(np.float32(m["weight_codebook"]), wlevels)
    assert np.array_equal(np.float32(m["entropy_codebook"]), elevels)
    assert [s["file"] for s in m["shards"]] == [p.name for p in shard_files(cache)]
    decoded_keys = []
    for s in m["shards"]:
        path = cache / s["file"]
        unit = int(SHARD_NAME.match(s["file"]).group(1))
        samples = decode_as_documented(path, m)
        keys = list(samples)
        decoded_keys += keys
        assert s["unit"] == unit and keys == [f"u{unit:07d}-w{w:07d}" for w in s["windows"]]
        assert (s["samples"], s["positions"]) == (len(keys), len(keys) * T)
        ref = tar_samples(path)
        for key, got in samples.items():
            ids, wc, ec = codec.unpack(ref[key]["kd.bin"])
            assert np.array_equal(np.array(got["ids"]), ids), key
            assert np.array_equal(np.array(got["codes"]), wc), key
            assert np.array_equal(np.float32(got["weights"]), wlevels[wc]), key
            assert np.array_equal(np.float32(got["entropy"]), elevels[ec]), key
            assert got["tokens"] == np.frombuffer(ref[key]["tokens.u32"], "<u4").tolist()
            # what the doc promises of every record: ids < V or the sentinel (weight code
            # 0), distinct within a position; tokens < V
            sentinel = 2 ** id_bits - 1
            for row_ids, row_codes in zip(got["ids"], got["codes"]):
                used = [i for i in row_ids if i != sentinel]
                assert all(i < V for i in used) and len(set(used)) == len(used)
                assert all(c == 0 for i, c in zip(row_ids, row_codes) if i == sentinel)
            assert max(got["tokens"]) < V
    assert len(decoded_keys) == len(set(decoded_keys)) == WINDOWS


def test_stray_shard_files_are_listed(cache, tmp_path):
    """A shard-named file the manifest does not list (v2 name, a leftover .tmp) is reported."""
    d = tmp_path / "cache"
    shutil.copytree(cache, d)
    extra = ["cache-u0000009-l000001-0000.tar", "cache-u0000001-l000003-0000.tar.tmp"]
    for name in extra:
        (d / name).write_bytes(b"x")
    rep = read_json(d)
    assert rep["stray_files"] == sorted(extra)
    assert rep["bytes_on_disk"] == sum(os.stat(p).st_size for p in shard_files(cache))
    proc = run_tool(d)
    assert proc.returncode == 0 and "files not in manifest" in proc.stdout, proc.stdout


def test_plot_writes_png(cache, tmp_path):
    out = tmp_path / "plots" / "entropy.png"
    proc = run_tool(cache, "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_missing_manifest(tmp_path):
    proc = run_tool(tmp_path)
    assert proc.returncode == 2
    assert "manifest.json does not exist" in proc.stderr
    (tmp_path / "units.json").write_text("{}")         # a version-2 run that did not finish
    proc = run_tool(tmp_path)
    assert proc.returncode == 2
    assert "did not finish" in proc.stderr
    (tmp_path / "units.json").unlink()
    (tmp_path / "manifest.r0000.json").write_text("{}")  # an unfinished version-1 run
    proc = run_tool(tmp_path)
    assert proc.returncode == 2 and "manifest.json does not exist" in proc.stderr
    proc = run_tool(tmp_path / "nope")
    assert proc.returncode == 2 and "not a directory" in proc.stderr
