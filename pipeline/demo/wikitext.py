"""Wikipedia XML dump -> plain prose (the demo corpus; pipeline.demo.assets builds it).

`iter_wiki_pages` streams (title, wikitext) of the main namespace from a MediaWiki XML
dump, skipping redirects; `clean_wikitext` renders the visible prose with
mwparserfromhell: templates, references, tables, files and categories dropped, link
texts kept, boilerplate sections (References, External links, ...) cut.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mwparserfromhell.nodes import Wikilink
    from mwparserfromhell.wikicode import Wikicode



_DROP_TAGS = frozenset({"ref", "references", "table", "gallery", "math", "chem", "timeline",
                        "imagemap", "score", "graph", "mapframe", "syntaxhighlight", "source",
                        "templatedata", "hiero"})
_DROP_LINK_NS = frozenset({"file", "image", "media", "category"})
_DROP_SECTIONS = frozenset({"references", "external links", "see also", "notes",
                            "further reading", "bibliography", "sources", "footnotes",
                            "citations", "notes and references", "works cited"})
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")  # [[de:Anarchismus]] interlanguage links


def _render(code: Wikicode) -> str:
    """Visible prose of an mwparserfromhell node list (recursive; see clean_wikitext)."""
    from mwparserfromhell import nodes as n

    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, n.Text):
            out.append(node.value)
        elif isinstance(node, n.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, n.Wikilink):
            out.append(_render_wikilink(node))
        elif isinstance(node, n.ExternalLink):
            # [http://x Label] shows its label; a bare URL is not prose.
            out.append(_render(node.title) if node.brackets and node.title else "")
        elif isinstance(node, n.Tag):
            name = str(node.tag).strip().lower()
            if name in ("br", "hr"):
                out.append("\n")
            elif name in _DROP_TAGS or node.self_closing or node.contents is None:
                out.append("")  # refs, tables, math; list markers '*', '#', ':', ';'
            else:
                out.append(_render(node.contents))  # bold, italic, <small>, <span>, ...
        elif isinstance(node, n.Heading):  # only inside a tag: clean_wikitext splits first
            out.append(f"\n{_render(node.title).strip()}\n")
        # Template (nested ones go with their parent), Comment, Argument: dropped.
    return "".join(out)


_HEADING = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.M)


def _sections(wikitext: str) -> Iterator[tuple[str, str]]:
    """(heading wikitext, body wikitext) per section, the lead first with heading "".

    Skips the _DROP_SECTIONS and their subsections. Splitting on heading lines before
    parsing keeps a stray unclosed tag from swallowing every heading after it.
    """
    marks = list(_HEADING.finditer(wikitext))
    yield "", wikitext[:marks[0].start() if marks else len(wikitext)]
    skip_level = 0
    for i, m in enumerate(marks):
        level, title = len(m.group(1)), m.group(2)
        if skip_level and level > skip_level:
            continue
        skip_level = level if title.strip().lower() in _DROP_SECTIONS else 0
        if not skip_level:
            end = marks[i + 1].start() if i + 1 < len(marks) else len(wikitext)
            yield title, wikitext[m.end():end]


def _render_wikilink(node: Wikilink) -> str:
    """[[File:...]], [[Category:X]] and [[de:X]] vanish; [[:Category:X|t]] and [[a|b]] show text."""
    title = str(node.title).strip()
    colon = title.startswith(":")  # [[:Category:X]] is a visible link, not a category tag
    title = title.lstrip(":")
    prefix = title.split(":", 1)[0] if ":" in title else ""
    if not colon and (prefix.strip().lower() in _DROP_LINK_NS
                      or (_LANG_PREFIX.match(prefix) and node.text is None)):
        return ""
    if node.text is not None:
        return _render(node.text)
    return title.split(":", 1)[1] if prefix.strip().lower() in _DROP_LINK_NS else title


def _tidy(text: str) -> str:
    """Whitespace, punctuation and leftovers of removed markup, line by line."""
    text = text.replace("\xa0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and other behaviour switches
    text = re.sub(r"'{2,}", "", text)  # unbalanced bold/italic quotes
    # Tags the parser left as text (it backs off on malformed markup around them).
    text = re.sub(r"(?s)<ref\b[^>]*?(/>|>.*?</ref\s*>)", "", text)
    text = re.sub(r"</?(ref|references|span|div|small|big|sup|sub|center|blockquote|poem|"
                  r"code|u|s|i|b)\b[^>]*>", "", text)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"\(\s*([,;:]\s*)*\)", "", line)  # "( ; )" left where templates were
        line = re.sub(r"\(\s*([,;:]\s*)+", "(", line)  # "(; , born 1900)" -> "(born 1900)"
        line = re.sub(r"(\s*[,;:])+\s*\)", ")", line)  # "(Akhilleus, )" -> "(Akhilleus)"
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r"[ ]+([,.;:!?)])", r"\1", line).strip()
        # Lines of leftover table syntax or with no word at all are not prose.
        if line[:1] in ("|", "!", "{", "}") or not re.search(r"\w", line):
            line = ""
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from MediaWiki markup.

    Drops templates `{{...}}` (nested too), `<ref>`s, tables, comments, math, file and
    category links, interlanguage links, bare URLs and the References / External links /
    See also sections; keeps the visible text of `[[link|text]]`, `[url label]`,
    bold/italic and inline HTML; a heading becomes its title on its own line; paragraphs
    stay separated by one blank line.
    """
    try:
        import mwparserfromhell
    except ImportError as e:
        raise ImportError("cleaning the wiki corpus needs mwparserfromhell: "
                         "pip install mwparserfromhell") from e
    parts = []
    for title, body in _sections(wikitext):
        text = _render(mwparserfromhell.parse(body))
        if title and re.search(r"\w", text):  # a heading over only tables/lists is noise
            parts.append(f"\n{_render(mwparserfromhell.parse(title)).strip()}\n")
        parts.append(text)
    return _tidy("".join(parts))


def iter_wiki_pages(xml_stream) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each main-namespace, non-redirect page of a MediaWiki XML dump."""
    for _, el in ET.iterparse(xml_stream):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = el.findtext("{*}ns", default="0")
        title = el.findtext("{*}title", default="")
        text = el.findtext("{*}revision/{*}text", default="") or ""
        redirect = el.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
        el.clear()  # keep memory flat on big dumps
        if ns == "0" and not redirect:
            yield title, text
