"""The chat demo's data (pipeline.demo.chat_data) and, on tiny models, the chat demo's path."""

from __future__ import annotations

import json

import pytest

from pipeline.demo.chat_data import SYSTEM, build_chat_corpus, page_conversations

PAGE = ("Foxes are small omnivorous mammals.\n\nThey live on every continent.\n\nDiet\n\n"
        "Foxes eat rodents and berries.\n\nMore text of the diet section.\n\nHistory\n\n"
        "Foxes appear in old fables.\n\nRange\n\nFrom the Arctic to deserts.")


def test_page_conversations_by_hand():
    u = lambda c: {"role": "user", "content": c}            # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}       # noqa: E731
    q = "What does the article on Fox say about {}?"
    want = [
        [{"role": "system", "content": SYSTEM}, u("What is Fox?"), a("Foxes are small omnivorous mammals."),
         u("Tell me more."), a("They live on every continent.")],
        [u(q.format("Diet")), a("Foxes eat rodents and berries."),
         u(q.format("History")), a("Foxes appear in old fables.")],
        [u(q.format("Range")), a("From the Arctic to deserts.")],
    ]
    assert page_conversations("Fox", PAGE, 0) == want
    assert page_conversations("Fox", PAGE, 1)[0] == want[0][1:]     # system on every third page only
    assert page_conversations("Empty", "Heading only", 0) == []


def test_build_chat_corpus(tmp_path):
    corpus = tmp_path / "pages.jsonl"
    corpus.write_text("".join(json.dumps({"title": t, "text": PAGE}) + "\n" for t in ("Fox", "Vixen")))
    out = tmp_path / "chat.jsonl"
    counts = build_chat_corpus(corpus, out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert counts == {"pages": 2, "conversations": 6, "assistant_turns": 10} and len(rows) == 6
    assert rows[3]["messages"][0] == {"role": "user", "content": "What is Vixen?"}
    assert out.read_bytes() == (build_chat_corpus(corpus, tmp_path / "again.jsonl")
                                and (tmp_path / "again.jsonl").read_bytes())
    corpus.write_text('{"text": "no title"}\n')
    with pytest.raises(ValueError, match="pages.jsonl:1: expected a JSON object with 'title'"):
        build_chat_corpus(corpus, out)
    assert len(out.read_text().splitlines()) == 6          # the earlier output is not lost
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.dist
@pytest.mark.slow
def test_chat_demo_tiny_end_to_end(tmp_path):
    """`tools/demo.py --tiny --chat`: conversations through the three stages; the cache is a
    chat cache (format 3, a trainable fraction < 1), the students train on the assistant
    positions only and the held-out numbers count assistant tokens only."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "tools/demo.py", "--tiny", "--chat", "--out", str(out)],
                          cwd=repo, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    m = json.loads((out / "cache" / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["dataset"]["format"] == "chat"
    st = m["stats"]
    assert 0 < st["trainable_positions"] < st["positions"] and st["conversations"] > 0
    for run in ("sampledkd", "no_kd"):
        recs = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        frac = [r["trainable_frac"] for r in recs]      # a window may lie inside one answer
        assert all(0 < f <= 1 for f in frac) and min(frac) < 1, frac
    for name in ("teacher", "no_kd", "sampledkd"):
        h = json.loads((out / "eval" / name / "results.json").read_text())["heldout"]
        assert 0 < h["tokens"] < h["windows"] * (h["seq_len"] - 1)      # assistant tokens only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "chat"
    assert "assistant tokens of conversations only" in proc.stdout
