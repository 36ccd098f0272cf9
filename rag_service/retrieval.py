"""Finding the chunks that answer a query: dense, keyword (BM25) and hybrid.

- ``dense``: FAISS inner product of normalised vectors, i.e. cosine.
- ``keyword``: SQLite FTS5 BM25 over chunk text.  The query is reduced to
  its words, each quoted, joined by OR, so no user input is ever read as
  FTS5 syntax (operators, column filters, ``*``, ``^``, quotes).
- ``hybrid``: both lists, each over a candidate pool larger than ``top_k``,
  fused by reciprocal-rank fusion, ``sum(1 / (k + rank))``.  RRF only looks
  at ranks, so cosine and BM25, which live on unrelated scales, need no
  calibration against each other.

Filters apply before ``top_k`` is cut, in every mode: keyword search filters
in SQL; dense search over-fetches from FAISS and keeps what passes, or, when
the filter leaves few chunks, scores exactly those chunks' vectors.

An optional cross-encoder (``rag_service.rerank``) then reorders the best
``max(top_k, rerank_candidates)`` of the mode's list, which already passed
the filters, before ``top_k`` is cut.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast, get_args

import numpy as np
import numpy.typing as npt

from rag_service.config import QuerySettings
from rag_service.embedding import Embedder
from rag_service.errors import EmbeddingError, InvalidRequest
from rag_service.rerank import Reranker
from rag_service.storage.catalog import Catalog
from rag_service.storage.filters import ChunkFilter
from rag_service.storage.records import Collection, StoredChunk
from rag_service.storage.vectors import IndexAhead, VectorStore

RetrievalMode = Literal["dense", "keyword", "hybrid"]
MODES: tuple[str, ...] = get_args(RetrievalMode)

#: Words of a query beyond this many are ignored by keyword search.
MAX_QUERY_TERMS = 64
#: Values one filter field may list.
MAX_FILTER_VALUES = 1000


@dataclass(frozen=True)
class RankedChunk:
    """A retrieved chunk with the evidence for its rank.

    ``score`` is what the mode ranks by: cosine (dense), BM25 made positive
    (keyword) or the RRF score (hybrid).  ``dense_score`` and
    ``keyword_score`` show both signals where known; ``*_rank`` is the
    1-based place in that signal's candidate pool, None outside it.
    ``rerank_score`` is the cross-encoder's score when the list was reranked
    (it is then ordered by it, best first), else None.
    """

    chunk: StoredChunk
    score: float
    dense_score: float | None = None
    keyword_score: float | None = None
    dense_rank: int | None = None
    keyword_rank: int | None = None
    rerank_score: float | None = None


# -- query text to FTS5 --------------------------------------------------------


def _is_token_char(ch: str) -> bool:
    # The classes FTS5's unicode61 tokenizer keeps in tokens: letters, numbers,
    # marks and private use.  Python's \w would split words at combining marks.
    category = unicodedata.category(ch)
    return category[0] in "LNM" or category == "Co"


def query_terms(text: str) -> list[str]:
    """The distinct lower-cased words of ``text``, in order, as FTS5 would split them."""
    terms: dict[str, None] = {}
    word: list[str] = []
    for ch in unicodedata.normalize("NFC", text) + " ":
        if _is_token_char(ch):
            word.append(ch)
        elif word:
            terms.setdefault("".join(word).lower(), None)
            word = []
    return list(terms)[:MAX_QUERY_TERMS]


def fts_query(text: str) -> str | None:
    """A safe FTS5 MATCH expression for free text, or None when it has no words.

    Every word becomes a quoted string (inner quotes doubled) and the words
    are joined by OR: BM25 then ranks chunks by how many of the rarer words
    they hold.  Nothing the user typed can act as an operator.
    """
    terms = query_terms(text)
    if not terms:
        return None
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


# -- fusion ----------------------------------------------------------------------


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int) -> list[tuple[int, float]]:
    """Fuse ranked id lists: each id scores ``sum(1 / (k + rank))``, best first.

    Ranks are 1-based; an id repeated within one list counts at its first
    place.  Ties keep the order in which ids were first seen, so the first
    list wins them.
    """
    if k < 0:
        raise ValueError("k must not be negative")
    scores: dict[int, float] = {}
    for ranking in rankings:
        seen: set[int] = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def candidate_pool(top_k: int, settings: QuerySettings) -> int:
    """How many candidates each signal contributes before ``top_k`` is cut."""
    return max(top_k * settings.candidates_per_result, settings.min_candidates, top_k)


# -- checks ----------------------------------------------------------------------


def check_mode(mode: str | None, settings: QuerySettings) -> RetrievalMode:
    """The requested mode, or the configured default; ``InvalidRequest`` if unknown."""
    chosen = settings.default_mode if mode is None else mode
    if chosen not in MODES:
        raise InvalidRequest(f"mode must be one of {', '.join(MODES)}; got {chosen!r}")
    return cast(RetrievalMode, chosen)


def _check_values(name: str, values: Sequence[object] | None) -> None:
    if values is None:
        return
    if isinstance(values, str):
        raise InvalidRequest(f"filters.{name} must be a list, not a string")
    if not values:
        raise InvalidRequest(f"filters.{name} is empty; leave it out to allow every value")
    if len(values) > MAX_FILTER_VALUES:
        raise InvalidRequest(f"filters.{name} lists more than {MAX_FILTER_VALUES} values")
    if any(not isinstance(v, str) or not v.strip() for v in values):
        raise InvalidRequest(f"filters.{name} must hold non-empty strings")


def _check_metadata(metadata: Mapping[str, object]) -> None:
    for key, condition in metadata.items():
        if not key:
            raise InvalidRequest("filters.metadata keys must not be empty")
        values = condition if isinstance(condition, list | tuple) else [condition]
        if not values:
            raise InvalidRequest(f"filters.metadata.{key} is an empty list")
        if len(values) > MAX_FILTER_VALUES:
            raise InvalidRequest(f"filters.metadata.{key} lists too many values")
        for value in values:
            if value is not None and not isinstance(value, str | int | float | bool):
                raise InvalidRequest(
                    f"filters.metadata.{key}: only strings, numbers, booleans and null "
                    "(or a list of them) can be compared"
                )


def check_filter(flt: ChunkFilter | None) -> ChunkFilter | None:
    """``flt`` if it is well-formed (None when it constrains nothing); else ``InvalidRequest``."""
    if flt is None:
        return None
    _check_values("document_ids", flt.document_ids)
    _check_values("sources", flt.sources)
    _check_values("file_types", flt.file_types)
    for name, page in (("page_from", flt.page_from), ("page_to", flt.page_to)):
        if page is not None and page < 1:
            raise InvalidRequest(f"filters.{name} must be 1 or more (pages count from 1)")
    if flt.page_from is not None and flt.page_to is not None and flt.page_from > flt.page_to:
        raise InvalidRequest(
            f"filters.page_from ({flt.page_from}) is after filters.page_to ({flt.page_to})"
        )
    if flt.metadata is not None:
        _check_metadata(flt.metadata)
    if flt.is_empty:
        return None
    if flt.sources is not None:  # stored names are NFC (see validation.source_name)
        flt = replace(flt, sources=tuple(unicodedata.normalize("NFC", s) for s in flt.sources))
    return flt


# -- the retriever ---------------------------------------------------------------


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


class Retriever:
    """Dense, keyword and hybrid search over one catalog's collections, optionally reranked."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        vectors: VectorStore,
        embedder: Embedder,
        settings: QuerySettings,
        reranker: Reranker | None = None,
    ) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.embedder = embedder
        self.settings = settings
        self.reranker = reranker

    def _reranks(self, rerank: bool | None) -> bool:
        if rerank is None:
            return self.reranker is not None
        if rerank and self.reranker is None:
            raise InvalidRequest(
                "reranking is off: set RAG_QUERY__RERANK_MODEL to a local cross-encoder "
                "folder to turn it on"
            )
        return rerank

    def retrieve(
        self,
        collection: Collection,
        query: str,
        *,
        top_k: int,
        mode: RetrievalMode,
        flt: ChunkFilter | None,
        timings: dict[str, float],
        rerank: bool | None = None,
    ) -> list[RankedChunk]:
        """The ``top_k`` best chunks for ``query``; fills ``timings`` in milliseconds.

        ``rerank``: None reranks when a reranker is configured, True demands it
        (``InvalidRequest`` without one), False gives the mode's own order.
        """
        reranking = self._reranks(rerank)
        # Reranking reorders a longer list than top_k; each signal's pool grows
        # with it, as it would for a request of that many results.
        cut = max(top_k, self.settings.rerank_candidates) if reranking else top_k
        pool = candidate_pool(cut, self.settings)
        vector: npt.NDArray[np.float32] | None = None
        match = fts_query(query) if mode != "dense" else None
        timings["embed_ms"] = 0.0
        if mode != "keyword":
            start = time.perf_counter()
            vector = self.embedder.embed_query(query)
            timings["embed_ms"] = _ms(start)
        searched = time.perf_counter()
        try:
            ranked = self._search(collection, mode, vector, match, pool, cut, flt, timings)
        except IndexAhead:
            # Another query caught FAISS up past this one's read: read again,
            # with the index held still so that the second read cannot lose.
            with self.vectors.hold(collection.name):
                ranked = self._search(collection, mode, vector, match, pool, cut, flt, timings)
        timings["search_ms"] = _ms(searched)
        if reranking:
            start = time.perf_counter()
            ranked = self._rerank(query, ranked)
            timings["rerank_ms"] = _ms(start)
        return ranked[:top_k]

    def _search(
        self,
        collection: Collection,
        mode: RetrievalMode,
        vector: npt.NDArray[np.float32] | None,
        match: str | None,
        pool: int,
        cut: int,
        flt: ChunkFilter | None,
        timings: dict[str, float],
    ) -> list[RankedChunk]:
        """Both signals and the chunks they name, all from one state of the catalog.

        FAISS is searched at that state's version, so a document being
        replaced or deleted meanwhile shows either its old chunks or its new
        ones (or none once deleted), never both and never neither.
        """
        dense: list[tuple[int, float]] = []
        keyword: list[tuple[int, float]] = []
        with self.catalog.consistent_read():
            _, version = self.catalog.collection_version(collection.name)
            if vector is not None:
                start = time.perf_counter()
                dense = self._dense(collection, vector, pool, flt, version)
                timings["dense_ms"] = _ms(start)
            if mode != "dense":
                start = time.perf_counter()
                if match is not None:
                    keyword = self.catalog.keyword_search(collection.id, match, pool, flt)
                timings["keyword_ms"] = _ms(start)
            ranked = self._rank(mode, dense, keyword, cut)
            if mode == "hybrid":
                ranked = self._complete_scores(collection, ranked, vector, match)
        return ranked

    def _rerank(self, query: str, ranked: list[RankedChunk]) -> list[RankedChunk]:
        """``ranked`` ordered by the cross-encoder, best first; ties keep their order."""
        if not ranked or self.reranker is None:
            return ranked
        scores = self.reranker.score(query, [r.chunk.text for r in ranked])
        if len(scores) != len(ranked):
            raise EmbeddingError(
                f"reranker {self.reranker.name} gave {len(scores)} scores for {len(ranked)} texts"
            )
        # A NaN score (a broken model) sorts last instead of scrambling the order.
        order = sorted(
            range(len(ranked)), key=lambda i: -scores[i] if not math.isnan(scores[i]) else math.inf
        )
        return [replace(ranked[i], rerank_score=scores[i]) for i in order]

    # -- ranking ---------------------------------------------------------------

    def _rank(
        self,
        mode: RetrievalMode,
        dense: list[tuple[int, float]],
        keyword: list[tuple[int, float]],
        top_k: int,
    ) -> list[RankedChunk]:
        dense_at = {cid: (rank, s) for rank, (cid, s) in enumerate(dense, start=1)}
        keyword_at = {cid: (rank, s) for rank, (cid, s) in enumerate(keyword, start=1)}
        if mode == "dense":
            order = dense
        elif mode == "keyword":
            order = keyword
        else:
            order = reciprocal_rank_fusion(
                [[cid for cid, _ in dense], [cid for cid, _ in keyword]], self.settings.rrf_k
            )
        # Fetch every candidate, not just top_k: a chunk deleted since the
        # search is skipped and the next one takes its place.
        chunks = self.catalog.get_chunks([cid for cid, _ in order])
        out: list[RankedChunk] = []
        for cid, score in order:
            chunk = chunks.get(cid)
            if chunk is None:
                continue
            d_rank, d_score = dense_at.get(cid, (None, None))
            k_rank, k_score = keyword_at.get(cid, (None, None))
            out.append(RankedChunk(chunk, score, d_score, k_score, d_rank, k_rank))
            if len(out) == top_k:
                break
        return out

    def _complete_scores(
        self,
        collection: Collection,
        ranked: list[RankedChunk],
        vector: npt.NDArray[np.float32] | None,
        match: str | None,
    ) -> list[RankedChunk]:
        """Fill in the signal a hybrid hit got no rank from, so callers see both."""
        no_dense = [r.chunk.id for r in ranked if r.dense_score is None]
        no_keyword = [r.chunk.id for r in ranked if r.keyword_score is None]
        cosines: dict[int, float] = {}
        if no_dense and vector is not None:
            ids, vecs = self.catalog.vectors_for(no_dense, collection.dim)
            cosines = {int(i): float(s) for i, s in zip(ids, vecs @ vector, strict=True)}
        bm25 = self.catalog.keyword_scores(match, no_keyword) if no_keyword and match else {}
        return [
            RankedChunk(
                r.chunk,
                r.score,
                r.dense_score if r.dense_score is not None else cosines.get(r.chunk.id),
                r.keyword_score if r.keyword_score is not None else bm25.get(r.chunk.id),
                r.dense_rank,
                r.keyword_rank,
            )
            for r in ranked
        ]

    # -- dense search with filters ---------------------------------------------

    def _dense(
        self,
        collection: Collection,
        vector: npt.NDArray[np.float32],
        pool: int,
        flt: ChunkFilter | None,
        version: int,
    ) -> list[tuple[int, float]]:
        if flt is None or flt.is_empty:
            return self.vectors.search(collection.name, vector, pool, version=version)
        matching = self.catalog.count_filtered_chunks(collection.id, flt)
        if matching == 0:
            return []
        if matching <= self.settings.filter_exact_max:
            ids = self.catalog.filter_chunk_ids(collection.id, flt)
            return self._exact(collection, vector, ids, pool)
        # Over-fetch so that, at the filter's selectivity, about twice the pool
        # passes; widen until enough pass or the whole index has been seen.
        total = self.vectors.size(collection.name)
        fetch = min(total, math.ceil(pool * total / matching * 2))
        while True:
            hits = self.vectors.search(collection.name, vector, fetch, version=version)
            passed = set(
                self.catalog.filter_chunk_ids(collection.id, flt, [cid for cid, _ in hits])
            )
            kept = [(cid, s) for cid, s in hits if cid in passed]
            if len(kept) >= pool or fetch >= total:
                return kept[:pool]
            fetch = min(total, fetch * 4)

    def _exact(
        self,
        collection: Collection,
        vector: npt.NDArray[np.float32],
        ids: Sequence[int],
        pool: int,
    ) -> list[tuple[int, float]]:
        """Cosine of every given chunk, best ``pool`` first (ties by lower id)."""
        found, vecs = self.catalog.vectors_for(ids, collection.dim)
        if not len(found):
            return []
        scores = vecs @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:pool]
        return [(int(found[i]), float(scores[i])) for i in order]
