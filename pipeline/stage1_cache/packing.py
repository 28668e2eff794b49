"""A work unit's contents -> windows of T tokens (the cache stage's input, per unit).

Text (`unit_windows`): the unit's documents, each followed by EOS, concatenated and cut into
windows of T tokens, the last partial window dropped (`data.token_stream` + `data.windows`).

Chat (`chat_unit_windows`, `--data-format chat`): the unit's rows (`UnitReader.rows()`) go
through `pipeline.common.chat.encode_rows` (parsed, rendered with the chat template, tokenized
whole, masked; a conversation without an assistant message is skipped and counted) and are
packed exactly as `pipeline.common.chat.chat_windows` packs them (concatenated, nothing appended
between conversations, the last partial window dropped). Each window comes with its
`trainable` flags in the cache's position form (kd.bin position p describes token p+1):

    trainable[p] = mask[p + 1]                      p = 0 .. T-2   (chat.target_mask)
    trainable[T-1] = mask of the token that follows the window in the unit's token stream
                     (the next window's first token, or the first token of the dropped
                     tail), False when the window ends exactly at the stream's end

so a window's flags do not depend on whether later windows are cached (--max-windows).
A malformed row raises a ValueError naming the file and the row: the row's index in its
file (0-based; rows of a .jsonl are its non-blank lines), and for a JSON line also its
1-based line number and the byte offset where it starts (counted from the file's start
only when a row fails, so a unit that starts mid-file costs nothing extra otherwise).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.common.text import token_stream, windows


@dataclass
class UnitStats:
    """Counts of one `unit_windows` (or `chat_unit_windows`) pass, final once the iterator is
    exhausted."""

    documents: int = 0
    """Documents (chat: conversations encoded)."""
    tokens: int = 0
    """Tokens of the unit's documents, EOS included (what was tokenized); chat: of its
    encoded conversations."""
    windows: int = 0
    dropped_tokens: int = 0
    """Tokens of the last partial window (tokens - windows * seq_len)."""


def unit_windows(docs: Iterable[str], tokenizer, seq_len: int,
                 stats: UnitStats | None = None) -> Iterator[np.ndarray]:
    """The unit's windows of `seq_len` tokens: each document followed by EOS, concatenated,
    the last partial window dropped (`data.token_stream` + `data.windows`). Counts go into
    `stats` (pass a `UnitStats` to read them after the iterator is exhausted)."""
    stats = stats if stats is not None else UnitStats()
    stats.documents = stats.tokens = stats.windows = stats.dropped_tokens = 0

    def counted_docs():
        for d in docs:
            stats.documents += 1
            yield d

    def counted_tokens():
        for piece in token_stream(counted_docs(), tokenizer):
            stats.tokens += len(piece)
            yield piece

    for win in windows(counted_tokens(), seq_len):
        stats.windows += 1
        yield win
    stats.dropped_tokens = stats.tokens - stats.windows * seq_len


# ---------------------------------------------------------------- conversations

def pack_trainable(conversations: Iterable, seq_len: int,
                   stats: UnitStats | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(ids uint32 [T], trainable bool [T])` per window: the windows of
    `chat.chat_windows(conversations, seq_len)` (`EncodedChat`s or `(ids, mask)` pairs),
    with the flags of the module docstring. A window is given once the token after it is
    known (or the stream has ended)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} must be >= 2")
    stats = stats if stats is not None else UnitStats()
    stats.documents = stats.tokens = stats.windows = stats.dropped_tokens = 0
    T = seq_len
    buf = np.empty(0, dtype=np.uint32)
    mbuf = np.empty(0, dtype=bool)
    for item in conversations:
        ids, mask = (item.ids, item.mask) if hasattr(item, "mask") else item
        ids, mask = np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=bool)
        if ids.shape != mask.shape or ids.ndim != 1:
            raise ValueError(f"ids {ids.shape} and mask {mask.shape} must be 1-d of one length")
        stats.documents += 1
        stats.tokens += len(ids)
        buf, mbuf = np.concatenate([buf, ids]), np.concatenate([mbuf, mask])
        n = (len(buf) - 1) // T if len(buf) else 0     # windows whose next token is known
        for i in range(n):
            stats.windows += 1
            yield buf[i * T:(i + 1) * T], mbuf[i * T + 1:(i + 1) * T + 1].copy()
        buf, mbuf = buf[n * T:], mbuf[n * T:]
    if len(buf) == T:                                   # the stream ends with this window
        stats.windows += 1
        yield buf, np.concatenate([mbuf[1:], [False]])
    stats.dropped_tokens = stats.tokens - stats.windows * T


def chat_fields(spec):
    """`chat.ChatFields` of a `data.ChatDataSpec`."""
    from pipeline.common.chat import ChatFields

    return ChatFields(messages=spec.messages_field, prompt=spec.prompt_field,
                      response=spec.response_field, system=spec.system_field)


def resolve_chat_template(tokenizer, path: str | None) -> str:
    """The template text conversations are rendered with: the `--chat-template` file's, else
    the tokenizer's own (a tokenizer without one is refused, the message saying how to
    supply one). A fast tokenizer is required (masks need its offsets)."""
    from pipeline.common.chat import check_chat_tokenizer, read_chat_template

    if path is not None:
        text = read_chat_template(path)
    else:
        check_chat_tokenizer(tokenizer, None)
        text = tokenizer.get_chat_template()
    check_chat_tokenizer(tokenizer, text)
    return text


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chat_unit_windows(reader, tokenizer, seq_len: int, chat_template: str,
                      stats: UnitStats | None = None,
                      chat_stats=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The unit's conversation windows and their trainable flags (module docstring).
    `reader`: a `units.UnitReader` of a chat spec; `chat_stats`: a `chat.ChatStats` that
    counts the conversations encoded and skipped."""
    from pipeline.common.chat import ChatStats, encode_rows

    fields = chat_fields(reader.spec)
    chat_stats = chat_stats if chat_stats is not None else ChatStats()

    def conversations():
        for row, loc in reader.rows():
            try:
                encoded = list(encode_rows([row], tokenizer, "", fields, chat_template, chat_stats))
            except ValueError:
                # Name the row: its place is computed now (a jsonl line's number means
                # counting the lines before it), and the row encoded again to say so.
                source, index = row_label(reader.spec, loc)
                list(encode_rows([row], tokenizer, source, fields, chat_template, ChatStats(),
                                 start_index=index))
                raise
            yield from encoded

    yield from pack_trainable(conversations(), seq_len, stats)


def row_label(spec, loc: dict) -> tuple[str, int]:
    """(source, row index) naming a row in errors, from where `UnitReader.rows()` found it."""
    path = loc["path"]
    where = f"--data {spec.path}: file {path}"
    if "offset" in loc:
        line, row = line_and_row(path, loc["offset"])
        return (f"{where} (line {line}, starting at byte {loc['offset']}; `sed -n {line}p "
                f"{path}` shows it)", row)
    if "group" in loc:
        return f"{where} (row group {loc['group']})", loc["row"]
    return where, loc["element"]


def line_and_row(path, offset: int) -> tuple[int, int]:
    """(1-based line number, 0-based row index: non-blank lines before it) of the line of
    a JSON-lines file that starts at byte `offset`; reads the file up to `offset`."""
    lines = rows = 0
    carry = b""
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            parts = (carry + chunk).split(b"\n")
            carry = parts.pop()
            for part in parts:
                body = part[3:] if lines == 0 and part.startswith(b"\xef\xbb\xbf") else part
                lines += 1
                rows += bool(body.strip())
    return lines + 1, rows
