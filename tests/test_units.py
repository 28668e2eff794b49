"""pipeline.stage1_cache.units: the unit plan of a corpus, its check against a changed corpus,
and a unit's windows, against independent references.

The plan is checked against `os.stat` and the files' bytes (no file opened while planning);
windows against `references.reference_windows` (each document encoded on its own plus EOS,
concatenated, cut), the lost tokens against a count made here from the files' bytes.
Reading a unit's documents: tests/test_unit_reader.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.text import DataSpec
from pipeline.stage1_cache.units import (DEFAULT_UNIT_BYTES, UnitReader, UnitStats, check_plan,
                                         plan_units, unit_windows)
from references import reference_windows
from unit_corpora import doc, jsonl_bytes, read_unit, ref_jsonl_docs, write_jsonl_folder


@pytest.fixture(scope="module")
def tok():
    from pipeline.demo.tiny import train_tokenizer

    return train_tokenizer()


# ---------------------------------------------------------------- the plan

def test_module_api():
    import pipeline.stage1_cache.units as units

    for name in ("plan_units", "check_plan", "UnitReader", "unit_windows", "UnitStats"):
        assert hasattr(units, name), name


def test_plan_depends_only_on_the_files_and_is_json(tmp_path):
    spec, files = write_jsonl_folder(tmp_path / "corpus")
    plan = plan_units(spec, unit_bytes=300)
    assert plan == plan_units(spec, unit_bytes=300)
    assert json.loads(json.dumps(plan)) == plan
    assert plan["version"] == 1 and plan["root"] == spec.path and plan["unit_bytes"] == 300
    # files: relative paths in sorted order, sizes and mtimes from stat
    assert [f["path"] for f in plan["files"]] == [p.relative_to(spec.path).as_posix()
                                                   for p in files]
    for f, p in zip(plan["files"], files):
        st = p.stat()
        assert (f["size"], f["mtime_ns"], f["kind"]) == (st.st_size, st.st_mtime_ns, "jsonl")
    assert [u["unit"] for u in plan["units"]] == list(range(len(plan["units"])))
    # A copy elsewhere (mtimes preserved) has the same plan but for the root as given.
    copy = tmp_path / "copy"
    shutil.copytree(spec.path, copy)
    other = plan_units(DataSpec(str(copy)), unit_bytes=300)
    assert {**other, "root": spec.path} == plan
    # A single file: its name, not a path.
    single = plan_units(DataSpec(str(files[0])), unit_bytes=300)
    assert [f["path"] for f in single["files"]] == ["a.jsonl"]


def test_units_cover_each_file_in_order_and_pack_small_files(tmp_path):
    spec, files = write_jsonl_folder(tmp_path / "corpus")
    U = 800
    plan = plan_units(spec, unit_bytes=U)
    sizes = [p.stat().st_size for p in files]
    assert sizes[1] + sizes[2] <= U < min(sizes[0], sizes[3], sizes[4])
    # Positions run contiguously through the corpus: each unit starts where the last ended.
    pos = (0, 0)
    for u in plan["units"]:
        if pos[1] == sizes[pos[0]]:
            pos = (pos[0] + 1, 0)
        assert (u["file"], u["start"]) == pos, (u, pos)
        if u["last_file"] > u["file"]:                              # packed whole files
            assert u["start"] == 0 and u["end"] == sizes[u["last_file"]], u
            assert sum(sizes[u["file"]:u["last_file"] + 1]) <= U, u
        else:
            assert 0 <= u["start"] < u["end"] <= sizes[u["file"]], u
            assert u["end"] - u["start"] <= U, u
        pos = (u["last_file"], u["end"])
    assert pos == (len(files) - 1, sizes[-1])
    # b.jsonl and c.jsonl (smaller than a unit together) share one unit; the others are cut
    # into ceil(size / U) ranges.
    packed = [(u["file"], u["last_file"]) for u in plan["units"] if u["last_file"] > u["file"]]
    assert packed == [(1, 2)], plan["units"]
    for j in (0, 3, 4):
        cut = [u["end"] - u["start"] for u in plan["units"] if u["file"] == j]
        assert len(cut) == -(-sizes[j] // U) and max(cut) - min(cut) <= 1, cut   # equal ranges


def _stat_calls(monkeypatch, fn):
    """(fn(), {path: number of os.stat calls}) while fn runs (Path.stat, .exists, .is_file
    and os.path.getsize all go through os.stat)."""
    calls: dict[str, int] = {}
    real = os.stat

    def counting(path, *args, **kw):
        key = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        calls[key] = calls.get(key, 0) + 1
        return real(path, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "stat", counting)
        out = fn()
    return out, calls


def test_plan_reads_no_file_content(tmp_path, monkeypatch):
    """An audit hook sees every Python-level open(): planning .jsonl/.txt/.json opens none of
    the corpus's files. And a 64 GiB sparse file is planned from its size alone: no open,
    and as many stat calls as for a 1 KiB file (a constant per file, not one per unit)."""
    spec, _ = write_jsonl_folder(tmp_path / "corpus")
    (tmp_path / "corpus" / "sub" / "f.json").write_text('[{"text": "x"}]')
    opened: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        plan = plan_units(spec, unit_bytes=300)
    finally:
        active[0] = False
    assert len(plan["units"]) > 10
    corpus = str(tmp_path / "corpus")
    assert not [p for p in opened if p.startswith(corpus)], opened

    small = tmp_path / "small.jsonl"
    with open(small, "wb") as f:
        f.truncate(1 << 10)
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)
    one, small_stats = _stat_calls(monkeypatch, lambda: plan_units(DataSpec(str(small))))
    assert len(one["units"]) == 1
    active[0] = True
    try:
        plan, huge_stats = _stat_calls(monkeypatch, lambda: plan_units(DataSpec(str(huge))))
    finally:
        active[0] = False
    assert str(huge) not in opened, opened
    assert len(plan["units"]) == (64 << 30) // DEFAULT_UNIT_BYTES        # 2,048 at 32 MiB
    assert 1 <= huge_stats[str(huge)] == small_stats[str(small)], (huge_stats, small_stats)
    assert plan["units"][-1]["end"] == 64 << 30
    assert all(u["end"] - u["start"] == DEFAULT_UNIT_BYTES for u in plan["units"])


def test_hub_name_and_missing_paths_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--data org/corpus: .*hub dataset name.*work units "
                                         r"need local files"):
        plan_units(DataSpec("org/corpus"))
    with pytest.raises(ValueError, match=r"no such file"):
        plan_units(DataSpec(str(tmp_path / "nope.jsonl")))
    csv = tmp_path / "c.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"work units read .*not \.csv"):
        plan_units(DataSpec(str(csv)))
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty file .*e\.jsonl"):
        plan_units(DataSpec(str(empty)))


# ---------------------------------------------------------------- check_plan

def test_check_plan_refuses_a_changed_corpus_naming_the_file(tmp_path):
    spec, files = write_jsonl_folder(tmp_path / "corpus")
    root = Path(spec.path)
    plan = plan_units(spec, unit_bytes=300)
    check_plan(spec, plan)
    # touched with the same mtime: still the same corpus
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))
    check_plan(spec, plan)

    def refused(pattern: str):
        with pytest.raises(ValueError, match=pattern) as e:
            check_plan(spec, plan)
        assert "restore the corpus" in str(e.value) and "new --out" in str(e.value)
        return e

    (root / "sub" / "new.jsonl").write_text('{"text": "x"}\n')
    refused(r"file sub/new\.jsonl was added")
    (root / "sub" / "new.jsonl").unlink()
    check_plan(spec, plan)

    moved = tmp_path / "b.jsonl"
    shutil.move(root / "b.jsonl", moved)
    refused(r"file b\.jsonl was removed")
    shutil.move(moved, root / "b.jsonl")
    check_plan(spec, plan)

    # same size, new mtime (rewritten in place)
    c = root / "c.jsonl"
    st = c.stat()
    c.write_bytes(c.read_bytes().replace(b"doc", b"DOC"))
    os.utime(c, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    refused(r"file c\.jsonl was rewritten \(mtime_ns ")
    # the reader refuses the unit too
    u = next(u for u in plan["units"] if u["file"] <= 2 <= u["last_file"])
    with pytest.raises(ValueError, match=r"file c\.jsonl was rewritten"):
        read_unit(spec, plan, u["unit"])
    os.utime(c, ns=(st.st_atime_ns, st.st_mtime_ns))
    check_plan(spec, plan)

    # another size
    with open(root / "d.jsonl", "ab") as f:
        f.write(b'\n{"text": "appended"}\n')
    refused(r"file d\.jsonl was rewritten \(size \d+ -> \d+ bytes")

    with pytest.raises(ValueError, match=r"version"):
        check_plan(spec, {**plan, "version": 99})


def test_check_plan_on_a_single_file(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "x"}\n')
    spec = DataSpec(str(p))
    plan = plan_units(spec)
    check_plan(spec, plan)
    p.unlink()
    with pytest.raises(ValueError, match=r"no such file.*changed since the units were planned"):
        check_plan(spec, plan)


# ---------------------------------------------------------------- windows and lost tokens

def test_unit_windows_equal_reference_tokenization(tok):
    rng = np.random.default_rng(7)
    docs = [doc(i, rng) for i in range(80)] + ["", "東京🙂"]
    for T in (2, 7, 16, 64):
        st = UnitStats()
        got = list(unit_windows(iter(docs), tok, T, st))
        ref = reference_windows(docs, tok, T)
        assert len(got) == len(ref) and all(w.dtype == np.uint32 and w.shape == (T,) for w in got)
        if got:
            np.testing.assert_array_equal(np.stack(got), ref)
        n_tokens = sum(len(tok.encode(d, add_special_tokens=False)) + 1 for d in docs)
        assert (st.documents, st.tokens, st.windows) == (len(docs), n_tokens, len(ref))
        assert st.dropped_tokens == n_tokens % T


def test_lost_tokens_equal_independent_count_and_stay_small(tok):
    """Per-unit windowing over a generated corpus at a small unit size: the tokens lost to
    the dropped partial windows equal sum_u (tokens_u mod T) computed here from the files,
    the windows equal the reference's per unit, and the lost fraction is < 0.5% when a
    unit holds >> T tokens (the default-size figures are in the module docstring)."""
    import tempfile

    T, U = 16, 16 << 10
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "c"
        root.mkdir()
        rng = np.random.default_rng(11)
        n = 0
        for name, k in (("a.jsonl", 900), ("b.jsonl", 40), ("c.jsonl", 700)):
            docs = [doc(n + i, rng) for i in range(k)]
            n += k
            (root / name).write_bytes(jsonl_bytes(docs, rng, blank_every=13))
        spec = DataSpec(str(root))
        plan = plan_units(spec, unit_bytes=U)
        data = [(root / f["path"]).read_bytes() for f in plan["files"]]
        total = lost_ref = windows_ref = 0
        lost = n_windows = 0
        for u in plan["units"]:
            # reference: the unit's documents straight from the file bytes
            if u["file"] == u["last_file"]:
                ref_docs = ref_jsonl_docs(data[u["file"]], u["start"], u["end"])
            else:
                ref_docs = [x for b in data[u["file"]:u["last_file"] + 1]
                            for x in ref_jsonl_docs(b)]
            t = sum(len(tok.encode(x, add_special_tokens=False)) + 1 for x in ref_docs)
            total += t
            lost_ref += t % T
            windows_ref += t // T
            st = UnitStats()
            r = UnitReader(spec, plan, u["unit"])
            got = list(unit_windows(r.documents(), tok, T, st))
            ref = reference_windows(ref_docs, tok, T)
            np.testing.assert_array_equal(np.stack(got) if got else ref, ref)
            assert st.tokens == t and st.documents == len(ref_docs) == r.n_documents
            lost += st.dropped_tokens
            n_windows += st.windows
        assert len(plan["units"]) >= 10
        assert (lost, n_windows) == (lost_ref, windows_ref)
        assert lost + n_windows * T == total
        frac = lost / total
        expected = (T / 2) * len(plan["units"]) / total
        print(f"units {len(plan['units'])}, tokens {total}, lost {lost} = {100 * frac:.3f}% "
              f"(T={T}, unit {U} bytes, expected ~{100 * expected:.3f}%)")
        assert frac < 0.005, frac
