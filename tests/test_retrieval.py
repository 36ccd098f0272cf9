"""Retrieval below the API: FTS5 query building, RRF, checks, and the three modes.

The catalog and FAISS are real; the embedder is a hand-written fake that
maps each query to a chosen vector, so dense rankings are known exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from rag_service.config import QuerySettings
from rag_service.errors import InvalidRequest
from rag_service.retrieval import (
    Retriever,
    candidate_pool,
    check_filter,
    check_mode,
    fts_query,
    query_terms,
    reciprocal_rank_fusion,
)
from rag_service.storage.catalog import Catalog
from rag_service.storage.filters import ChunkFilter
from rag_service.storage.vectors import VectorStore
from tests.retrieval_helpers import FakeEmbedder, add_document, toward


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "catalog.sqlite3")
    yield c
    c.close()


# -- FTS5 query building -----------------------------------------------------------


def test_fts_query_quotes_every_word_and_joins_with_or() -> None:
    assert fts_query('Why does "E1234" appear AND NOT near(x)?') == (
        '"why" OR "does" OR "e1234" OR "appear" OR "and" OR "not" OR "near" OR "x"'
    )
    assert fts_query("text:printer* ^jam") == '"text" OR "printer" OR "jam"'
    assert fts_query("jam jam JAM") == '"jam"'


def test_query_terms_split_like_unicode61() -> None:
    assert query_terms("e\u0301cole") == ["école"]  # not split at the combining mark
    assert query_terms("हिन्दी") == ["हिन्दी"]
    assert query_terms("foo_bar-baz") == ["foo", "bar", "baz"]
    assert query_terms("?!... ---") == []
    assert fts_query("?!... ---") is None


# -- reciprocal-rank fusion -----------------------------------------------------------


def test_rrf_on_hand_made_rankings() -> None:
    fused = reciprocal_rank_fusion([[10, 20, 30], [30, 40, 10]], k=60)

    assert [cid for cid, _ in fused] == [10, 30, 20, 40]  # 10 and 30 tie: first list wins
    scores = dict(fused)
    assert scores[10] == pytest.approx(1 / 61 + 1 / 63)
    assert scores[30] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[20] == pytest.approx(1 / 62)
    assert scores[40] == pytest.approx(1 / 62)


def test_rrf_rewards_agreement_and_k_flattens_the_head() -> None:
    # 3 is third in both lists; 1 and 2 each top one list only.
    rankings = [[1, 9, 3], [2, 8, 3]]
    assert reciprocal_rank_fusion(rankings, k=60)[0][0] == 3
    # With k=0 the head dominates: 1/1 beats 1/3 + 1/3.
    assert [cid for cid, _ in reciprocal_rank_fusion(rankings, k=0)][:2] == [1, 2]


def test_rrf_counts_an_id_once_per_list_and_handles_empty_lists() -> None:
    assert reciprocal_rank_fusion([[5, 5, 6], []], k=1) == [(5, 1 / 2), (6, 1 / 4)]
    assert reciprocal_rank_fusion([[], []], k=60) == []


def test_candidate_pool_is_larger_than_top_k() -> None:
    settings = QuerySettings()
    assert candidate_pool(5, settings) == 20
    assert candidate_pool(10, settings) == 40
    assert candidate_pool(3, QuerySettings(candidates_per_result=1, min_candidates=1)) == 3


# -- checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "message"),
    [
        (ChunkFilter(document_ids=()), "document_ids is empty"),
        (ChunkFilter(sources=("",)), "non-empty strings"),
        (ChunkFilter(file_types="pdf"), "must be a list"),  # type: ignore[arg-type]
        (ChunkFilter(page_from=0), "page_from must be 1 or more"),
        (ChunkFilter(page_from=5, page_to=2), "is after"),
        (ChunkFilter(metadata={"team": []}), "empty list"),
        (ChunkFilter(metadata={"team": {"a": 1}}), "only strings"),  # type: ignore[dict-item]
        (ChunkFilter(metadata={"": "x"}), "keys must not be empty"),
    ],
)
def test_bad_filters_are_invalid_requests(flt: ChunkFilter, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_filter(flt)


def test_empty_filter_is_no_filter_and_modes_are_checked() -> None:
    assert check_filter(ChunkFilter()) is None
    assert check_filter(ChunkFilter(metadata={})) is None
    decomposed = check_filter(ChunkFilter(sources=("cafe\u0301.txt",)))
    assert decomposed is not None and decomposed.sources == ("café.txt",)  # as stored
    assert check_mode(None, QuerySettings()) == "hybrid"
    assert check_mode(None, QuerySettings(default_mode="dense")) == "dense"
    with pytest.raises(InvalidRequest, match="mode must be one of"):
        check_mode("semantic", QuerySettings())


# -- the retriever ---------------------------------------------------------------------


def make_retriever(
    catalog: Catalog, tmp_path: Path, **settings: Any
) -> tuple[Retriever, FakeEmbedder]:
    embedder = FakeEmbedder()
    retriever = Retriever(
        catalog=catalog,
        vectors=VectorStore(catalog, tmp_path),
        embedder=embedder,
        settings=QuerySettings(**settings),
    )
    return retriever, embedder


@pytest.fixture
def ladder(catalog: Catalog) -> list[str]:
    """30 one-chunk documents d00..d29 whose cosine with axis 0 falls with the number."""
    for i in range(30):
        add_document(
            catalog,
            f"d{i:02d}.txt",
            [(f"common word{i}" + (" rareterm" if i == 27 else ""), toward(0, 1 - i / 40), None)],
            metadata={"low": i >= 25},
        )
    return [f"d{i:02d}.txt" for i in range(30)]


def sources(hits: Sequence[Any]) -> list[str]:
    return [h.chunk.source for h in hits]


def test_dense_keyword_and_hybrid_scores(
    catalog: Catalog, ladder: list[str], tmp_path: Path
) -> None:
    retriever, _ = make_retriever(catalog, tmp_path)
    coll = catalog.get_collection("c", counts=False)
    timings: dict[str, float] = {}

    dense = retriever.retrieve(coll, "rareterm", top_k=3, mode="dense", flt=None, timings=timings)
    assert sources(dense) == ["d00.txt", "d01.txt", "d02.txt"]
    assert dense[0].score == dense[0].dense_score == pytest.approx(1.0, abs=1e-5)
    assert dense[0].keyword_score is None and dense[0].dense_rank == 1
    assert {"embed_ms", "dense_ms", "search_ms"} <= set(timings)

    keyword = retriever.retrieve(coll, "rareterm", top_k=3, mode="keyword", flt=None, timings={})
    assert sources(keyword) == ["d27.txt"]
    assert keyword[0].score == keyword[0].keyword_score and keyword[0].score > 0
    assert keyword[0].dense_score is None

    hybrid = retriever.retrieve(coll, "rareterm", top_k=3, mode="hybrid", flt=None, timings={})
    assert "d27.txt" in sources(hybrid)
    top = hybrid[0]  # d00 (dense #1) and d27 (keyword #1) tie; dense came first
    assert top.chunk.source == "d00.txt" and top.score == pytest.approx(1 / 61)
    rare = next(h for h in hybrid if h.chunk.source == "d27.txt")
    assert rare.keyword_rank == 1 and rare.dense_rank is None  # outside the dense pool of 20
    assert rare.dense_score == pytest.approx(1 - 27 / 40, abs=1e-5)  # filled in for the caller


@pytest.mark.parametrize("exact_max", [5000, 0], ids=["exact", "over-fetch"])
@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_a_filter_on_low_ranked_chunks_still_returns_them(
    catalog: Catalog, ladder: list[str], tmp_path: Path, mode: str, exact_max: int
) -> None:
    retriever, _ = make_retriever(catalog, tmp_path, filter_exact_max=exact_max)
    coll = catalog.get_collection("c", counts=False)
    flt = ChunkFilter(metadata={"low": True})

    hits = retriever.retrieve(coll, "common", top_k=3, mode=mode, flt=flt, timings={})  # type: ignore[arg-type]

    # Only the five low-ranked chunks may come back, and three of them do.
    assert len(hits) == 3 and set(sources(hits)) <= set(ladder[25:])
    if mode == "dense":
        assert sources(hits) == ["d25.txt", "d26.txt", "d27.txt"]


def test_over_fetch_and_exact_scoring_agree(
    catalog: Catalog, ladder: list[str], tmp_path: Path
) -> None:
    coll = catalog.get_collection("c", counts=False)
    flt = ChunkFilter(sources=tuple(ladder[::3]))
    results = []
    for exact_max in (5000, 0):
        retriever, embedder = make_retriever(catalog, tmp_path, filter_exact_max=exact_max)
        embedder.queries["q"] = toward(0, 0.3)
        hits = retriever.retrieve(coll, "q", top_k=5, mode="dense", flt=flt, timings={})
        results.append([(h.chunk.id, round(h.score, 5)) for h in hits])
    assert results[0] == results[1] and len(results[0]) == 5


def test_a_filter_matching_nothing_returns_nothing(
    catalog: Catalog, ladder: list[str], tmp_path: Path
) -> None:
    retriever, _ = make_retriever(catalog, tmp_path)
    coll = catalog.get_collection("c", counts=False)
    flt = ChunkFilter(sources=("nope.txt",))
    for mode in ("dense", "keyword", "hybrid"):
        assert retriever.retrieve(coll, "common", top_k=3, mode=mode, flt=flt, timings={}) == []  # type: ignore[arg-type]


class CountingStore(VectorStore):
    """The real store, recording how many neighbours each search asked for."""

    def __init__(self, catalog: Catalog, root: Path) -> None:
        super().__init__(catalog, root)
        self.asked: list[int] = []

    def search(
        self,
        collection: str,
        query: npt.NDArray[np.float32],
        k: int,
        *,
        version: int | None = None,
    ) -> list[tuple[int, float]]:
        self.asked.append(k)
        return super().search(collection, query, k, version=version)


def test_over_fetch_widens_until_enough_candidates_pass(
    catalog: Catalog, ladder: list[str], tmp_path: Path
) -> None:
    store = CountingStore(catalog, tmp_path)
    retriever = Retriever(
        catalog=catalog,
        vectors=store,
        embedder=FakeEmbedder(),
        settings=QuerySettings(filter_exact_max=0, candidates_per_result=1, min_candidates=1),
    )
    coll = catalog.get_collection("c", counts=False)

    hits = retriever.retrieve(
        coll, "q", top_k=2, mode="dense", flt=ChunkFilter(metadata={"low": True}), timings={}
    )

    # 5 of 30 chunks pass: 2 * 30 / 5 * 2 = 24 first, none of them low; then all 30.
    assert store.asked == [24, 30]
    assert sources(hits) == ["d25.txt", "d26.txt"]
