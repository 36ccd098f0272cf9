"""Keyword search and filters in the catalog: FTS5 with BM25, one SQL predicate for filters."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag_service.retrieval import fts_query
from rag_service.storage.catalog import Catalog
from rag_service.storage.filters import ChunkFilter
from tests.retrieval_helpers import add_document, axis, fts_ok


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "catalog.sqlite3")
    yield c
    c.close()


# -- FTS5 query building -----------------------------------------------------------

NASTY = [
    '"unbalanced quote',
    "NEAR(printer jam)",
    "printer NEAR/3 jam",
    "printer AND",
    "OR",
    "NOT printer",
    "AND OR NOT NEAR",
    "text:printer",
    "chunks_fts:printer OR {text}: jam",
    "print*",
    "^printer",
    "(printer",
    "-printer +jam",
    '"" ""',
    "***",
    "?!.,;:()[]{}",
    'E1234:"fan"',
    "a\"b\"c 'quoted'",
    "café naïve ÜNÏCÖDÉ",
    "日本語のプリンター",
    "हिन्दी प्रिंटर",
    "emoji 🖨️ printer",
    "'; DROP TABLE chunks; --",
    "\x00printer\x1f",
    "e\u0301cole",  # decomposed accent
]


@pytest.mark.parametrize("query", NASTY)
def test_nasty_queries_never_raise_in_fts5(catalog: Catalog, query: str) -> None:
    add_document(catalog, "a.txt", [("The printer jam E1234 fan café école", axis(0), None)])
    coll_id = catalog.collection_version("c")[0]
    match = fts_query(query)
    hits = [] if match is None else catalog.keyword_search(coll_id, match, 10)
    assert isinstance(hits, list)
    if any(word in query.lower() for word in ("printer", "jam", "e1234", "café", "école")):
        assert hits, "a query holding an indexed word finds it"


def test_raw_nasty_text_would_have_raised(catalog: Catalog) -> None:
    """The reason for building the expression ourselves: FTS5 rejects raw input."""
    add_document(catalog, "a.txt", [("printer", axis(0), None)])
    coll_id = catalog.collection_version("c")[0]
    with pytest.raises(sqlite3.OperationalError):
        catalog.keyword_search(coll_id, 'printer AND "unbalanced', 10)


# -- filters in SQL ----------------------------------------------------------------------


@pytest.fixture
def library(catalog: Catalog) -> dict[str, str]:
    """Five documents of every kind; returns source -> document id."""
    ids = {
        "guide.pdf": add_document(
            catalog,
            "guide.pdf",
            [(f"printer guide page {p}", axis(0), p) for p in (1, 2, 3, 4)],
            content_type="application/pdf",
            metadata={"team": "docs", "tier": 1},
        ),
        "notes.md": add_document(
            catalog,
            "notes.md",
            [("printer notes", axis(1), None)],
            content_type="text/markdown",
            metadata={"team": "ops", "tier": "1", "urgent": True},
        ),
        "page.html": add_document(
            catalog,
            "page.html",
            [("printer page", axis(2), None)],
            content_type="text/html",
            metadata={"team": None, "urgent": False},
        ),
        "log_100%.TXT": add_document(
            catalog,
            "log_100%.TXT",
            [("printer log", axis(3), None)],
            metadata={"team": "ops", "tier": 2.0},
        ),
        "readme": add_document(catalog, "readme", [("printer readme", axis(0), None)]),
    }
    return ids


FILTER_CASES: list[tuple[str, ChunkFilter, set[str]]] = [
    ("sources", ChunkFilter(sources=("notes.md", "readme")), {"notes.md", "readme"}),
    ("type alias", ChunkFilter(file_types=("pdf",)), {"guide.pdf"}),
    ("type dot ext", ChunkFilter(file_types=(".MD",)), {"notes.md"}),
    ("type mime", ChunkFilter(file_types=("text/html; charset=utf-8",)), {"page.html"}),
    ("type by name", ChunkFilter(file_types=("txt",)), {"log_100%.TXT", "readme"}),
    ("type unknown", ChunkFilter(file_types=("docx",)), set()),
    ("pages", ChunkFilter(page_from=2, page_to=3), {"guide.pdf"}),
    ("meta str", ChunkFilter(metadata={"team": "ops"}), {"notes.md", "log_100%.TXT"}),
    ("meta int is not str", ChunkFilter(metadata={"tier": 1}), {"guide.pdf"}),
    ("meta str is not int", ChunkFilter(metadata={"tier": "1"}), {"notes.md"}),
    ("meta float", ChunkFilter(metadata={"tier": 2}), {"log_100%.TXT"}),
    ("meta true", ChunkFilter(metadata={"urgent": True}), {"notes.md"}),
    ("meta false", ChunkFilter(metadata={"urgent": False}), {"page.html"}),
    ("meta null", ChunkFilter(metadata={"team": None}), {"page.html"}),
    ("meta any of", ChunkFilter(metadata={"team": ["docs", None]}), {"guide.pdf", "page.html"}),
    ("meta and", ChunkFilter(metadata={"team": "ops", "urgent": True}), {"notes.md"}),
    ("meta missing key", ChunkFilter(metadata={"owner": "x"}), set()),
    (
        "combined",
        ChunkFilter(sources=("guide.pdf", "notes.md"), file_types=("pdf",)),
        {"guide.pdf"},
    ),
]


@pytest.mark.parametrize(
    ("name", "flt", "expected"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES]
)
def test_every_filter_kind_in_sql(
    catalog: Catalog, library: dict[str, str], name: str, flt: ChunkFilter, expected: set[str]
) -> None:
    coll_id = catalog.collection_version("c")[0]
    ids = catalog.filter_chunk_ids(coll_id, flt)
    sources = {c.source for c in catalog.get_chunks(ids).values()}
    assert sources == expected
    assert catalog.count_filtered_chunks(coll_id, flt) == len(ids)
    hits = catalog.keyword_search(coll_id, '"printer"', 50, flt)
    assert sorted(cid for cid, _ in hits) == ids


def test_page_filter_keeps_only_pages_in_range(catalog: Catalog, library: dict[str, str]) -> None:
    coll_id = catalog.collection_version("c")[0]
    ids = catalog.filter_chunk_ids(coll_id, ChunkFilter(page_from=3))
    assert sorted(c.page for c in catalog.get_chunks(ids).values()) == [3, 4]  # type: ignore[type-var]


def test_document_filter_and_candidate_restriction(
    catalog: Catalog, library: dict[str, str]
) -> None:
    coll_id = catalog.collection_version("c")[0]
    flt = ChunkFilter(document_ids=(library["notes.md"], library["readme"]))
    every = catalog.filter_chunk_ids(coll_id, flt)
    assert len(every) == 2
    assert catalog.filter_chunk_ids(coll_id, flt, ids=[every[1], 99999]) == [every[1]]


def test_keyword_search_stays_inside_its_collection(catalog: Catalog) -> None:
    add_document(catalog, "a.txt", [("shared word zebra", axis(0), None)], collection="one")
    add_document(catalog, "b.txt", [("shared word zebra", axis(0), None)], collection="two")
    one = catalog.collection_version("one")[0]
    hits = catalog.keyword_search(one, '"zebra"', 10)
    assert len(hits) == 1
    assert catalog.get_chunks([hits[0][0]])[hits[0][0]].source == "a.txt"


def test_deleted_and_replaced_documents_leave_the_keyword_index(catalog: Catalog) -> None:
    gone = add_document(catalog, "gone.txt", [("obsolete walrus manual", axis(0), None)])
    add_document(catalog, "v.txt", [("version one mentions narwhal", axis(0), None)])
    coll_id = catalog.collection_version("c")[0]
    assert catalog.keyword_search(coll_id, '"walrus"', 10)
    assert catalog.keyword_search(coll_id, '"narwhal"', 10)

    catalog.delete_document("c", gone)
    add_document(catalog, "v.txt", [("version two mentions dolphin", axis(0), None)])

    assert catalog.keyword_search(coll_id, '"walrus"', 10) == []
    assert catalog.keyword_search(coll_id, '"narwhal"', 10) == []
    assert len(catalog.keyword_search(coll_id, '"dolphin"', 10)) == 1
    fts_ok(catalog)
    catalog.delete_collection("c")
    assert catalog.read().execute("SELECT count(*) FROM chunks_fts").fetchone()[0] == 0
    fts_ok(catalog)


def test_keyword_scores_of_given_chunks(catalog: Catalog) -> None:
    add_document(catalog, "a.txt", [("apple pie", axis(0), None), ("banana bread", axis(1), None)])
    coll_id = catalog.collection_version("c")[0]
    ids = catalog.filter_chunk_ids(coll_id, ChunkFilter(sources=("a.txt",)))
    scores = catalog.keyword_scores('"apple" OR "cherry"', ids)
    assert list(scores) == [ids[0]] and scores[ids[0]] > 0
