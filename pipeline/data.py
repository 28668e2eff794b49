"""Corpus -> fixed windows of T tokens.

Documents come through HF `datasets` (local json/jsonl/parquet/txt/csv files, a folder of
them, or a hub dataset name), are tokenized with `add_special_tokens=False`, get the
tokenizer's EOS id appended, are concatenated in dataset order and cut into consecutive
windows of exactly T tokens; the last incomplete window is dropped. Window w of the
whole corpus belongs to rank `w % world` (round robin keeps ranks balanced to within
one window whatever the corpus size).

Every rank tokenizes the whole stream to find the window boundaries; with a fast
tokenizer that is ~1M tokens/s per core, negligible next to a teacher forward pass.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
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


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"--data {path}: folder holds no {sorted(_BUILDERS)} files")
    builders = {_BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(f"--data {path}: need files of one kind among {sorted(_BUILDERS)}, "
                         f"got suffixes {sorted({f.suffix for f in files})}")
    return builders.pop(), [str(f) for f in files]


def load_documents(spec: DataSpec) -> Iterable[str]:
    """The corpus's documents, in dataset order, as strings."""
    import datasets

    path = Path(spec.path).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        if any(Path(f).stat().st_size == 0 for f in files):
            empty = [f for f in files if Path(f).stat().st_size == 0]
            raise ValueError(f"--data {spec.path}: empty file(s) {empty}")
        ds = datasets.load_dataset(builder, data_files={spec.split: files}, split=spec.split,
                                   streaming=spec.streaming)
        field = "text" if builder == "text" else spec.text_field
    elif path.suffix in _BUILDERS:
        # "data/corpus.jsonl" would otherwise be taken for the hub name "data/corpus.jsonl".
        raise ValueError(f"--data {spec.path}: no such file ({path.resolve()})")
    elif "/" in spec.path and not spec.path.startswith((".", "/", "~")):
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=spec.streaming)
        field = spec.text_field
    else:
        raise ValueError(f"--data {spec.path}: no such file or folder (and not a hub name 'org/name')")
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if field not in columns:
        raise ValueError(f"--text-field {field!r} is not a column of {spec.path}; columns: {columns}")
    return (row[field] for row in ds)


def dataset_fingerprint(spec: DataSpec) -> str:
    """sha256 over the spec and, for local data, the bytes of every file."""
    h = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode())
    path = Path(spec.path).expanduser()
    if path.exists():
        for f in _local_files(path)[1]:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


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


def rank_windows(spec: DataSpec, tokenizer, seq_len: int, rank: int = 0, world: int = 1,
                 start: int = 0, max_windows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(global_window_index, tokens[T] uint32)` for the windows of `rank`.

    `start` skips the rank's first `start` windows (resume); `max_windows` caps the number
    of windows of the whole corpus considered (all ranks together).
    """
    docs = load_documents(spec)
    k = 0
    for w, win in enumerate(windows(token_stream(docs, tokenizer), seq_len)):
        if max_windows is not None and w >= max_windows:
            return
        if w % world != rank:
            continue
        if k >= start:
            yield w, win
        k += 1


def count_windows(spec: DataSpec, tokenizer, seq_len: int, max_windows: int | None = None) -> int:
    """Number of windows of the whole corpus (one tokenization pass)."""
    n = 0
    for _ in windows(token_stream(load_documents(spec), tokenizer), seq_len):
        n += 1
        if max_windows is not None and n >= max_windows:
            break
    return n
