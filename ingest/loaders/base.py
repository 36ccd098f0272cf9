"""What every loader returns: the document's text cut into sections."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Section:
    """A run of text that shares one page and one heading path.

    ``start`` is the offset of ``text`` in the document's full extracted
    text, which is every section's text joined by ``SECTION_SEPARATOR``.
    """

    text: str
    start: int
    page: int | None = None
    headings: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedDocument:
    """A document turned into text with its structure."""

    sections: tuple[Section, ...]
    content_type: str
    pages: int | None = None
    title: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def char_count(self) -> int:
        return sum(len(s.text) for s in self.sections)


SECTION_SEPARATOR = "\n\n"


def build_sections(parts: list[tuple[str, int | None, tuple[str, ...]]]) -> tuple[Section, ...]:
    """Lay ``(text, page, headings)`` parts end to end, skipping blank ones."""
    sections: list[Section] = []
    offset = 0
    for text, page, headings in parts:
        if not text.strip():
            continue
        if sections:
            offset += len(SECTION_SEPARATOR)
        sections.append(Section(text=text, start=offset, page=page, headings=headings))
        offset += len(text)
    return tuple(sections)
