"""Token-aware chunking with the real embedder's tokenizer."""

from __future__ import annotations

from itertools import pairwise

import pytest

from ingest.chunking import Chunker
from ingest.loaders import SECTION_SEPARATOR, load_document
from rag_service.config import ChunkingSettings, IngestSettings
from rag_service.embedding import SentenceTransformerEmbedder
from tests.helpers import REAL_PDF


@pytest.fixture(scope="module")
def chunker(embedder: SentenceTransformerEmbedder) -> Chunker:
    return Chunker(
        ChunkingSettings(max_tokens=200, overlap_tokens=32),
        tokenizer=embedder.tokenizer(),
        count_tokens=embedder.count_tokens,
        max_seq_length=embedder.max_seq_length,
    )


def full_text(doc) -> str:  # type: ignore[no-untyped-def]
    return SECTION_SEPARATOR.join(s.text for s in doc.sections)


def test_tokenizer_counts_real_lengths_not_the_padded_128(
    embedder: SentenceTransformerEmbedder,
) -> None:
    assert embedder.count_tokens("hello world") == 2
    assert embedder.count_tokens("word " * 300) == 300


def test_real_pdf_chunks_fit_the_model_and_point_back_into_the_text(
    chunker: Chunker, embedder: SentenceTransformerEmbedder
) -> None:
    doc = load_document(REAL_PDF.read_bytes(), REAL_PDF.name, IngestSettings())
    chunks = chunker.chunk(doc)
    text = full_text(doc)

    assert len(chunks) > doc.pages
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    tokenizer = embedder.tokenizer()
    for c in chunks:
        # with [CLS] and [SEP] the chunk still fits: nothing is cut by the embedder
        assert len(tokenizer.encode(c.text).ids) <= embedder.max_seq_length
        assert c.token_count <= 200
        assert text[c.start_char : c.end_char] == c.text
        assert c.page is not None and 1 <= c.page <= doc.pages
    pages = [c.page for c in chunks]
    assert pages == sorted(pages)  # reading order
    sizes = sorted(c.token_count for c in chunks)
    assert sizes[len(sizes) // 2] >= 100  # chunks are filled, not one line each


def test_neighbouring_chunks_overlap(chunker: Chunker) -> None:
    paragraph = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(200))
    doc = load_document(paragraph.encode(), "long.txt", IngestSettings())
    chunks = chunker.chunk(doc)
    assert len(chunks) > 3
    assert all(b.start_char < a.end_char for a, b in pairwise(chunks))


def test_markdown_chunks_keep_their_heading_path(chunker: Chunker) -> None:
    md = b"# Guide\n\nIntro.\n\n## Install\n\nRun the installer.\n\n## Usage\n\nCall it.\n"
    chunks = chunker.chunk(load_document(md, "guide.md", IngestSettings()))
    by_text = {c.text.strip(): c.headings for c in chunks}
    assert any(h == ("Guide", "Install") for h in by_text.values())
    assert all(c.page is None for c in chunks)


def test_a_giant_unbreakable_word_is_cut_not_truncated(
    chunker: Chunker, embedder: SentenceTransformerEmbedder
) -> None:
    blob = "x" * 20000
    chunks = chunker.chunk(load_document(blob.encode(), "blob.txt", IngestSettings()))
    assert "".join(c.text for c in chunks) == blob
    tokenizer = embedder.tokenizer()
    assert all(len(tokenizer.encode(c.text).ids) <= embedder.max_seq_length for c in chunks)
