"""pipeline.common.text: corpus -> windows of T tokens, against an independent tokenization.

The reference tokenizes every document on its own (`encode(doc, add_special_tokens=False)`
plus EOS), concatenates in file order, cuts windows of T tokens and drops the tail; the
code under test batches documents through HF `datasets` and a streaming window cutter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.common.text import DataSpec, load_documents, token_stream, windows
from references import reference_windows

T = 16
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "teacher", "student",
         "knowledge", "42", "answer", "because", "naïve", "café", "東京", "🙂", "--", "(x)"]


@pytest.fixture(scope="module")
def tok():
    from pipeline.demo.tiny import train_tokenizer

    return train_tokenizer()


def make_docs(n: int, seed: int) -> list[str]:
    """n documents of 0-40 words (empty ones included), no newlines."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(0, 41)))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d, "meta": "x"}, ensure_ascii=False) + "\n")
    return path


def write_corpus(tmp_path: Path, kind: str, docs: list[str]) -> tuple[DataSpec, list[str]]:
    """The corpus as `kind`; returns the spec and the documents in the order they are read."""
    if kind == "jsonl":
        return DataSpec(str(write_jsonl(tmp_path / "c.jsonl", docs))), docs
    if kind == "txt":
        # A .txt file is ONE document (its whole text, line breaks and blank lines
        # included), not one per line: one EOS at its end.
        p = tmp_path / "c.txt"
        text = "\n".join(docs) + "\n"
        p.write_text(text, encoding="utf-8")
        return DataSpec(str(p), text_field="ignored-for-txt"), [text]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "c.parquet"
        pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), p)
        return DataSpec(str(p), text_field="body"), docs
    if kind == "folder":
        # Files are read in sorted name order: b.jsonl's documents come after a.jsonl's.
        d = tmp_path / "corpus"
        d.mkdir()
        write_jsonl(d / "b.jsonl", docs[len(docs) // 2:])
        write_jsonl(d / "a.jsonl", docs[:len(docs) // 2])
        (d / "README").write_text("not a data file: ignored")
        return DataSpec(str(d)), docs
    raise AssertionError(kind)


def rank_windows(spec: DataSpec, tok, seq_len: int, rank: int = 0, world: int = 1):
    """(index, window) of the corpus's windows: what heldout and the units cut, through
    the pipeline's load_documents -> token_stream -> windows."""
    for w, win in enumerate(windows(token_stream(load_documents(spec), tok), seq_len)):
        if w % world == rank:
            yield w, win


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "folder"])
def test_windows_equal_independent_tokenization(tmp_path, tok, kind):
    spec, docs = write_corpus(tmp_path, kind, make_docs(60, seed=1))
    ref = reference_windows(docs, tok, T)
    assert len(ref) >= 20, "corpus too small for a meaningful test"
    got = list(rank_windows(spec, tok, T))
    assert [w for w, _ in got] == list(range(len(ref)))
    for w, win in got:
        assert win.dtype == np.uint32 and win.shape == (T,)
        np.testing.assert_array_equal(win, ref[w], err_msg=f"window {w}")


def test_document_boundaries_carry_eos(tmp_path, tok):
    docs = ["the quick brown fox", "", "lazy dog"]
    spec, _ = write_corpus(tmp_path, "jsonl", docs * 20)
    eos = tok.eos_token_id
    flat = np.concatenate([win for _, win in rank_windows(spec, tok, 4)])
    a, b = (tok.encode(d, add_special_tokens=False) for d in ("the quick brown fox", "lazy dog"))
    period = a + [eos] + [eos] + b + [eos]          # the empty document is one EOS
    np.testing.assert_array_equal(flat, np.tile(period, 20)[:len(flat)])


def test_missing_file(tmp_path, tok, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=r"--data .*nope\.jsonl.*no such file"):
        load_documents(DataSpec(str(missing)))
    # A relative path with a data suffix is a missing file, not a hub dataset name.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--data data/corpus\.jsonl: no such file"):
        load_documents(DataSpec("data/corpus.jsonl"))


def test_empty_file_and_folder(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"--data .*empty\.jsonl: empty file"):
        load_documents(DataSpec(str(empty)))
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"--data .*nothing: folder holds no"):
        load_documents(DataSpec(str(folder)))


def test_text_field_that_does_not_exist_lists_columns(tmp_path, tok):
    spec, _ = write_corpus(tmp_path, "jsonl", make_docs(5, seed=3))
    with pytest.raises(ValueError, match=r"--text-field 'content' is not a column") as e:
        load_documents(DataSpec(spec.path, text_field="content"))
    for col in ("id", "text", "meta"):
        assert repr(col) in str(e.value), str(e.value)
    pspec, _ = write_corpus(tmp_path, "parquet", make_docs(5, seed=3))
    with pytest.raises(ValueError, match=r"'text' is not a column .*'body'"):
        load_documents(DataSpec(pspec.path, text_field="text"))


def test_non_string_documents_are_an_error(tmp_path, tok):
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(ValueError, match="NoneType"):
        list(rank_windows(DataSpec(str(p)), tok, 2))


def test_streaming_gives_the_same_windows(tmp_path, tok):
    spec, docs = write_corpus(tmp_path, "jsonl", make_docs(40, seed=4))
    streamed = DataSpec(spec.path, streaming=True)
    ref = reference_windows(docs, tok, T)
    got = [(w, win) for w, win in rank_windows(streamed, tok, T, rank=0, world=2)]
    assert [w for w, _ in got] == list(range(0, len(ref), 2))
    for w, win in got:
        np.testing.assert_array_equal(win, ref[w])
    with pytest.raises(ValueError, match=r"--text-field 'body' is not a column .*'text'"):
        load_documents(DataSpec(spec.path, text_field="body", streaming=True))


BAD_BYTES = b"\xff\xfe bad"


def _not_utf8_corpus(path: Path, kind: str) -> Path:
    """A .txt or .jsonl file whose second document holds bytes that are not UTF-8."""
    if kind == "txt":
        path.write_bytes(b"the quick brown fox\n" + BAD_BYTES + b"\nlazy dog\n")
    else:
        path.write_bytes(b'{"text": "the quick brown fox"}\n{"text": "' + BAD_BYTES + b'"}\n'
                         b'{"text": "lazy dog"}\n')
    with pytest.raises(UnicodeDecodeError):            # the premise, independently of datasets
        path.read_bytes().decode("utf-8")
    return path


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_corpus_that_is_not_utf8_is_a_named_error(tmp_path, tok, kind, streaming):
    """Not a bare UnicodeDecodeError (nor datasets' DatasetGenerationError around one): a
    ValueError naming --data, the file and the fix, whether the bytes are met while the
    dataset is loaded (.txt) or while its rows are iterated (.jsonl, streaming)."""
    p = _not_utf8_corpus(tmp_path / f"latin.{kind}", kind)
    with pytest.raises(ValueError) as e:
        list(rank_windows(DataSpec(str(p), streaming=streaming), tok, 4))
    assert type(e.value) is ValueError, repr(e.value)
    msg = str(e.value)
    for part in (f"--data {p}", f"file {p} is not valid UTF-8", "re-encode it as UTF-8"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_folder_with_a_file_that_is_not_utf8_names_the_folder_and_how_to_find_it(tmp_path, tok):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", ["fine text"] * 3)
    _not_utf8_corpus(d / "b.jsonl", "jsonl")
    with pytest.raises(ValueError) as e:
        list(rank_windows(DataSpec(str(d)), tok, 4))
    assert type(e.value) is ValueError, repr(e.value)
    msg = str(e.value)
    assert f"--data {d}" in msg and str(d / "b.jsonl") in msg and "not valid UTF-8" in msg, msg
    assert f"grep -rlaxv '.*' {d}" in msg and "re-encode" in msg, msg


# ---------------------------------------------------------------- plain text (issue 10, item 6)

def test_txt_file_is_one_document_blank_lines_add_no_eos(tmp_path, tok):
    """A .txt file is one document: its blank lines stay text inside it (before, datasets'
    text builder made each line a document and each blank line an extra EOS)."""
    text = "the quick brown fox\n\n\nlazy dog\n\nanswer 42\n"
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    spec = DataSpec(str(p))
    assert list(load_documents(spec)) == [text]
    flat = np.concatenate([win for _, win in rank_windows(spec, tok, 2)])
    ref = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    np.testing.assert_array_equal(flat, ref[:len(ref) // 2 * 2])
    assert int((np.asarray(ref) == tok.eos_token_id).sum()) == 1
    assert len(list(rank_windows(spec, tok, 2))) == len(ref) // 2


def test_folder_of_txt_files_is_one_document_per_file_in_sorted_order(tmp_path, tok):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    texts = {"b.txt": "second\n\nwith a blank line\n", "a.txt": "first, no final newline",
             "sub/c.txt": "東京🙂 nested\n", "c.txt": "\ufeffBOM dropped\r\nCRLF kept\r\n"}
    for name, t in texts.items():
        (d / name).write_bytes(t.encode("utf-8"))
    (d / "notes.md").write_text("not a data file")
    order = sorted(d.rglob("*.txt"))                       # the order of every other kind
    assert [p.relative_to(d).as_posix() for p in order] == ["a.txt", "b.txt", "c.txt", "sub/c.txt"]
    expect = [p.read_bytes().decode("utf-8").removeprefix("\ufeff") for p in order]
    assert expect[2] == "BOM dropped\r\nCRLF kept\r\n"
    for streaming in (False, True):
        spec = DataSpec(str(d), streaming=streaming)
        assert list(load_documents(spec)) == expect
        got = np.concatenate([win for _, win in rank_windows(spec, tok, 4)])
        np.testing.assert_array_equal(got, reference_windows(expect, tok, 4).reshape(-1))


def test_txt_folder_with_a_file_that_is_not_utf8_names_that_file(tmp_path, tok):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("fine")
    bad = _not_utf8_corpus(d / "b.txt", "txt")
    with pytest.raises(ValueError) as e:
        list(load_documents(DataSpec(str(d))))
    assert type(e.value) is ValueError, repr(e.value)
    assert f"--data {d}: file {bad} is not valid UTF-8" in str(e.value), str(e.value)
