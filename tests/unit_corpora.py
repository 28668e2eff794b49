"""Corpora for the work-unit tests (test_units.py, test_unit_reader.py) and independent
references that read them: every .jsonl line found by scanning for b"\\n" and read with
`json.loads`, the bytes a unit owns cut by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.common.text import DataSpec
from pipeline.stage1_cache.units import UnitReader

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "42", "answer", "because", "naïve", "café", "東京", "🙂", "--", "(x)"]


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
