"""Corpus -> fixed windows of T tokens.

Documents come through HF `datasets` (local json/jsonl/parquet/txt/csv files, a folder of
them, or a hub dataset name), are tokenized with `add_special_tokens=False`, get the
tokenizer's EOS id appended, are concatenated in dataset order and cut into consecutive
windows of exactly T tokens; the last incomplete window is dropped. The cache stage does
this per work unit (pipeline.stage1_cache.units), the held-out evaluation over its whole file
(pipeline.common.heldout).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
             ".csv": "csv"}


@dataclass(frozen=True)
class DataSpec:
    """Where the corpus comes from."""

    path: str
    """Local file, folder of files, or a hub dataset name."""
    text_field: str = "text"
    """Column holding the document text (`text` for .txt files)."""
    split: str = "train"
    """Dataset split to read."""
    name: str | None = None
    """Hub dataset configuration name, if any."""
    streaming: bool = False
    """Stream instead of materializing (for corpora larger than memory or disk cache)."""

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def columns(self) -> tuple[str, ...]:
        """The row fields a work unit reads (the text field)."""
        return (self.text_field,)

    @property
    def is_chat(self) -> bool:
        return False


@dataclass(frozen=True)
class ChatDataSpec(DataSpec):
    """A corpus of conversations (`--data-format chat`, pipeline.common.chat): rows hold
    `messages_field` (a list of {role, content}) or `prompt_field`/`response_field` (and
    optionally `system_field`). `text_field` is unused."""

    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str = "system"

    def to_json(self) -> dict:
        d = asdict(self)
        del d["text_field"]
        return {"format": "chat", **d}

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.messages_field, self.prompt_field, self.response_field, self.system_field)

    @property
    def is_chat(self) -> bool:
        return True


def local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"--data {path}: folder holds no {sorted(FILE_BUILDERS)} files")
    builders = {FILE_BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(f"--data {path}: need files of one kind among {sorted(FILE_BUILDERS)}, "
                         f"got suffixes {sorted({f.suffix for f in files})}")
    return builders.pop(), [str(f) for f in files]


def _decode_errors() -> tuple[type[BaseException], ...]:
    from datasets.exceptions import DatasetGenerationError

    return (UnicodeDecodeError, DatasetGenerationError)


def _unicode_error(e: BaseException) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError that `e` is or wraps (datasets raises DatasetGenerationError
    from one when a non-streaming .txt file holds bytes that are not UTF-8), else None."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        if isinstance(x, UnicodeDecodeError):
            return x
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    return None


def not_utf8_error(spec: DataSpec, files: list[str], e: UnicodeDecodeError) -> ValueError:
    """A named error for a corpus that is not UTF-8. Which file: the only one, or the spec's
    files (the decode error does not say which, and checking every file up front would read
    the whole corpus an extra time)."""
    bad = e.object[e.start:e.start + 8] if isinstance(e.object, (bytes, bytearray)) else b""
    detail = f"{e.reason}: bytes {bytes(bad)!r}"
    if len(files) == 1:
        return ValueError(
            f"--data {spec.path}: file {files[0]} is not valid UTF-8 ({detail}); re-encode it as "
            f"UTF-8 (e.g. `iconv -f latin1 -t utf-8 {files[0]} > fixed{Path(files[0]).suffix}` "
            f"if it is Latin-1); `LC_ALL=C.UTF-8 grep -naxv '.*' {files[0]}` lists the lines "
            "that are not")
    if files:
        shown = ", ".join(files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
        return ValueError(
            f"--data {spec.path}: a file among {shown} is not valid UTF-8 ({detail}); "
            f"`LC_ALL=C.UTF-8 grep -rlaxv '.*' {spec.path}` lists the files that are not; "
            "re-encode them as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    return ValueError(f"--data {spec.path}: the dataset holds text that is not valid UTF-8 "
                      f"({detail}); re-encode its files as UTF-8")


def _texts(ds, field: str, spec: DataSpec, files: list[str]) -> Iterator[str]:
    """`row[field]` of every row; decoding errors (raised lazily, while the rows are read:
    streaming, or .jsonl) become `not_utf8_error`'s named error."""
    try:
        for row in ds:
            yield row[field]
    except _decode_errors() as e:
        u = _unicode_error(e)
        if u is None:
            raise
        raise not_utf8_error(spec, files, u) from e


def load_documents(spec: DataSpec) -> Iterable[str]:
    """The corpus's documents, in dataset order, as strings.

    A `.txt` file is one document: its whole text as stored (UTF-8, a leading BOM dropped,
    line breaks and a final newline kept); a folder of `.txt` files gives one document per
    file, in sorted order (not `datasets`' text builder, which makes every line a document).

    A corpus that is not UTF-8 raises a ValueError naming --data and its file(s), here or
    while the documents are iterated (streaming datasets, .jsonl and .txt decode lazily)."""
    import datasets

    def _txt_documents(spec: DataSpec, files: list[str]) -> Iterator[str]:
        for f in files:
            raw = Path(f).read_bytes()
            try:
                doc = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise not_utf8_error(spec, [f], e) from e
            yield doc

    path = Path(spec.path).expanduser()
    files: list[str] = []
    if path.exists():
        builder, files = local_files(path)
        if any(Path(f).stat().st_size == 0 for f in files):
            empty = [f for f in files if Path(f).stat().st_size == 0]
            raise ValueError(f"--data {spec.path}: empty file(s) {empty}")
        if builder == "text":
            return _txt_documents(spec, files)
        try:
            ds = datasets.load_dataset(builder, data_files={spec.split: files}, split=spec.split,
                                       streaming=spec.streaming)
        except _decode_errors() as e:
            u = _unicode_error(e)
            if u is None:
                raise
            raise not_utf8_error(spec, files, u) from e
        field = "text" if builder == "text" else spec.text_field
    elif path.suffix in FILE_BUILDERS:
        # "data/corpus.jsonl" would otherwise be taken for the hub name "data/corpus.jsonl".
        raise ValueError(f"--data {spec.path}: no such file ({path.resolve()})")
    elif "/" in spec.path and not spec.path.startswith((".", "/", "~")):
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=spec.streaming)
        field = spec.text_field
    else:
        raise ValueError(f"--data {spec.path}: no such file or folder (and not a hub name 'org/name')")
    columns = ds.column_names
    if columns is None:        # streaming json: the first row tells
        try:
            columns = list(next(iter(ds)).keys())
        except _decode_errors() as e:
            u = _unicode_error(e)
            if u is None:
                raise
            raise not_utf8_error(spec, files, u) from e
    if field not in columns:
        raise ValueError(f"--text-field {field!r} is not a column of {spec.path}; columns: {columns}")
    return _texts(ds, field, spec, files)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id) and special tokens.

    Merges are implied by the vocabulary for the BPE tokenizers we meet; added tokens are
    part of `get_vocab()`.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def token_stream(docs: Iterable[str], tokenizer, batch_docs: int = 256) -> Iterator[np.ndarray]:
    """Token ids of each document followed by EOS, as uint32 arrays, in order."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id; documents "
                         "cannot be separated")
    batch: list[str] = []

    def flush():
        enc = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in enc:
            yield np.asarray(ids + [eos], dtype=np.uint32)

    for doc in docs:
        if not isinstance(doc, str):
            raise ValueError(f"document of type {type(doc).__name__} in the text field; expected str")
        batch.append(doc)
        if len(batch) == batch_docs:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def windows(tokens: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Cut a stream of token arrays into consecutive windows of exactly `seq_len` tokens."""
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} must be >= 2")
    buf = np.empty(0, dtype=np.uint32)
    for piece in tokens:
        buf = np.concatenate([buf, piece]) if len(buf) else piece
        n = len(buf) // seq_len
        for i in range(n):
            yield buf[i * seq_len:(i + 1) * seq_len]
        buf = buf[n * seq_len:]
