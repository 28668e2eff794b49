"""The corpus cut once, cheaply, into work units whose boundaries do not depend on the
number of ranks.

A *unit plan* is made from file sizes, mtimes and parquet footers only (no text is read):

- `.jsonl`: byte ranges. A file larger than `unit_bytes` is cut into `ceil(size/unit_bytes)`
  equal ranges `[a, b)`; a range owns every line that *starts* in it (a reader seeks to `a`,
  skips the partial line unless `a == 0` or byte `a-1` is `\\n`, and reads lines while the
  line's start offset is `< b`). Blank lines are skipped. The bytes a unit owns (from its
  first line start to the next unit's) partition the file exactly, whatever the cut points.
- `.parquet`: ranges of row groups, accumulated until their compressed size reaches
  `unit_bytes` (positions in the plan are row-group indices).
- `.txt`: the whole file is one document and never split.
- `.json` (a JSON array of objects or strings, or JSON lines with a `.json` suffix, as HF
  `datasets`' json builder accepts): never split.

Files of at most `unit_bytes` (and unsplittable ones) are *packed*: consecutive whole files
share a unit while the unit's bytes stay <= `unit_bytes` (a file larger than that is a unit
of its own or is cut). Without packing a folder of many small files (e.g. one `.txt`
document per file, shorter than T tokens) would lose every token to the per-unit dropped
tail. A unit is therefore a contiguous span of the corpus in file order:
`{"unit": i, "file": j, "start": a, "last_file": k, "end": b}` runs from position `a` of
file `j` to position `b` of file `k` (`k >= j`; files in between whole; when `k > j`,
`a == 0` and `b` is file k's end). Unit indices are global, 0..N-1 in file order.

A unit is tokenized and windowed on its own (`unit_windows`): its documents each followed by
EOS, concatenated, cut into windows of T tokens, the last partial window dropped. A chat
corpus (`data.ChatDataSpec`, `--data-format chat`) is read as rows (`UnitReader.rows()`) and
packed by `pipeline.stage1_cache.packing.chat_unit_windows` (conversations, no EOS; .txt refused).

Tokens lost to the dropped partial windows: `tokens_u mod T` per unit, on average T/2 (at
most T-1). At the default 32 MiB per unit (`DEFAULT_UNIT_BYTES`, the default of the cache
stage's --unit-bytes) and ~4 bytes/token (English BPE text), a unit holds ~8.4M tokens:
T=2048 loses ~1,024 tokens per unit = 0.012% (at most 0.024%); T=8192 0.049%; T=32768
0.20%. Measured with 64 MiB units: a generated 260 MiB .jsonl corpus of English words (cut
into 5 units of 52 MiB), the tiny test tokenizer (4.69 bytes/token, 11.6M tokens per unit),
T=2048: 309 to 1,768 tokens lost per unit (mean 877), 4,387 of 58.2M = 0.0075%.
The expected loss (T/2)/(tokens per unit) stays < 0.5% while units average > 100*T tokens
(~800 KiB of text at T=2048). A unit holds at most `unit_bytes` (a parquet unit: plus its
last row group; a .txt/.json file larger than that is a unit alone), and at least
`unit_bytes/2` (a cut .jsonl file's ranges are equal) except the corpus's last unit, the
last row groups of a parquet file, and a pack of small files closed because the next file
did not fit; a corpus smaller than a few units loses relatively more.
`tests/test_units.py` checks the lost count against an independent count at a small unit
size.

The plan is checked against the files before a restart (`check_plan`: a file added,
removed, or with another size or mtime is refused, by name). `UnitReader` hashes the bytes a
unit covers (sha256; for parquet the byte ranges of the text column's column chunks, read
from the file as they are stored), so the corpus fingerprint is built by the ranks that
cache the units, each hashing only its own bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.common.text import FILE_BUILDERS, DataSpec, local_files, not_utf8_error
# A unit's documents -> windows; defined in pipeline.stage1_cache.packing, imported from here too.
from pipeline.stage1_cache.packing import UnitStats, unit_windows  # noqa: F401

PLAN_VERSION = 1
DEFAULT_UNIT_BYTES = 32 << 20     # 32 MiB: the default of the cache stage's --unit-bytes (docstring above)
_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
_BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK = 1 << 16


# ---------------------------------------------------------------- listing

def _root(spec: DataSpec) -> Path:
    """The local --data path; refuses hub dataset names and missing paths."""
    path = Path(spec.path).expanduser()
    if path.exists():
        return path
    if path.suffix in FILE_BUILDERS:
        raise ValueError(f"--data {spec.path}: no such file ({path.resolve()})")
    if "/" in spec.path and not spec.path.startswith((".", "/", "~")):
        raise ValueError(
            f"--data {spec.path}: looks like a hub dataset name, but work units need local "
            "files (the plan is cut from file sizes and parquet row groups). Download it to "
            "local files first, e.g. `python -c \"import datasets; datasets.load_dataset("
            f"'{spec.path}', split='{spec.split}').to_parquet('corpus/{spec.split}.parquet')\"`"
            ", then pass --data corpus")
    raise ValueError(f"--data {spec.path}: no such file or folder")


def _list(spec: DataSpec) -> tuple[Path, list[tuple[str, Path, str]]]:
    """(root, [(path relative to root or the file name, absolute path, kind)]) in the order
    `data.load_documents` reads them."""
    root = _root(spec)
    _, files = local_files(root)
    out = []
    for f in map(Path, files):
        kind = _KINDS.get(f.suffix)
        if kind is None:
            raise ValueError(
                f"--data {spec.path}: work units read {sorted(_KINDS)} files, not {f.suffix} "
                f"({f}); convert it to .jsonl or .parquet")
        if kind == "txt" and spec.is_chat:
            raise ValueError(
                f"--data {spec.path}: {f} is a .txt file (one plain-text document); "
                "--data-format chat reads rows of conversations from .jsonl, .json or .parquet "
                "files: convert it, or cache it with --data-format text")
        rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
        out.append((rel, f, kind))
    return root, out


def _file_path(spec: DataSpec, finfo: dict) -> Path:
    root = Path(spec.path).expanduser()
    return root / finfo["path"] if root.is_dir() else root


def _parquet_meta(spec: DataSpec, f: Path):
    import pyarrow.parquet as pq

    md = pq.ParquetFile(f).metadata
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    _parquet_columns(spec, f, names)
    return md


def _parquet_columns(spec: DataSpec, f: Path, names: list[str]) -> list[str]:
    """The columns of `spec.columns` a parquet file holds (the text column, or the
    conversation columns present); refuses a file that holds none of what is needed.
    `names`: the file's leaf column paths (a list column's leaves are `name.list.element...`)."""
    top = {n.split(".")[0]: n for n in reversed(names)}
    if not spec.is_chat:
        if spec.text_field not in names:
            raise ValueError(f"--text-field {spec.text_field!r} is not a column of {f}; columns: "
                             f"{names}")
        return [spec.text_field]
    if spec.messages_field not in top and not (spec.prompt_field in top and spec.response_field in top):
        raise ValueError(f"--data {spec.path}: {f} has neither a column {spec.messages_field!r} "
                         f"nor columns {spec.prompt_field!r} and {spec.response_field!r} "
                         f"(columns: {sorted(top)}); name them with --messages-field, "
                         "--prompt-field and --response-field")
    return [c for c in spec.columns if c in top]


def plan_units(spec: DataSpec, unit_bytes: int = DEFAULT_UNIT_BYTES) -> dict:
    """The unit plan of the corpus at `spec.path` (JSON-serializable; see the module doc).

    Reads file sizes and mtimes, and the footers of parquet files, never the text."""
    if unit_bytes < 1:
        raise ValueError(f"unit_bytes {unit_bytes} must be >= 1")
    _, listed = _list(spec)
    files: list[dict] = []
    rg_sizes: list[list[int]] = []
    for rel, f, kind in listed:
        st = f.stat()
        if st.st_size == 0:
            raise ValueError(f"--data {spec.path}: empty file {f}")
        info = {"path": rel, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
                "kind": kind}
        sizes: list[int] = []
        if kind == "parquet":
            md = _parquet_meta(spec, f)
            sizes = [int(sum(md.row_group(g).column(c).total_compressed_size
                             for c in range(md.num_columns)))
                     for g in range(md.num_row_groups)]
            info["row_groups"] = len(sizes)
        files.append(info)
        rg_sizes.append(sizes)

    units: list[dict] = []
    group: list[int] = []          # consecutive whole files packed into one unit
    group_bytes = 0

    def add(j: int, a: int, k: int, b: int) -> None:
        units.append({"unit": len(units), "file": j, "start": a, "last_file": k, "end": b})

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            add(group[0], 0, group[-1], _end(files[group[-1]]))
        group, group_bytes = [], 0

    for j, info in enumerate(files):
        size, kind = info["size"], info["kind"]
        if size <= unit_bytes or kind in ("txt", "json"):
            if group and group_bytes + size > unit_bytes:
                flush()
            group.append(j)
            group_bytes += size
            if group_bytes >= unit_bytes:
                flush()
            continue
        flush()
        if kind == "jsonl":
            n = -(-size // unit_bytes)
            cuts = [i * size // n for i in range(n + 1)]
            for a, b in zip(cuts, cuts[1:]):
                add(j, a, j, b)
        else:          # parquet: row groups until their compressed size reaches unit_bytes
            a, acc = 0, 0
            for g, s in enumerate(rg_sizes[j]):
                acc += s
                if acc >= unit_bytes:
                    add(j, a, j, g + 1)
                    a, acc = g + 1, 0
            if a < len(rg_sizes[j]):
                add(j, a, j, len(rg_sizes[j]))
    flush()
    return {"version": PLAN_VERSION, "root": spec.path, "unit_bytes": int(unit_bytes),
            "files": files, "units": units}


def _end(info: dict) -> int:
    """A file's end position: its size in bytes, or its number of row groups (parquet)."""
    return info["row_groups"] if info["kind"] == "parquet" else info["size"]


# ---------------------------------------------------------------- checking

_FIX = ("restore the corpus as it was when the units were planned, or cache into a new --out "
        "(a copy made without preserving mtimes, e.g. `cp` without `-p`, counts as rewritten)")


def _changes(finfo: dict, st: os.stat_result) -> list[str]:
    out = []
    if st.st_size != finfo["size"]:
        out.append(f"size {finfo['size']} -> {st.st_size} bytes")
    if st.st_mtime_ns != finfo["mtime_ns"]:
        out.append(f"mtime_ns {finfo['mtime_ns']} -> {st.st_mtime_ns}")
    return out


def _check_version(plan: dict) -> None:
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        got = plan.get("version") if isinstance(plan, dict) else type(plan).__name__
        raise ValueError(f"unit plan version {got!r}: this code reads version {PLAN_VERSION}")


def check_plan(spec: DataSpec, plan: dict) -> None:
    """Raise ValueError, naming the file(s), when the corpus at `spec.path` is not the one
    `plan` was made from: a file added, removed, or with another size or mtime_ns."""
    _check_version(plan)
    try:
        _, listed = _list(spec)
    except ValueError as e:
        raise ValueError(f"{e} (the corpus changed since the units were planned from "
                         f"--data {plan['root']}: {_FIX})") from e
    now = {rel: f for rel, f, _ in listed}
    planned = {fi["path"]: fi for fi in plan["files"]}
    problems = [f"file {rel} was added" for rel in now if rel not in planned]
    problems += [f"file {rel} was removed" for rel in planned if rel not in now]
    for rel, fi in planned.items():
        if rel in now:
            ch = _changes(fi, now[rel].stat())
            if ch:
                problems.append(f"file {rel} was rewritten ({', '.join(ch)})")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} changes)"
                                             if len(problems) > 10 else "")
        raise ValueError(f"--data {spec.path}: the corpus changed since the units were planned: "
                         f"{shown}. Fix: {_FIX}")


# ---------------------------------------------------------------- reading

class UnitReader:
    """The documents of one unit of a plan, reading only that unit's bytes (plus, for a
    .jsonl range that starts inside a line, the rest of that line, to find the first line
    it owns). For a chat spec (`data.ChatDataSpec`), `rows()` gives the unit's rows instead.

    After `documents()` (or `rows()`) is exhausted: `sha256` (hex) of the bytes the unit
    covers, in order: for .jsonl the exact bytes of the lines it owns (blank lines included;
    the units' owned ranges partition each file), for .txt/.json the whole file, for
    .parquet the column chunks (dictionary and data pages, as stored in the file) of the
    unit's row groups of the text column (chat: of the conversation columns present, in the
    file's column order); `n_bytes` the number of bytes hashed; `n_documents` (rows).
    """

    def __init__(self, spec: DataSpec, plan: dict, unit: int):
        _check_version(plan)
        n = len(plan["units"])
        if not 0 <= unit < n:
            raise ValueError(f"unit {unit} is not in the plan (units 0..{n - 1})")
        self.spec, self.plan, self.unit = spec, plan, unit
        self.entry = plan["units"][unit]
        self.sha256: str | None = None
        self.n_documents = 0
        self.n_bytes = 0

    def documents(self) -> Iterator[str]:
        """The unit's documents, in corpus order."""
        if self.spec.is_chat:
            raise ValueError("a chat corpus has rows of conversations, not documents: rows()")
        return self._records(False)

    def rows(self) -> Iterator[tuple[dict, dict]]:
        """Chat spec: the unit's rows in corpus order, each with where it lies:
        `{"path", "offset"}` (a JSON line starting at byte `offset`), `{"path", "element"}`
        (element of a JSON array) or `{"path", "row", "group"}` (parquet: row of the file)."""
        if not self.spec.is_chat:
            raise ValueError("rows() reads a chat corpus (data.ChatDataSpec)")
        return self._records(True)

    def _records(self, chat: bool) -> Iterator:
        u = self.entry
        h = hashlib.sha256()
        self.sha256, self.n_documents, self.n_bytes = None, 0, 0
        for j in range(u["file"], u["last_file"] + 1):
            finfo = self.plan["files"][j]
            path = _file_path(self.spec, finfo)
            try:
                st = path.stat()
            except FileNotFoundError:
                raise ValueError(f"--data {self.spec.path}: file {finfo['path']} was removed "
                                 f"since the units were planned. Fix: {_FIX}") from None
            ch = _changes(finfo, st)
            if ch:
                raise ValueError(f"--data {self.spec.path}: file {finfo['path']} was rewritten "
                                 f"since the units were planned ({', '.join(ch)}). Fix: {_FIX}")
            a = u["start"] if j == u["file"] else 0
            b = u["end"] if j == u["last_file"] else _end(finfo)
            read = {"jsonl": self._jsonl, "json": self._json, "txt": self._txt,
                    "parquet": self._parquet}[finfo["kind"]]
            for doc in read(path, a, b, h, chat):
                self.n_documents += 1
                yield doc
        self.sha256 = h.hexdigest()

    # -- per kind ------------------------------------------------------------------

    def _where(self, path: Path) -> str:
        return f"--data {self.spec.path}: file {path}"

    def _row_text(self, path: Path, row, where: str, show: str) -> str:
        field = self.spec.text_field
        if not isinstance(row, dict):
            raise ValueError(f"{self._where(path)}: {where} is a JSON {type(row).__name__}, not "
                             f"an object with a {field!r} field; {show}")
        if field not in row:
            raise ValueError(f"{self._where(path)}: {where} has no field {field!r} (fields: "
                             f"{sorted(row)}); pass --text-field with the field that holds the "
                             f"text, or fix that record; {show}")
        doc = row[field]
        if not isinstance(doc, str):
            raise ValueError(f"{self._where(path)}: {where}: field {field!r} is "
                             f"{type(doc).__name__}, expected a string; fix that record; {show}")
        return doc

    def _decode(self, path: Path, raw: bytes, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            err = not_utf8_error(self.spec, [str(path)], e)
            raise ValueError(f"{err} (first bad byte at byte {offset + e.start} of the "
                             "file)") from e

    def _lines(self, path: Path, f, pos: int, b: int, h, chat: bool) -> Iterator:
        """Documents (chat: (row, where)) of the JSON lines of `f` that start at `pos` .. < b
        (pos is a line start); hashes every byte of those lines."""
        start = pos
        while pos < b:
            line = f.readline()
            if not line:
                break
            off, pos = pos, pos + len(line)
            h.update(line)
            body = line[3:] if off == 0 and line.startswith(_BOM) else line
            if not body.strip():
                continue
            text = self._decode(path, body, off + len(line) - len(body))
            show = f"`tail -c +{off + 1} {path} | head -n 1` shows it"
            where = f"the line starting at byte {off}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{self._where(path)}: {where} is not valid JSON ({e.msg}, column {e.colno}); "
                    f"fix or remove that line ({show}). A .jsonl file holds one JSON object per "
                    "line (a JSON array belongs in a .json file)") from None
            yield (row, {"path": path, "offset": off}) if chat else self._row_text(
                path, row, where, show)
        self.n_bytes += pos - start

    def _jsonl(self, path: Path, a: int, b: int, h, chat: bool) -> Iterator:
        with open(path, "rb") as f:
            pos = a
            if a > 0:
                f.seek(a - 1)
                if f.read(1) != b"\n":           # a line that started before a: not ours
                    pos = _skip_line(f)
            yield from self._lines(path, f, pos, b, h, chat)

    def _read_whole(self, path: Path, h) -> bytes:
        raw = path.read_bytes()
        h.update(raw)
        self.n_bytes += len(raw)
        return raw

    def _txt(self, path: Path, a: int, b: int, h, chat: bool) -> Iterator[str]:
        raw = self._read_whole(path, h)
        body = raw[3:] if raw.startswith(_BOM) else raw
        yield self._decode(path, body, len(raw) - len(body))

    def _json(self, path: Path, a: int, b: int, h, chat: bool) -> Iterator:
        raw = self._read_whole(path, h)
        body = raw[3:] if raw.startswith(_BOM) else raw
        if not body.lstrip().startswith(b"["):      # JSON lines with a .json suffix
            n_bytes = self.n_bytes                  # _read_whole hashed and counted them
            with io.BytesIO(raw) as f:
                yield from self._lines(path, f, 0, len(raw), hashlib.sha256(), chat)
            self.n_bytes = n_bytes
            return
        text = self._decode(path, body, len(raw) - len(body))
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self._where(path)}: not valid JSON ({e.msg}, line {e.lineno} "
                             f"column {e.colno}); a .json file holds a JSON array of objects "
                             "(or of strings) or one JSON object per line") from None
        for i, row in enumerate(rows):
            if chat:
                yield row, {"path": path, "element": i}
            elif isinstance(row, str):              # datasets names an array of strings 'text'
                if self.spec.text_field != "text":
                    raise ValueError(f"{self._where(path)}: an array of strings has one column, "
                                     f"'text'; --text-field is {self.spec.text_field!r}")
                yield row
            else:
                yield self._row_text(path, row, f"element {i} of the array",
                                     "elements are numbered from 0")

    def _parquet(self, path: Path, a: int, b: int, h, chat: bool) -> Iterator:
        import pyarrow.parquet as pq

        field = self.spec.text_field
        pf = pq.ParquetFile(path)
        md = pf.metadata
        names = [md.schema.column(i).path for i in range(md.num_columns)]
        cols = _parquet_columns(self.spec, path, names)
        chunks = [i for i, n in enumerate(names) if n.split(".")[0] in cols] if chat else \
            [names.index(field)]
        first = sum(md.row_group(g).num_rows for g in range(a))     # the file's row index
        with open(path, "rb") as raw:
            for g in range(a, b):
                for ci in chunks:
                    self._hash_chunk(raw, md.row_group(g).column(ci), h)
                if chat:
                    for i, row in enumerate(pf.read_row_group(g, columns=cols).to_pylist()):
                        yield row, {"path": path, "row": first + i, "group": g}
                    first += md.row_group(g).num_rows
                    continue
                col = pf.read_row_group(g, columns=[field]).column(0)
                for i, doc in enumerate(col.to_pylist()):
                    if not isinstance(doc, str):
                        raise ValueError(f"{self._where(path)}: row {i} of row group {g}: column "
                                         f"{field!r} is {type(doc).__name__}, expected a string")
                    yield doc


    def _hash_chunk(self, raw, cc, h) -> None:
        """Hash a column chunk's bytes (dictionary and data pages) as stored in the file."""
        lo = (cc.dictionary_page_offset if cc.has_dictionary_page
              and cc.dictionary_page_offset else cc.data_page_offset)
        raw.seek(lo)
        left = cc.total_compressed_size
        while left > 0:
            block = raw.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
            self.n_bytes += len(block)


def _skip_line(f) -> int:
    """Advance `f` past the next b'\\n' (or to EOF) without holding the line; the position."""
    while True:
        chunk = f.read(_SKIP_CHUNK)
        if not chunk:
            return f.tell()
        i = chunk.find(b"\n")
        if i >= 0:
            pos = f.tell() - len(chunk) + i + 1
            f.seek(pos)
            return pos
