"""HTML: the main text of a page, one section per heading.

Pages carry much that is not their content (menus, banners, scripts, cookie
notices), so we drop those elements and read ``<main>``, else the
``<article>`` elements, else ``<body>``.  Block elements become paragraph
breaks so the chunker can split on them.

The tree is walked with an explicit stack, never by recursion, so a page of
100,000 nested ``<div>`` elements is read like any other.  If building the
tree itself fails that way, a flat event-based pass still gets the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

from bs4 import BeautifulSoup
from bs4.dammit import EncodingDetector
from bs4.element import CData, NavigableString, PageElement, PreformattedString, Tag

from ingest.loaders.base import LoadedDocument, build_sections
from ingest.loaders.text import charset_from_content_type, clean_text, decode_text
from rag_service.config import IngestSettings
from rag_service.errors import EmptyDocument

HTML_CONTENT_TYPE = "text/html"

_Part = tuple[str, int | None, tuple[str, ...]]

# Never content: code, styling, navigation, widgets and embedded media.
_DROPPED = frozenset(
    {
        "script", "style", "nav", "aside", "noscript", "template", "head", "title",
        "svg", "iframe", "object", "embed", "canvas", "button", "select", "textarea",
    }
)  # fmt: skip
# Page banners and footers are dropped, but an <article>'s own <header>
# holds its title and byline, so inside sectioning content they are kept
# (the same rule ARIA uses to give them the banner/contentinfo role).
_PAGE_LANDMARKS = frozenset({"header", "footer"})
_SECTIONING = frozenset({"article", "main", "section"})
_HEADING_LEVELS = {f"h{level}": level for level in range(1, 7)}
_BLOCKS = frozenset(
    {
        "address", "article", "blockquote", "body", "caption", "center", "dd", "details",
        "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form",
        "header", "hgroup", "hr", "html", "legend", "li", "main", "menu", "ol", "p", "pre",
        "section", "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
        *_HEADING_LEVELS,
    }
)  # fmt: skip
_CELLS = frozenset({"td", "th"})


def _squash(text: str) -> str:
    """Collapse whitespace runs to one space, keeping a space at either edge."""
    inner = " ".join(text.split())
    if not inner:
        return " " if text else ""
    lead = " " if text[0].isspace() else ""
    tail = " " if text[-1].isspace() else ""
    return f"{lead}{inner}{tail}"


class _SectionWriter:
    """Collects paragraphs into sections, starting a new one at each heading."""

    def __init__(self) -> None:
        self.parts: list[_Part] = []
        self._paragraphs: list[str] = []
        self._inline: list[str] = []
        self._path: list[tuple[int, str]] = []
        self._cell_pending = False

    def text(self, text: str, preformatted: bool) -> None:
        if self._cell_pending and text.strip():
            self._inline.append(" | ")
            self._cell_pending = False
        self._inline.append(text if preformatted else _squash(text))

    def cell_separator(self) -> None:
        """Put `` | `` before the next cell with text, unless none came before it."""
        self._cell_pending = any(piece.strip() for piece in self._inline)

    def line_break(self) -> None:
        self._inline.append("\n")

    def end_block(self, preformatted: bool = False) -> None:
        joined = "".join(self._inline)
        self._inline.clear()
        self._cell_pending = False
        if preformatted:
            paragraph = "\n".join(line.rstrip() for line in joined.split("\n")).strip("\n")
        else:
            paragraph = "\n".join(" ".join(line.split()) for line in joined.split("\n"))
            paragraph = paragraph.strip("\n")
        if paragraph.strip():
            self._paragraphs.append(paragraph)

    def heading(self, level: int, title: str) -> None:
        self.end_block()
        self._close_section()
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        self._path.append((level, title))
        self._paragraphs.append(title)

    def finish(self) -> list[_Part]:
        self.end_block()
        self._close_section()
        return self.parts

    def _close_section(self) -> None:
        if self._paragraphs:
            trail = tuple(title for _, title in self._path)
            self.parts.append(("\n\n".join(self._paragraphs), None, trail))
            self._paragraphs = []


def _hidden(tag: Tag) -> bool:
    if tag.has_attr("hidden") or tag.get("aria-hidden") == "true":
        return True
    style = tag.get("style")
    return isinstance(style, str) and "display:none" in "".join(style.split()).lower()


class _TreeWalker:
    """Turns the content root(s) of a parsed page into sections."""

    def __init__(self) -> None:
        self.writer = _SectionWriter()
        self._pre_depth = 0
        self._sectioning_depth = 0

    def walk(self, roots: list[Tag]) -> list[_Part]:
        for root in roots:
            # Entering the root counts the root itself; count its ancestors here.
            self._sectioning_depth = sum(1 for tag in root.parents if tag.name in _SECTIONING)
            self._read(root)
        return self.writer.finish()

    def _skipped(self, tag: Tag) -> bool:
        if tag.name in _DROPPED or _hidden(tag):
            return True
        return tag.name in _PAGE_LANDMARKS and self._sectioning_depth == 0

    def _read(self, root: Tag) -> None:
        stack: list[tuple[Tag, Iterator[PageElement]]] = [(root, iter(root.contents))]
        self._enter(root)
        while stack:
            tag, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                self._leave(tag)
            elif isinstance(child, Tag):
                if self._skipped(child):
                    continue
                level = _HEADING_LEVELS.get(child.name)
                if level is not None:
                    title = " ".join(child.get_text(" ").split())
                    if title:
                        self.writer.heading(level, title)
                    continue
                self._enter(child)
                stack.append((child, iter(child.contents)))
            elif isinstance(child, NavigableString) and (
                isinstance(child, CData) or not isinstance(child, PreformattedString)
            ):
                self.writer.text(str(child), self._pre_depth > 0)

    def _enter(self, tag: Tag) -> None:
        if tag.name in _BLOCKS:
            self.writer.end_block(self._pre_depth > 0)
        if tag.name == "br":
            self.writer.line_break()
        elif tag.name in _CELLS:
            self.writer.cell_separator()
        elif tag.name == "pre":
            self._pre_depth += 1
        elif tag.name in _SECTIONING:
            self._sectioning_depth += 1

    def _leave(self, tag: Tag) -> None:
        if tag.name in _BLOCKS:
            self.writer.end_block(self._pre_depth > 0)
        if tag.name == "pre":
            self._pre_depth -= 1
        elif tag.name in _SECTIONING:
            self._sectioning_depth -= 1


def _content_roots(soup: BeautifulSoup) -> list[list[Tag]]:
    """Candidate content roots, best first: main, articles, body, whole page."""
    candidates: list[list[Tag]] = []
    main = soup.find("main") or soup.find(role="main")
    if isinstance(main, Tag):
        candidates.append([main])
    articles = [
        tag
        for tag in soup.find_all("article")
        if isinstance(tag, Tag) and tag.find_parent("article") is None
    ]
    if articles:
        candidates.append(articles)
    if soup.body is not None:
        candidates.append([soup.body])
    candidates.append([soup])
    return candidates


class _FlatText(HTMLParser):
    """Text of a page from parser events alone, for trees too deep to build."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._inline: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROPPED:
            self._skip_depth += 1
        elif tag in _BLOCKS or tag == "br":
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROPPED:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self._inline.append(data)

    def _flush(self) -> None:
        paragraph = " ".join("".join(self._inline).split())
        self._inline.clear()
        if paragraph:
            self.paragraphs.append(paragraph)

    def text(self) -> str:
        self._flush()
        return "\n\n".join(self.paragraphs)


def _flat_parts(markup: str) -> list[_Part]:
    parser = _FlatText()
    parser.feed(markup)
    parser.close()
    return [(parser.text(), None, ())]


def _structured_parts(markup: str) -> tuple[list[_Part], str | None]:
    soup = BeautifulSoup(markup, "lxml")
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if isinstance(title_tag, Tag) else ""
    for roots in _content_roots(soup):
        parts = _TreeWalker().walk(roots)
        if parts:
            return parts, title or None
    return [], title or None


def _strip_xml_declaration(markup: str) -> str:
    # The text is decoded already, so the declaration's encoding is moot, and
    # without it bs4 does not warn that XHTML might be XML.
    stripped = markup.lstrip()
    if stripped.startswith("<?xml"):
        end = stripped.find("?>")
        if end != -1:
            return stripped[end + 2 :]
    return markup


def load_html(
    data: bytes,
    name: str,
    settings: IngestSettings,
    content_type: str | None = None,
) -> LoadedDocument:
    """Load an HTML page: its main content as sections per heading, its ``<title>``."""
    hint = charset_from_content_type(content_type) or EncodingDetector.find_declared_encoding(
        data, is_html=True
    )
    markup = _strip_xml_declaration(clean_text(decode_text(data, hint)))
    title: str | None = None
    if "<" not in markup:
        parts: list[_Part] = [(markup, None, ())]
    else:
        try:
            parts, title = _structured_parts(markup)
        except RecursionError:
            parts = _flat_parts(markup)
    sections = build_sections([(text.strip(), page, trail) for text, page, trail in parts])
    if not sections:
        raise EmptyDocument(f"{name} has no visible text")
    return LoadedDocument(sections=sections, content_type=HTML_CONTENT_TYPE, title=title)
