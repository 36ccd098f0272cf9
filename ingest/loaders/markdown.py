"""Markdown: one section per heading, keeping the original Markdown text.

Headings are found by a real CommonMark parser (markdown-it-py), so ``#``
lines inside fenced code blocks, and ``---`` rules that are not setext
underlines, are told apart the way a renderer would.  Sections keep their
Markdown source because the chunker is Markdown-aware.
"""

from __future__ import annotations

from collections.abc import Sequence

from markdown_it import MarkdownIt
from markdown_it.token import Token

from ingest.loaders.base import LoadedDocument, build_sections
from ingest.loaders.text import charset_from_content_type, clean_text, decode_text
from rag_service.config import IngestSettings
from rag_service.errors import EmptyDocument

MARKDOWN_CONTENT_TYPE = "text/markdown"

# Inline tokens whose ``content`` is text a reader sees (an image's is its alt text).
_VISIBLE_INLINE = frozenset({"text", "code_inline", "image"})
_FRONT_MATTER_FENCE = "---"
_FRONT_MATTER_ENDS = frozenset({"---", "..."})


def heading_text(inline: Token | None) -> str:
    """The plain words of a heading, without emphasis, link or code markup."""
    if inline is None or not inline.children:
        return inline.content.strip() if inline is not None else ""
    words: list[str] = []
    for child in inline.children:
        if child.type in _VISIBLE_INLINE:
            words.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            words.append(" ")
    return " ".join("".join(words).split())


def split_front_matter(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate a YAML front-matter block (Jekyll, Hugo, MkDocs) from the body.

    Only flat ``key: value`` lines are read; that is enough for a title.
    Without this, CommonMark reads the closing ``---`` as a setext underline
    and the front matter becomes a bogus heading.
    """
    if not lines or lines[0].rstrip() != _FRONT_MATTER_FENCE:
        return {}, lines
    for end in range(1, len(lines)):
        if lines[end].rstrip() in _FRONT_MATTER_ENDS:
            break
    else:
        return {}, lines
    fields: dict[str, str] = {}
    for line in lines[1:end]:
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith((" ", "\t", "-", "#")):
            fields[key.strip().lower()] = value.strip().strip("\"'")
    if end > 1 and not fields:
        return {}, lines
    return fields, lines[end + 1 :]


def _headings(tokens: Sequence[Token]) -> list[tuple[int, int, str]]:
    """``(first_line, level, text)`` of every top-level heading, in order.

    Headings nested in block quotes or list items stay inside their section:
    they do not start at a line boundary we could cut on.
    """
    found: list[tuple[int, int, str]] = []
    for index, token in enumerate(tokens):
        if token.type != "heading_open" or token.level != 0 or token.map is None:
            continue
        inline = tokens[index + 1] if index + 1 < len(tokens) else None
        found.append((token.map[0], int(token.tag[1:]), heading_text(inline)))
    return found


def load_markdown(
    data: bytes,
    name: str,
    settings: IngestSettings,
    content_type: str | None = None,
) -> LoadedDocument:
    """Load Markdown as one section per heading, each with its heading path."""
    text = clean_text(decode_text(data, charset_from_content_type(content_type)))
    front, lines = split_front_matter(text.split("\n"))
    headings = _headings(MarkdownIt("commonmark").parse("\n".join(lines)))

    parts: list[tuple[str, int | None, tuple[str, ...]]] = []
    first = headings[0][0] if headings else len(lines)
    parts.append(("\n".join(lines[:first]), None, ()))
    path: list[tuple[int, str]] = []
    for position, (start, level, title) in enumerate(headings):
        end = headings[position + 1][0] if position + 1 < len(headings) else len(lines)
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        trail = tuple(t for _, t in path if t)
        parts.append(("\n".join(lines[start:end]), None, trail))

    sections = build_sections(
        [(body.strip("\n").rstrip(), page, trail) for body, page, trail in parts]
    )
    if not sections:
        raise EmptyDocument(f"{name} contains no text")
    first_h1 = next((text for _, level, text in headings if level == 1 and text), None)
    return LoadedDocument(
        sections=sections,
        content_type=MARKDOWN_CONTENT_TYPE,
        title=front.get("title") or first_h1,
    )
