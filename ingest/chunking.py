"""Token-aware chunking with the embedder's own tokenizer.

semantic-text-splitter cuts at the largest boundary that fits (paragraphs,
then sentences, then words), Markdown-aware for Markdown sections.  Chunks
never cross a page or a heading section, so each keeps one page and one
heading path, and every chunk is checked against the embedder's maximum
sequence length so nothing is silently truncated at embedding time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from semantic_text_splitter import MarkdownSplitter, TextSplitter

from ingest.loaders.base import LoadedDocument, Section
from rag_service.config import ChunkingSettings

# [CLS] and [SEP] (or their kin) that the embedder adds around every input.
SPECIAL_TOKENS_MARGIN = 2
# Characters a chunk may hold per token of its limit.  WordPiece turns any
# word over 100 characters into one [UNK], so a megabyte without a space is
# "one token": this cap keeps such a run from becoming a one-megabyte chunk.
MAX_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Chunk:
    """A piece of a document ready to embed."""

    ordinal: int
    text: str
    page: int | None
    headings: tuple[str, ...]
    start_char: int
    end_char: int
    token_count: int


class Chunker:
    """Cuts loaded documents into chunks of at most ``max_tokens`` tokens."""

    def __init__(
        self,
        settings: ChunkingSettings,
        *,
        tokenizer: Any,
        count_tokens: Callable[[str], int],
        max_seq_length: int,
    ) -> None:
        limit = max_seq_length - SPECIAL_TOKENS_MARGIN
        self.max_tokens = min(settings.max_tokens, limit)
        overlap = min(settings.overlap_tokens, self.max_tokens // 2)
        # A range lets a chunk close at a good boundary once it is three-quarters full.
        capacity = (max(1, self.max_tokens * 3 // 4), self.max_tokens)
        self._count = count_tokens
        self._limit = limit
        self._max_chars = self.max_tokens * MAX_CHARS_PER_TOKEN
        if tokenizer is not None:
            self._text = TextSplitter.from_huggingface_tokenizer(tokenizer, capacity, overlap)
            self._markdown = MarkdownSplitter.from_huggingface_tokenizer(
                tokenizer, capacity, overlap
            )
        else:  # no tokenizer: four characters a token
            chars = (capacity[0] * 4, capacity[1] * 4)
            self._text = TextSplitter(chars, overlap * 4)
            self._markdown = MarkdownSplitter(chars, overlap * 4)

    def chunk(self, document: LoadedDocument) -> list[Chunk]:
        """Every chunk of a document, in reading order."""
        markdown = document.content_type == "text/markdown"
        chunks: list[Chunk] = []
        for section in document.sections:
            for offset, text in self._split(section, markdown=markdown):
                chunks.append(
                    Chunk(
                        ordinal=len(chunks),
                        text=text,
                        page=section.page,
                        headings=section.headings,
                        start_char=section.start + offset,
                        end_char=section.start + offset + len(text),
                        token_count=self._count(text),
                    )
                )
        return chunks

    def _split(self, section: Section, *, markdown: bool) -> Iterator[tuple[int, str]]:
        splitter = self._markdown if markdown else self._text
        for offset, text in splitter.chunk_indices(section.text):
            if not text.strip():
                continue
            if len(text) <= self._max_chars and self._count(text) <= self._limit:
                yield offset, text
                continue
            # A run the splitter could not break (one enormous "word"): cut it
            # by characters so no token is dropped by the embedder's truncation.
            yield from self._hard_split(offset, text)

    def _hard_split(self, offset: int, text: str) -> Iterator[tuple[int, str]]:
        step = max(16, len(text) // max(2, (self._count(text) // self._limit) + 1))
        step = min(step, self._max_chars)
        start = 0
        while start < len(text):
            end = min(len(text), start + step)
            while end - start > 16 and self._count(text[start:end]) > self._limit:
                end = start + (end - start) * 3 // 4
            yield offset + start, text[start:end]
            start = end
