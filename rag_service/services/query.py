"""Retrieve chunks and answer questions from them, with checked citations."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from rag_service.config import QuerySettings
from rag_service.embedding import Embedder
from rag_service.errors import EmbeddingMismatch, InvalidRequest, ModelBusy, ModelError
from rag_service.llm.base import ChatModel, Usage
from rag_service.prompting import (
    NO_ANSWER,
    STOP_SEQUENCES,
    ContextSource,
    build_messages,
    clean_answer,
    extract_citations,
    infer_citations,
    pack_context,
    strip_invalid_citations,
)
from rag_service.retrieval import (
    RankedChunk,
    RetrievalMode,
    Retriever,
    check_filter,
    check_mode,
)
from rag_service.services.validation import bounded_int, collection_name
from rag_service.storage.catalog import Catalog
from rag_service.storage.filters import ChunkFilter
from rag_service.storage.records import Collection
from rag_service.storage.vectors import VectorStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A retrieved chunk as callers see it."""

    n: int
    chunk_id: int
    document_id: str
    source: str
    page: int | None
    headings: tuple[str, ...]
    start_char: int
    end_char: int
    text: str
    #: What the mode ranked by: cosine (dense), BM25 (keyword) or RRF (hybrid).
    score: float
    dense_score: float | None = None
    keyword_score: float | None = None
    dense_rank: int | None = None
    keyword_rank: int | None = None


@dataclass(frozen=True)
class Retrieval:
    """Ranked chunks and what finding them cost."""

    results: list[Source]
    timings: dict[str, float]
    mode: RetrievalMode = "dense"


@dataclass(frozen=True)
class Answer:
    """A model's answer with the sources it was given and the ones it cited."""

    answer: str
    sources: list[Source]
    citations: list[int]
    invalid_citations: list[int]
    usage: Usage
    timings: dict[str, float]
    model: str
    degraded: bool = False
    degraded_reason: str | None = None
    #: "model": the answer's own ``[n]``; "inferred": matched from its words; "none".
    citation_mode: str = "none"
    mode: RetrievalMode = "dense"


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


class QueryService:
    """Retrieval and answering over one catalog's collections."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        vectors: VectorStore,
        embedder: Embedder,
        chat_model: Callable[[], ChatModel],
        settings: QuerySettings,
        max_answer_tokens: int,
        temperature: float,
    ) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.embedder = embedder
        self._chat_model = chat_model
        self.settings = settings
        self.max_answer_tokens = max_answer_tokens
        self.temperature = temperature
        self.retriever = Retriever(
            catalog=catalog, vectors=vectors, embedder=embedder, settings=settings
        )

    # -- checks --------------------------------------------------------------

    def _check(
        self, collection: str, text: str, top_k: int | None, what: str
    ) -> tuple[int, Collection]:
        collection_name(collection)
        if not text.strip():
            raise InvalidRequest(f"{what} is empty")
        if len(text) > self.settings.max_question_chars:
            raise InvalidRequest(
                f"{what} is {len(text)} characters; the limit is "
                f"{self.settings.max_question_chars} (RAG_QUERY__MAX_QUESTION_CHARS)"
            )
        k = self.settings.default_top_k if top_k is None else top_k
        bounded_int(
            k, name="top_k", low=1, high=self.settings.max_top_k, setting="RAG_QUERY__MAX_TOP_K"
        )
        coll = self.catalog.get_collection(collection, counts=False)
        if coll.embed_model != self.embedder.model_id or coll.dim != self.embedder.dim:
            raise EmbeddingMismatch(
                f"collection {collection!r} was embedded with {coll.embed_model} but the "
                f"service runs {self.embedder.model_id}"
            )
        return k, coll

    # -- retrieval -----------------------------------------------------------

    @staticmethod
    def _source(n: int, hit: RankedChunk, text: str | None = None) -> Source:
        chunk = hit.chunk
        return Source(
            n=n,
            chunk_id=chunk.id,
            document_id=chunk.document_id,
            source=chunk.source,
            page=chunk.page,
            headings=chunk.headings,
            start_char=chunk.start_char,
            end_char=chunk.end_char,
            text=chunk.text if text is None else text,
            score=round(hit.score, 6),
            dense_score=None if hit.dense_score is None else round(hit.dense_score, 6),
            keyword_score=None if hit.keyword_score is None else round(hit.keyword_score, 6),
            dense_rank=hit.dense_rank,
            keyword_rank=hit.keyword_rank,
        )

    def retrieve(
        self,
        collection: str,
        query: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: ChunkFilter | None = None,
    ) -> Retrieval:
        """The ``top_k`` best chunks for ``query``, best first; no model call.

        ``mode`` is dense, keyword or hybrid (default: ``query.default_mode``);
        ``filters`` restrict the chunks searched before ``top_k`` is cut.
        """
        started = time.perf_counter()
        k, coll = self._check(collection, query, top_k, "query")
        chosen = check_mode(mode, self.settings)
        flt = check_filter(filters)
        timings: dict[str, float] = {}
        ranked = self.retriever.retrieve(
            coll, query, top_k=k, mode=chosen, flt=flt, timings=timings
        )
        timings["total_ms"] = _ms(started)
        return Retrieval(
            [self._source(i + 1, hit) for i, hit in enumerate(ranked)], timings, chosen
        )

    # -- answering -----------------------------------------------------------

    def ask(
        self,
        collection: str,
        question: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: ChunkFilter | None = None,
    ) -> Answer:
        """Answer ``question`` from the collection's best chunks, citing them.

        ``mode`` and ``filters`` choose the chunks as in ``retrieve``.
        """
        started = time.perf_counter()
        k, coll = self._check(collection, question, top_k, "question")
        chosen = check_mode(mode, self.settings)
        flt = check_filter(filters)
        timings: dict[str, float] = {}
        ranked = self.retriever.retrieve(
            coll, question, top_k=k, mode=chosen, flt=flt, timings=timings
        )
        if not ranked:
            timings["generate_ms"] = 0.0
            timings["total_ms"] = _ms(started)
            if self.catalog.chunk_count(coll.id) == 0:
                why = f"The collection {collection!r} has no indexed documents."
            elif flt is not None:
                why = "No indexed chunk matches the filters."
            else:
                why = "No indexed chunk contains the question's words."
            return Answer(
                answer=f"{NO_ANSWER} {why}",
                sources=[],
                citations=[],
                invalid_citations=[],
                usage=Usage(),
                timings=timings,
                model="",
                mode=chosen,
            )
        hits = {hit.chunk.id: hit for hit in ranked}
        model = self._chat_model()
        budget = min(
            self.settings.context_tokens,
            model.context_window - self.max_answer_tokens - 200,  # room for the instructions
        )
        packed = pack_context(
            [(hit.chunk, hit.score) for hit in ranked],
            budget_tokens=max(64, budget),
            count_tokens=model.count_tokens,
        )
        sources = [self._source(s.n, hits[s.chunk.id], s.text) for s in packed]
        start = time.perf_counter()
        try:
            completion = model.complete(
                build_messages(question, packed, system_prompt=self.settings.system_prompt),
                max_tokens=self.max_answer_tokens,
                temperature=self.temperature,
                stop=STOP_SEQUENCES,
            )
        except ModelBusy:
            raise
        except ModelError as exc:
            timings["generate_ms"] = _ms(start)
            timings["total_ms"] = _ms(started)
            log.warning("model failed; answering with sources only error=%s", exc)
            return Answer(
                answer="The language model is unavailable; here are the most relevant sources.",
                sources=sources,
                citations=[],
                invalid_citations=[],
                usage=Usage(),
                timings=timings,
                model=model.name,
                degraded=True,
                degraded_reason=f"{exc.code}: {exc.message}",
                mode=chosen,
            )
        timings["generate_ms"] = _ms(start)
        text, citations, invalid = self._checked(completion.text, packed)
        cited_by = "model" if citations else "none"
        if not citations and text != NO_ANSWER:
            citations = infer_citations(text, packed)
            cited_by = "inferred" if citations else "none"
        timings["total_ms"] = _ms(started)
        return Answer(
            answer=text,
            sources=sources,
            citations=citations,
            invalid_citations=invalid,
            usage=completion.usage,
            timings=timings,
            model=completion.model or model.name,
            citation_mode=cited_by,
            mode=chosen,
        )

    @staticmethod
    def _checked(raw: str, packed: list[ContextSource]) -> tuple[str, list[int], list[int]]:
        """Drop citations to sources that were never given and count them."""
        cleaned = clean_answer(raw)
        valid, invalid = extract_citations(cleaned, len(packed))
        text = strip_invalid_citations(cleaned, invalid) if invalid else cleaned
        if not text:
            text = NO_ANSWER
        return text, valid, invalid
