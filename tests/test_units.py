"""pipeline.stage1_cache.units: work units of a corpus, against independent references.

References: every .jsonl file read with `json.loads` line by line here (line starts found by
scanning for b"\\n"); parquet read whole with `pyarrow.parquet.read_table`; a .txt file's
bytes decoded; windows from `references.reference_windows` (each document encoded on its own
plus EOS, concatenated, cut); the corpus through `data.load_documents` (HF `datasets`) as a
second reading of the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.text import DataSpec, load_documents
from pipeline.stage1_cache.units import UnitReader, UnitStats, check_plan, plan_units, unit_windows
from references import reference_windows

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "42", "answer", "because", "naïve", "café", "東京", "🙂", "--", "(x)"]


@pytest.fixture(scope="module")
def tok():
    from pipeline.demo.tiny import train_tokenizer

    return train_tokenizer()


# ---------------------------------------------------------------- independent references

def ref_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(start offset, line bytes without the newline) of every line of a file."""
    out, pos = [], 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        out.append((pos, data[pos:end].rstrip(b"\n")))
        pos = end
    return out


def ref_jsonl_docs(data: bytes, lo: int = 0, hi: int | None = None,
                   field: str = "text") -> list[str]:
    """Documents of the non-blank lines that start in [lo, hi)."""
    hi = len(data) if hi is None else hi
    return [json.loads(line.decode("utf-8-sig" if off == 0 else "utf-8"))[field]
            for off, line in ref_lines(data) if lo <= off < hi and line.strip()]


def ref_owned(data: bytes, lo: int, hi: int) -> bytes:
    """The bytes of the lines that start in [lo, hi) (first line start >= lo to first >= hi)."""
    starts = [off for off, _ in ref_lines(data)] + [len(data)]
    a = min(s for s in starts if s >= lo)
    b = min(s for s in starts if s >= hi)
    return data[a:b]


def read_unit(spec: DataSpec, plan: dict, u: int) -> tuple[list[str], UnitReader]:
    r = UnitReader(spec, plan, u)
    docs = list(r.documents())
    return docs, r


def all_unit_docs(spec: DataSpec, plan: dict) -> list[str]:
    out: list[str] = []
    for u in range(len(plan["units"])):
        docs, r = read_unit(spec, plan, u)
        assert r.n_documents == len(docs)
        out += docs
    return out


# ---------------------------------------------------------------- corpora

def doc(i: int, rng) -> str:
    """Unique document i: its number plus 0-30 words (multibyte characters among them)."""
    return f"doc{i} " + " ".join(rng.choice(WORDS, int(rng.integers(0, 31))))


def jsonl_bytes(docs: list[str], rng, long_every: int = 0, blank_every: int = 0,
                trailing_newline: bool = True) -> bytes:
    lines = []
    for i, d in enumerate(docs):
        if long_every and i % long_every == long_every - 1:
            d = d + " " + "東京🙂" * 120            # ~1 KB line, longer than the small units
        lines.append(json.dumps({"id": i, "text": d, "meta": "x"}, ensure_ascii=False))
        if blank_every and i % blank_every == 0:
            lines.append("" if i % 2 else "   ")
    data = "\n".join(lines).encode("utf-8")
    return data + b"\n" if trailing_newline else data


def write_jsonl_folder(root: Path, seed: int = 0) -> tuple[DataSpec, list[Path]]:
    """Several .jsonl files of different sizes (one nested), in a folder with a non-data
    file; returns the spec and the files in the order they are read (sorted paths)."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    (root / "sub").mkdir()
    n = 0

    def docs(k):
        nonlocal n
        out = [doc(n + i, rng) for i in range(k)]
        n += k
        return out

    specs = {
        "a.jsonl": dict(k=120, long_every=17, blank_every=9),
        "b.jsonl": dict(k=3),                                         # small: packed
        "c.jsonl": dict(k=2),                                         # small: packed
        "d.jsonl": dict(k=200, long_every=31, blank_every=7, trailing_newline=False),
        "sub/e.jsonl": dict(k=60, blank_every=5),
    }
    for name, kw in specs.items():
        k = kw.pop("k")
        bom = b"\xef\xbb\xbf" if name == "a.jsonl" else b""       # a UTF-8 BOM, as editors write
        (root / name).write_bytes(bom + jsonl_bytes(docs(k), rng, **kw))
    (root / "README").write_text("not a data file")
    files = sorted(p for p in root.rglob("*.jsonl"))
    return DataSpec(str(root)), files


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
    assert len(plan["units"]) == 1024
    assert 1 <= huge_stats[str(huge)] == small_stats[str(small)], (huge_stats, small_stats)
    assert plan["units"][-1]["end"] == 64 << 30
    assert all(u["end"] - u["start"] == 64 << 20 for u in plan["units"])


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
    """The same documents as `data.load_documents` (HF datasets' json builder)."""
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
    assert list(load_documents(spec)) == expect                    # item 6 in data.py too
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
