"""pipeline.stage1_cache.units.UnitReader: a unit's documents and the sha256 of its bytes, for
every file kind, against independent references.

References (tests/unit_corpora.py): every .jsonl file read with `json.loads` line by line (line
starts found by scanning for b"\\n"); parquet read whole with `pyarrow.parquet.read_table`; a
.txt file's bytes decoded; the corpus through `pipeline.common.text.load_documents` (HF
`datasets`) as a second reading of the same files. The plan itself: tests/test_units.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.text import DataSpec, load_documents
from pipeline.stage1_cache.units import plan_units
from unit_corpora import (all_unit_docs, doc, jsonl_bytes, read_unit, ref_jsonl_docs, ref_lines,
                          ref_owned, write_jsonl_folder)


# ---------------------------------------------------------------- jsonl units

def test_every_jsonl_line_in_exactly_one_unit_in_order(tmp_path):
    """Many unit sizes over files with long lines, blank lines, a last line without newline
    and multibyte characters; the sweep must (and is checked to) put cut points on a line
    start, on a newline byte, inside a multibyte character and inside a line longer than a
    unit."""
    spec, files = write_jsonl_folder(tmp_path / "corpus")
    data = [p.read_bytes() for p in files]
    ref_all = [d for b in data for d in ref_jsonl_docs(b)]
    assert len(ref_all) == 385 and len(set(ref_all)) == len(ref_all)
    assert not data[3].endswith(b"\n")
    seen = {"line start": 0, "on newline": 0, "inside multibyte": 0, "unit owns no line": 0}
    for U in [40, 97, 128, 199, 256, 300, 333, 512, 777, 1000, 1500, 4096, 1 << 20]:
        plan = plan_units(spec, unit_bytes=U)
        got = []
        owned_total = [0] * len(files)
        for u in plan["units"]:
            docs, r = read_unit(spec, plan, u["unit"])
            got += docs
            if u["file"] == u["last_file"]:
                b = data[u["file"]]
                a, e = u["start"], u["end"]
                assert docs == ref_jsonl_docs(b, a, e), (U, u)
                owned = ref_owned(b, a, e)
                assert r.n_bytes == len(owned), (U, u)
                assert r.sha256 == hashlib.sha256(owned).hexdigest(), (U, u)
                owned_total[u["file"]] += r.n_bytes
                if a > 0:
                    seen["line start"] += b[a - 1:a] == b"\n" and b[a:a + 1].strip() != b""
                    seen["on newline"] += b[a:a + 1] == b"\n"
                    seen["inside multibyte"] += (b[a] & 0xC0) == 0x80
                    seen["unit owns no line"] += not docs and not ref_owned(b, a, e)
            else:
                joined = b"".join(data[u["file"]:u["last_file"] + 1])
                assert docs == [d for b in data[u["file"]:u["last_file"] + 1]
                                for d in ref_jsonl_docs(b)]
                assert r.sha256 == hashlib.sha256(joined).hexdigest()
                for j in range(u["file"], u["last_file"] + 1):
                    owned_total[j] += len(data[j])
        assert got == ref_all, f"unit_bytes {U}"
        assert owned_total == [len(b) for b in data], f"unit_bytes {U}: owned bytes"
    assert all(seen.values()), seen


def test_reader_at_hand_made_cut_points(tmp_path):
    """UnitReader depends only on the unit's [start, end): cuts placed by hand exactly on a
    (non-blank) line start, on a newline byte, one byte into a line, inside a multibyte
    character, inside a line longer than the unit, at the last line (no final newline)."""
    lines = [{"text": "zero"}, {"text": "one"}, {"text": "東京🙂 two"},
             {"text": "three " + "x" * 500}, {"text": "four"}, {"text": "five"}]
    data = b"\n".join(json.dumps(x, ensure_ascii=False).encode() for x in lines)
    p = tmp_path / "c.jsonl"
    p.write_bytes(data)
    spec = DataSpec(str(p))
    starts = [off for off, _ in ref_lines(data)]
    mb = data.index("東".encode()) + 1                              # inside a 3-byte character
    long_in = starts[3] + 100                                      # inside the 500-byte line
    cuts = sorted({0, starts[1], starts[2] - 1, starts[2] + 1, mb, starts[3], long_in,
                   long_in + 50, starts[4] - 1, starts[5], starts[5] + 1, len(data)})
    plan = plan_units(spec, unit_bytes=1 << 20)
    plan["units"] = [{"unit": i, "file": 0, "start": a, "last_file": 0, "end": b}
                     for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    got = []
    for u in plan["units"]:
        docs, r = read_unit(spec, plan, u["unit"])
        assert docs == ref_jsonl_docs(data, u["start"], u["end"]), u
        assert r.sha256 == hashlib.sha256(ref_owned(data, u["start"], u["end"])).hexdigest()
        got.append(docs)
    assert sum(got, []) == [x["text"] for x in lines]
    by_start = dict(zip(cuts, got))
    assert by_start[starts[1]] == ["one"]                          # line start: owns that line
    assert by_start[starts[2] - 1] == ["東京🙂 two"]           # on the newline: the next line
    assert by_start[starts[2] + 1] == [] and by_start[mb] == []    # inside a line: not it
    assert by_start[long_in] == [] and by_start[long_in + 50] == []
    assert by_start[starts[5]] == ["five"] and by_start[starts[5] + 1] == []


def test_unit_documents_equal_datasets_reading(tmp_path):
    """The same documents as `pipeline.common.text.load_documents` (HF datasets' json builder)."""
    spec, _ = write_jsonl_folder(tmp_path / "corpus")
    plan = plan_units(spec, unit_bytes=256)
    assert all_unit_docs(spec, plan) == list(load_documents(spec))


def test_only_the_units_bytes_are_read(tmp_path):
    """A unit in the middle of a file reads nothing before its start but the partial line's
    tail: bytes before it are made unreadable garbage (same size and mtime), and the unit
    still reads."""
    rng = np.random.default_rng(5)
    p = tmp_path / "c.jsonl"
    p.write_bytes(jsonl_bytes([doc(i, rng) for i in range(300)], rng))
    spec = DataSpec(str(p))
    plan = plan_units(spec, unit_bytes=2000)
    u = plan["units"][len(plan["units"]) // 2]
    want, _ = read_unit(spec, plan, u["unit"])
    assert want
    data = bytearray(p.read_bytes())
    line_before = data.rfind(b"\n", 0, u["start"] - 1)           # the line holding byte start-1
    data[:line_before] = b"\xff" * line_before                     # not UTF-8, not JSON
    st = p.stat()
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    got, _ = read_unit(spec, plan, u["unit"])
    assert got == want


def _bad_jsonl(tmp_path: Path, payload: bytes) -> tuple[DataSpec, int]:
    good = b'{"text": "fine"}\n' * 3
    p = tmp_path / "bad.jsonl"
    p.write_bytes(good + payload + b"\n" + good)
    return DataSpec(str(p)), len(good)


@pytest.mark.parametrize("payload, pattern", [
    (b'{"text": "unterminated', r"is not valid JSON"),
    (b'{"body": "no text field"}', r"has no field 'text' \(fields: \['body'\]\).*--text-field"),
    (b'{"text": null}', r"field 'text' is NoneType, expected a string"),
    (b'["an", "array"]', r"is a JSON list, not an object"),
])
def test_bad_jsonl_line_names_file_and_offset(tmp_path, payload, pattern):
    spec, off = _bad_jsonl(tmp_path, payload)
    plan = plan_units(spec)
    with pytest.raises(ValueError, match=pattern) as e:
        read_unit(spec, plan, 0)
    msg = str(e.value)
    assert type(e.value) is ValueError
    assert f"file {spec.path}" in msg and f"line starting at byte {off}" in msg, msg
    assert f"tail -c +{off + 1} {spec.path}" in msg, msg


def test_jsonl_not_utf8_is_a_named_error(tmp_path):
    spec, off = _bad_jsonl(tmp_path, b'{"text": "\xff\xfe bad"}')
    plan = plan_units(spec)
    with pytest.raises(ValueError) as e:
        read_unit(spec, plan, 0)
    msg = str(e.value)
    assert type(e.value) is ValueError
    for part in (f"--data {spec.path}", f"file {spec.path} is not valid UTF-8",
                 "re-encode it as UTF-8", f"byte {off + 10}"):
        assert part in msg, (part, msg)


# ---------------------------------------------------------------- parquet, txt, json

def test_parquet_row_groups_every_row_once(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    root = tmp_path / "pq"
    root.mkdir()
    n = 0
    for name, rows, rg in (("a.parquet", 230, 10), ("b.parquet", 5, 5), ("c.parquet", 97, 13)):
        docs = [doc(n + i, rng) for i in range(rows)]
        n += rows
        pq.write_table(pa.table({"id": list(range(rows)), "body": docs}), root / name,
                       row_group_size=rg)
    spec = DataSpec(str(root), text_field="body")
    ref = [d for p in sorted(root.glob("*.parquet"))
           for d in pq.read_table(p).column("body").to_pylist()]
    assert len(ref) == 332 and len(set(ref)) == 332
    md_a = pq.ParquetFile(root / "a.parquet").metadata
    rg0 = sum(md_a.row_group(0).column(c).total_compressed_size for c in range(md_a.num_columns))
    for U in (1, rg0, 1500, 4000, 1 << 20):
        plan = plan_units(spec, unit_bytes=U)
        files = plan["files"]
        assert [f["kind"] for f in files] == ["parquet"] * 3
        assert [f["row_groups"] for f in files] == [23, 1, 8]
        assert all_unit_docs(spec, plan) == ref, U
        for j, f in enumerate(files):
            md = pq.ParquetFile(root / f["path"]).metadata
            own = [u for u in plan["units"] if u["file"] <= j <= u["last_file"]]
            if f["size"] <= U:                                      # whole, maybe packed
                assert all(u["start"] == 0 and u["end"] == md.num_row_groups for u in own
                           if u["last_file"] == j), own
                continue
            # row groups accumulated until their compressed size reaches U
            assert [u["file"] == u["last_file"] == j for u in own] == [True] * len(own)
            assert own[0]["start"] == 0 and own[-1]["end"] == md.num_row_groups
            for u, v in zip(own, own[1:]):
                assert u["end"] == v["start"] and u["start"] < u["end"]
            comp = [sum(md.row_group(g).column(c).total_compressed_size
                        for c in range(md.num_columns)) for g in range(md.num_row_groups)]
            for u in own[:-1]:
                assert sum(comp[u["start"]:u["end"]]) >= U > sum(comp[u["start"]:u["end"] - 1]), u
        if U == 1:                 # each row group of a.parquet reaches U on its own
            assert sum(u["file"] == u["last_file"] == 0 for u in plan["units"]) == 23
        if U == rg0:               # row group 0's compressed size is exactly U: a unit alone
            assert (plan["units"][0]["start"], plan["units"][0]["end"]) == (0, 1)
    plan = plan_units(spec, unit_bytes=4000)
    shas = []
    for u in range(len(plan["units"])):
        _, r1 = read_unit(spec, plan, u)
        _, r2 = read_unit(spec, plan, u)
        assert r1.sha256 == r2.sha256 and r1.n_bytes > 0
        shas.append(r1.sha256)
    assert len(set(shas)) == len(shas)
    assert all_unit_docs(spec, plan) == list(load_documents(spec))
    with pytest.raises(ValueError, match=r"--text-field 'text' is not a column .*'body'"):
        plan_units(DataSpec(str(root)))


def test_txt_file_is_one_document_and_folder_one_per_file(tmp_path):
    root = tmp_path / "txt"
    (root / "z").mkdir(parents=True)
    texts = {
        "a.txt": "first line\n\nsecond paragraph, after a blank line\n",
        "b.txt": "\ufeffwith a BOM\r\nand CRLF, no final newline",
        "c.txt": "東京🙂 " * 400 + "\n\n\n",                      # larger than the unit
        "z/d.txt": "nested",
    }
    for name, t in texts.items():
        (root / name).write_bytes(t.encode("utf-8"))
    order = sorted(root.rglob("*.txt"))
    expect = [p.read_bytes().decode("utf-8").removeprefix("\ufeff") for p in order]
    spec = DataSpec(str(root), text_field="ignored")
    plan = plan_units(spec, unit_bytes=512)
    assert [f["kind"] for f in plan["files"]] == ["txt"] * 4
    assert all_unit_docs(spec, plan) == expect
    assert list(load_documents(spec)) == expect                    # and so does load_documents
    big = [u for u in plan["units"] if u["file"] == 2]
    assert big == [{"unit": big[0]["unit"], "file": 2, "start": 0, "last_file": 2,
                    "end": len(texts["c.txt"].encode())}]
    for u in plan["units"]:
        docs, r = read_unit(spec, plan, u["unit"])
        raw = b"".join(p.read_bytes() for p in order[u["file"]:u["last_file"] + 1])
        assert len(docs) == u["last_file"] - u["file"] + 1
        assert r.sha256 == hashlib.sha256(raw).hexdigest() and r.n_bytes == len(raw)
    single = DataSpec(str(root / "a.txt"))
    assert all_unit_docs(single, plan_units(single)) == [texts["a.txt"]]


def test_txt_not_utf8_names_the_file(tmp_path):
    root = tmp_path / "txt"
    root.mkdir()
    (root / "a.txt").write_text("fine")
    (root / "b.txt").write_bytes(b"caf\xe9 latin-1")
    spec = DataSpec(str(root))
    plan = plan_units(spec)
    with pytest.raises(ValueError) as e:
        all_unit_docs(spec, plan)
    assert type(e.value) is ValueError
    assert f"file {root / 'b.txt'} is not valid UTF-8" in str(e.value), str(e.value)


def test_json_files_are_whole_units(tmp_path):
    root = tmp_path / "js"
    root.mkdir()
    (root / "a.json").write_text(json.dumps([{"text": "obj one", "n": 1}, {"text": "obj two"}],
                                            indent=2))
    (root / "b.json").write_text('{"text": "line one"}\n\n{"text": "line two"}\n')
    (root / "c.jsonl").write_text('{"text": "jsonl"}\n')
    spec = DataSpec(str(root))
    expect = ["obj one", "obj two", "line one", "line two", "jsonl"]
    plan = plan_units(spec, unit_bytes=1)
    assert [f["kind"] for f in plan["files"]] == ["json", "json", "jsonl"]
    # .json files are never cut (a .jsonl file is: 1-byte ranges here)
    n_c = (root / "c.jsonl").stat().st_size
    assert [(u["file"], u["last_file"]) for u in plan["units"]] == [(0, 0), (1, 1)] + [(2, 2)] * n_c
    assert [(u["start"], u["end"]) for u in plan["units"][:2]] == [
        (0, (root / "a.json").stat().st_size), (0, (root / "b.json").stat().st_size)]
    assert all_unit_docs(spec, plan) == expect == list(load_documents(spec))
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["s1", "s2"]))
    sspec = DataSpec(str(strings))
    assert all_unit_docs(sspec, plan_units(sspec)) == ["s1", "s2"] == list(load_documents(sspec))
    _, r = read_unit(spec, plan, 1)
    raw = (root / "b.json").read_bytes()
    assert r.sha256 == hashlib.sha256(raw).hexdigest() and r.n_bytes == len(raw)
