"""Conversations made offline from the demo's Wikipedia pages, for the chat demo (issue 15).

    python -m pipeline.demo.chat_data CORPUS.jsonl OUT.jsonl

Each page (`{"text", "title"}`, paragraphs separated by blank lines, section headings as
short paragraphs of their own; pipeline.demo.assets writes them) gives:

- an overview conversation: the user asks "What is TITLE?" and the assistant answers with the
  page's opening paragraph; the user says "Tell me more." and the assistant answers with the
  second paragraph (when there is one). Every third page's conversation opens with a system
  message (SYSTEM), so the demo's data exercises that branch of the template;
- section conversations: for each section (a heading followed by a paragraph), the user asks
  "What does the article on TITLE say about HEADING?" and the assistant answers with the
  section's first paragraph, two sections per conversation.

Rows are `{"messages": [{"role", "content"}, ...]}`. The output is deterministic: the same
corpus gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SYSTEM = "You are a helpful assistant that answers from the encyclopedia."
MAX_HEADING = 80        # characters: a shorter paragraph with no final period is a heading


def _is_heading(p: str) -> bool:
    return len(p) <= MAX_HEADING and "\n" not in p and not p.rstrip().endswith((".", ":", ";", "?", "!"))


def page_conversations(title: str, text: str, index: int) -> list[list[dict]]:
    """The conversations of one page (see the module docstring)."""
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    body = [p for p in paras if not _is_heading(p)]
    convs: list[list[dict]] = []
    if body:
        conv = [{"role": "system", "content": SYSTEM}] if index % 3 == 0 else []
        conv += [{"role": "user", "content": f"What is {title}?"},
                 {"role": "assistant", "content": body[0]}]
        if len(body) > 1:
            conv += [{"role": "user", "content": "Tell me more."},
                     {"role": "assistant", "content": body[1]}]
        convs.append(conv)
    sections = [(h, p) for h, p in zip(paras, paras[1:]) if _is_heading(h) and not _is_heading(p)]
    for i in range(0, len(sections), 2):
        conv = []
        for heading, para in sections[i:i + 2]:
            conv += [{"role": "user", "content": f"What does the article on {title} say about {heading}?"},
                     {"role": "assistant", "content": para}]
        convs.append(conv)
    return convs


def build_chat_corpus(corpus: str | Path, out: str | Path) -> dict:
    """Write the conversations of every page of `corpus` to `out` (atomically); counts."""
    corpus, out = Path(corpus), Path(out)
    n_pages = n_convs = n_turns = 0
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(corpus, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    title, text = row["title"], row["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{corpus}:{i + 1}: expected a JSON object with 'title' and 'text' "
                                     f"({e}); pipeline.demo.assets writes such pages") from e
                n_pages += 1
                for conv in page_conversations(title, text, n_pages - 1):
                    g.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")
                    n_convs += 1
                    n_turns += sum(m["role"] == "assistant" for m in conv)
    except BaseException:
        tmp.unlink(missing_ok=True)        # the previous output stays whole
        raise
    tmp.replace(out)
    return {"pages": n_pages, "conversations": n_convs, "assistant_turns": n_turns}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="JSONL of pages with 'title' and 'text'")
    ap.add_argument("out", type=Path, help="output JSONL of conversations")
    args = ap.parse_args(argv)
    print(json.dumps(build_chat_corpus(args.corpus, args.out)))


if __name__ == "__main__":
    main()
