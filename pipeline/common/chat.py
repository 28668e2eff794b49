"""Conversations -> packed windows of T tokens plus a per-token trainability mask.

Instruction data (issue 15): rows hold conversations; the teacher's distribution is
cached at every position as for plain text, but the student is trained only where the
*assistant* speaks. This module turns rows into token ids and a boolean mask, and packs them
into windows like `pipeline.common.text.windows`.

Rows
----
A row is a dict in one of two forms (field names configurable, `ChatFields`):

- `{"messages": [{"role": ..., "content": ...}, ...]}`;
- `{"prompt": ..., "response": ..., "system": ...}` (`system` optional), read as the
  messages `[system?, user: prompt, assistant: response]`.

Roles: `system`, `user`, `assistant`. Tool messages (`tool`, `ipython`, `function` roles, or
an assistant message with non-empty `tool_calls`) are refused for now. Only `role` and
`content` of a message reach the template (other keys, e.g. the None-filled columns HF
`datasets` adds when it unifies rows, are ignored). A field that is None counts as absent
(HF `datasets` fills the columns a row lacks with None). A malformed row raises a ValueError
naming the file, the row index and the fix. A conversation without an assistant message
parses to None: the caller skips it and counts it (`ChatStats.skipped_no_assistant`).

Rendering
---------
The conversation is rendered to one string with the chat template (the tokenizer's, or an
explicit template string, e.g. read from a `--chat-template FILE.jinja`), never with a
generation prompt. Let `R(k)` be the rendering of the first k messages (`R(0) = ""`). The
template must be *prefix-stable*: `R(k)` is a string prefix of `R(k+1)` for every k, so the
characters message k adds are `R(k+1)[len(R(k)):]` and keep their place in the full
rendering `R(n)`; otherwise a ValueError ("template renders differently when the
conversation is cut turn by turn; masks would be wrong").

For an assistant message k, its added text is split into *header*, *content* and *footer*
by rendering `messages[:k]` plus that message with its content replaced by a placeholder
string: the text before the placeholder is the header (e.g. ChatML `<|im_start|>assistant\\n`),
the text after it is the footer (e.g. `<|im_end|>\\n`). The real added text must start with
that header and end with that footer (else a ValueError: the template's header or footer
depends on the content); what lies between is the rendered content (equal to the message's
content for templates that insert it verbatim; a template that e.g. trims it is followed).

Trainability (exact definition)
-------------------------------
Trainable characters of the full rendering, per assistant message: its rendered content
plus its *end-of-turn*, where the end-of-turn is

- the footer up to and including the first occurrence of the tokenizer's EOS token string,
  if the footer contains it (ChatML with `<|im_end|>` as EOS: `<|im_end|>`);
- otherwise the footer with trailing whitespace removed (ChatML with another EOS:
  `<|im_end|>` again; a template whose footer is only `\\n`: nothing).

Nothing else is trainable: not the assistant header, not what follows the end-of-turn
(ChatML's `\\n`), not any character of system or user messages, nor any text the template
adds around them (a default system prompt, a BOS string).

The rendering is tokenized once, whole, with `add_special_tokens=False` (the template
emits any BOS itself; nothing is added, so no double BOS) and `return_offsets_mapping=True`
(a fast tokenizer is required). Token i with character span [s, e) is trainable iff

- e > s and [s, e) overlaps a trainable character range (a token straddling a boundary,
  e.g. BPE merging the header's `\\n` with the content's first letter, is trainable:
  its prediction contains assistant text), or
- e == s (a token with an empty span) and s lies inside a trainable range.

Masks and packing
-----------------
`mask[t] = True` iff the token at position t is trainable, i.e. the prediction made at
position t-1 (of x_t given x_0..x_{t-1}) is trained. `target_mask` converts a window's mask
to the "position p predicts the next token" form used by the losses and the cache
(kd.bin position p describes token p+1): `target_mask(mask)[p] = mask[p+1]`,
p = 0..T-2. (mask[0] of a window is the target of the previous window's last position,
which that form leaves out.)

`chat_windows` concatenates conversations in order and cuts consecutive windows of exactly
T tokens, the incomplete tail dropped, exactly like `pipeline.common.text.windows`. Unlike
`pipeline.common.text.token_stream`'s documents, **no EOS is appended** after a conversation: the
template already ends every turn with its end-of-turn marker (trainable, so the student
learns to stop), and the next conversation opens with the template's own header (ChatML
`<|im_start|>system`), which separates conversations as EOS separates documents. For
instruct tokenizers the EOS is the end-of-turn marker itself (SmolLM2: `<|im_end|>`), so an
appended EOS would be a duplicate the model never sees in chat use.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROLES = ("system", "user", "assistant")
_TOOL_ROLES = ("tool", "ipython", "function")
_PLACEHOLDER = "SAMPLEDKDxCONTENTxPLACEHOLDERx7f3a91"
_UNSTABLE = ("template renders differently when the conversation is cut turn by turn; "
             "masks would be wrong")
_FLAG = "--chat-template FILE.jinja"


@dataclass(frozen=True)
class ChatFields:
    """Names of the row fields a conversation is read from."""

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    system: str = "system"


# ---------------------------------------------------------------- rows

def _bad(source: str, index: int, what: str, fix: str) -> ValueError:
    return ValueError(f"{source} row {index}: {what}; {fix}")


def _message(m, source: str, index: int, j: int) -> dict:
    where = f"message {j}"
    if not isinstance(m, Mapping):
        raise _bad(source, index, f"{where} is a {type(m).__name__}, not an object",
                   "each message must be an object {\"role\": ..., \"content\": ...}")
    role = m.get("role")
    if role is None:
        raise _bad(source, index, f"{where} has no 'role' (keys: {sorted(m)})",
                   f"give every message a role among {list(ROLES)}")
    if not isinstance(role, str):
        raise _bad(source, index, f"{where}: role is a {type(role).__name__}",
                   f"the role must be a string among {list(ROLES)}")
    if role in _TOOL_ROLES or (role == "assistant" and m.get("tool_calls")):
        raise _bad(source, index, f"{where} is a tool message (role {role!r}"
                   f"{', with tool_calls' if role == 'assistant' else ''})",
                   "tool messages are not supported yet: drop those conversations or messages")
    if role not in ROLES:
        raise _bad(source, index, f"{where} has unknown role {role!r}",
                   f"use one of {list(ROLES)}")
    if "content" not in m or m["content"] is None:
        raise _bad(source, index, f"{where} ({role}) has no 'content'",
                   "give every message a string content")
    content = m["content"]
    if not isinstance(content, str):
        raise _bad(source, index, f"{where} ({role}): content is a {type(content).__name__}, "
                   "not a string", "give every message a plain string content (multimodal "
                   "content lists are not supported)")
    return {"role": role, "content": content}


def parse_row(row, source: str, index: int, fields: ChatFields = ChatFields()) -> list[dict] | None:
    """The row's messages ([{"role", "content"}, ...]), or None when it has no assistant
    message. `source` (the file) and `index` (the row's index in it) name the row in errors."""
    if not isinstance(row, Mapping):
        raise _bad(source, index, f"row is a {type(row).__name__}, not an object",
                   f"each row must be an object with {fields.messages!r} or "
                   f"{fields.prompt!r}/{fields.response!r}")
    msgs = row.get(fields.messages)
    pair = {k: row.get(k) for k in (fields.prompt, fields.response)}
    has_pair = any(v is not None for v in pair.values())
    if msgs is not None and has_pair:
        raise _bad(source, index, f"row has both {fields.messages!r} and "
                   f"{fields.prompt!r}/{fields.response!r}", "keep one form per row")
    if msgs is not None:
        if not isinstance(msgs, (list, tuple)):
            raise _bad(source, index, f"{fields.messages!r} is a {type(msgs).__name__}, not a list",
                       "it must be a list of {\"role\": ..., \"content\": ...} objects")
        if not msgs:
            raise _bad(source, index, f"{fields.messages!r} is an empty list",
                       "drop the row or give it messages")
        messages = [_message(m, source, index, j) for j, m in enumerate(msgs)]
    elif has_pair:
        for k, v in pair.items():
            if v is None:
                other = next(x for x in pair if x != k)
                raise _bad(source, index, f"row has {other!r} but no {k!r}",
                           f"give both {fields.prompt!r} and {fields.response!r}")
            if not isinstance(v, str):
                raise _bad(source, index, f"field {k!r} is a {type(v).__name__}, not a string",
                           "prompt and response must be strings")
        system = row.get(fields.system)
        if system is not None and not isinstance(system, str):
            raise _bad(source, index, f"field {fields.system!r} is a {type(system).__name__}, "
                       "not a string", "the system prompt must be a string (or absent)")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": pair[fields.prompt]},
            {"role": "assistant", "content": pair[fields.response]}]
    else:
        keys = sorted(row) if all(isinstance(k, str) for k in row) else list(row)
        raise _bad(source, index, f"row has neither {fields.messages!r} nor "
                   f"{fields.prompt!r}/{fields.response!r} (fields: {keys})",
                   "name the fields that hold the conversation")
    if not any(m["role"] == "assistant" for m in messages):
        return None
    return messages


# ---------------------------------------------------------------- rendering

def read_chat_template(path: str | Path) -> str:
    """The template text of a `--chat-template FILE.jinja`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{_FLAG.split()[0]} {path}: no such file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{_FLAG.split()[0]} {path}: the file is empty")
    return text


def check_chat_tokenizer(tokenizer, chat_template: str | None) -> None:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                         f"template; supply one with {_FLAG} (a Jinja template rendering "
                         "`messages`)")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast "
                         "tokenizer; masks need its offset mapping (load it with use_fast=True "
                         "or from a tokenizer.json)")


def render(messages: list[dict], tokenizer, chat_template: str | None = None) -> str:
    """The chat template's rendering of `messages` (no generation prompt); "" for none."""
    if not messages:
        return ""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                             tokenize=False, add_generation_prompt=False)
    except TemplateError as e:
        raise ValueError(f"the chat template refused the conversation: {e}") from e
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered a {type(text).__name__}, not a string")
    return text


def _unstable(k: int, before: str, after: str) -> ValueError:
    d = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    return ValueError(f"{_UNSTABLE} (the first {k} messages render to text that is not a prefix "
                      f"of the first {k + 1}'s: they differ at character {d}: "
                      f"{before[max(0, d - 20):d + 20]!r} vs {after[max(0, d - 20):d + 20]!r}); "
                      f"use a prefix-stable template ({_FLAG})")


def assistant_spans(messages: list[dict], tokenizer,
                    chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(the full rendering, the trainable character ranges [a, b) in it): per assistant
    message its rendered content plus its end-of-turn (module docstring)."""
    check_chat_tokenizer(tokenizer, chat_template)
    eos = getattr(tokenizer, "eos_token", None)
    prev = ""
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        cur = render(messages[:k + 1], tokenizer, chat_template)
        if not cur.startswith(prev):
            raise _unstable(k, prev, cur)
        if m["role"] == "assistant":
            added = cur[len(prev):]
            ph = render(messages[:k] + [{"role": "assistant", "content": _PLACEHOLDER}],
                        tokenizer, chat_template)
            if not ph.startswith(prev):
                raise _unstable(k, prev, ph)
            ph_added = ph[len(prev):]
            if ph_added.count(_PLACEHOLDER) != 1:
                raise ValueError(f"the chat template does not render an assistant message's "
                                 f"content verbatim exactly once (message {k}); cannot locate "
                                 f"the content: use a template that does ({_FLAG})")
            header, footer = ph_added.split(_PLACEHOLDER)
            if not (added.startswith(header) and added.endswith(footer)
                    and len(header) + len(footer) <= len(added)):
                raise ValueError(f"the chat template renders the assistant header or footer "
                                 f"differently depending on the content (message {k}: header "
                                 f"{header!r}, footer {footer!r}, rendered {added!r}); masks would "
                                 f"be wrong: use a template that does not ({_FLAG})")
            if eos and eos in footer:
                eot = footer[:footer.index(eos) + len(eos)]
            else:
                eot = footer.rstrip()
            a = len(prev) + len(header)
            b = len(prev) + len(added) - len(footer) + len(eot)
            if b > a:
                spans.append((a, b))
        prev = cur
    return prev, spans


@dataclass(frozen=True)
class EncodedChat:
    """One conversation: its token ids, their trainability, and where they came from."""

    ids: np.ndarray
    """uint32 token ids of the rendering."""
    mask: np.ndarray
    """bool, `mask[t]` = token t is trainable (module docstring)."""
    text: str
    """The rendering."""
    spans: tuple[tuple[int, int], ...]
    """The trainable character ranges [a, b) of `text`."""


def token_mask(offsets, spans: Iterable[tuple[int, int]], n_chars: int) -> np.ndarray:
    """bool per token: its character span [s, e) overlaps a span (or, e == s, s lies in one)."""
    chars = np.zeros(n_chars + 1, dtype=bool)
    for a, b in spans:
        chars[a:b] = True
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s, e = off[:, 0], off[:, 1]
    csum = np.concatenate([[0], np.cumsum(chars, dtype=np.int64)])
    overlap = (csum[np.maximum(e, s)] - csum[s]) > 0
    return np.where(e > s, overlap, chars[np.minimum(s, n_chars)])


def encode_conversation(messages: list[dict], tokenizer,
                        chat_template: str | None = None) -> EncodedChat:
    """Render, tokenize (once, whole, add_special_tokens=False) and mask one conversation."""
    text, spans = assistant_spans(messages, tokenizer, chat_template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.uint32)
    mask = token_mask(enc["offset_mapping"], spans, len(text))
    return EncodedChat(ids=ids, mask=mask, text=text, spans=tuple(spans))


# ---------------------------------------------------------------- statistics

@dataclass
class ChatStats:
    """Counts over encoded conversations."""

    conversations: int = 0
    """Conversations encoded (with at least one assistant message)."""
    skipped_no_assistant: int = 0
    """Rows skipped: conversation without an assistant message."""
    tokens: int = 0
    """Tokens of the encoded conversations (before packing; the dropped tail included)."""
    trainable_tokens: int = 0
    """Of those, trainable (mask True)."""

    def add(self, enc: EncodedChat) -> None:
        self.conversations += 1
        self.tokens += int(len(enc.ids))
        self.trainable_tokens += int(np.count_nonzero(enc.mask))

    def skip(self) -> None:
        self.skipped_no_assistant += 1

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_tokens / self.tokens if self.tokens else 0.0

    def to_json(self) -> dict:
        return asdict(self)


def encode_rows(rows: Iterable, tokenizer, source: str, fields: ChatFields = ChatFields(),
                chat_template: str | None = None, stats: ChatStats | None = None,
                start_index: int = 0) -> Iterator[EncodedChat]:
    """Parse and encode rows of file `source` in order (row indices from `start_index`),
    skipping (and counting) conversations without an assistant message. Errors name the
    file and row."""
    check_chat_tokenizer(tokenizer, chat_template)
    stats = stats if stats is not None else ChatStats()
    for i, row in enumerate(rows, start_index):
        messages = parse_row(row, source, i, fields)
        if messages is None:
            stats.skip()
            continue
        try:
            enc = encode_conversation(messages, tokenizer, chat_template)
        except ValueError as e:
            raise ValueError(f"{source} row {i}: {e}") from e
        stats.add(enc)
        yield enc


# ---------------------------------------------------------------- packing

def chat_windows(conversations: Iterable, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Concatenate conversations (`EncodedChat`s or `(ids, mask)` pairs) in order, nothing
    appended between them, and cut consecutive windows of exactly `seq_len` tokens:
    `(ids uint32 [T], mask bool [T])` per window; the incomplete tail is dropped (as
    `pipeline.common.text.windows`)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} must be >= 2")
    buf = np.empty(0, dtype=np.uint32)
    mbuf = np.empty(0, dtype=bool)
    for item in conversations:
        ids, mask = (item.ids, item.mask) if isinstance(item, EncodedChat) else item
        ids = np.asarray(ids, dtype=np.uint32)
        mask = np.asarray(mask, dtype=bool)
        if ids.shape != mask.shape or ids.ndim != 1:
            raise ValueError(f"ids {ids.shape} and mask {mask.shape} must be 1-d of one length")
        buf = np.concatenate([buf, ids]) if len(buf) else ids
        mbuf = np.concatenate([mbuf, mask]) if len(mbuf) else mask
        n = len(buf) // seq_len
        for i in range(n):
            yield buf[i * seq_len:(i + 1) * seq_len], mbuf[i * seq_len:(i + 1) * seq_len]
        buf, mbuf = buf[n * seq_len:], mbuf[n * seq_len:]


def target_mask(mask: np.ndarray) -> np.ndarray:
    """Token-form mask [..., T] -> prediction form [..., T-1]: entry p says whether the
    prediction at position p (of token p+1) is trained, p = 0..T-2."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[-1] < 2:
        raise ValueError(f"mask of {mask.shape[-1]} positions; need >= 2")
    return mask[..., 1:]
