"""Retrieve chunks and answer questions from them, with checked citations."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import cast

from rag_service.config import QuerySettings
from rag_service.embedding import Embedder
from rag_service.errors import InvalidRequest, ModelBusy, ModelError
from rag_service.llm.base import ChatMessage, ChatModel, Usage
from rag_service.prompting import (
    NO_ANSWER,
    STOP_SEQUENCES,
    ContextSource,
    build_messages,
    clean_answer,
    extract_citations,
    infer_citations,
    is_no_answer,
    pack_context,
    strip_invalid_citations,
)
from rag_service.rerank import Reranker
from rag_service.retrieval import (
    RankedChunk,
    Retriever,
    check_filter,
    check_mode,
)
from rag_service.services.answers import Answer, Retrieval, Source
from rag_service.services.conversation import HISTORY_TOKENS, recent_turns, search_text
from rag_service.services.validation import bounded_int, collection_name, same_embedder
from rag_service.storage.catalog import Catalog
from rag_service.storage.filters import ChunkFilter
from rag_service.storage.records import Collection
from rag_service.storage.vectors import VectorStore
from rag_service.strategies import STRATEGIES, Context, Cost, Draft, Plan, StrategyName
from rag_service.strategies import run as run_strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A question checked, its sources retrieved and packed, the model not yet asked."""

    #: The answer so far: sources, retrieval timings, mode and strategy.
    base: Answer
    plan: Plan
    context: Context
    model: ChatModel
    started: float


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
        reranker: Reranker | None = None,
    ) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.embedder = embedder
        self._chat_model = chat_model
        self.settings = settings
        self.max_answer_tokens = max_answer_tokens
        self.temperature = temperature
        self.retriever = Retriever(
            catalog=catalog,
            vectors=vectors,
            embedder=embedder,
            settings=settings,
            reranker=reranker,
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
        same_embedder(
            collection, (coll.embed_model, coll.dim), (self.embedder.model_id, self.embedder.dim)
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
            rerank_score=None if hit.rerank_score is None else round(hit.rerank_score, 6),
        )

    def retrieve(
        self,
        collection: str,
        query: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: ChunkFilter | None = None,
        rerank: bool | None = None,
    ) -> Retrieval:
        """The ``top_k`` best chunks for ``query``, best first; no model call.

        ``mode`` is dense, keyword or hybrid (default: ``query.default_mode``);
        ``filters`` restrict the chunks searched before ``top_k`` is cut;
        ``rerank`` turns the cross-encoder on or off (default: on when configured).
        """
        started = time.perf_counter()
        k, coll = self._check(collection, query, top_k, "query")
        chosen = check_mode(mode, self.settings)
        flt = check_filter(filters)
        timings: dict[str, float] = {}
        ranked = self.retriever.retrieve(
            coll, query, top_k=k, mode=chosen, flt=flt, timings=timings, rerank=rerank
        )
        timings["total_ms"] = _ms(started)
        return Retrieval(
            [self._source(i + 1, hit) for i, hit in enumerate(ranked)], timings, chosen
        )

    # -- answering -----------------------------------------------------------

    def plan(self, strategy: str | None, samples: int | None) -> Plan:
        """Check a request's strategy and sample count against the settings."""
        name = strategy or self.settings.default_strategy
        if name not in STRATEGIES:
            raise InvalidRequest(
                f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if samples is not None and name != "self_consistency":
            raise InvalidRequest("samples applies only to strategy self_consistency")
        n = self.settings.samples if samples is None else samples
        if name == "self_consistency":
            bounded_int(
                n,
                name="samples",
                low=2,
                high=self.settings.max_samples,
                setting="RAG_QUERY__MAX_SAMPLES",
            )
        return Plan(
            cast(StrategyName, name),  # checked against STRATEGIES above
            n if name == "self_consistency" else 1,
            self.settings.sample_temperature,
        )

    def prepare(
        self,
        collection: str,
        question: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: ChunkFilter | None = None,
        strategy: str | None = None,
        samples: int | None = None,
        history: Sequence[ChatMessage] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
        rerank: bool | None = None,
    ) -> Prepared | Answer:
        """Check the request, retrieve and pack the sources: all but the model call.

        ``history`` holds earlier turns of a conversation: the last ones that
        fit ``HISTORY_TOKENS`` go into the prompt, and a short follow-up
        question is searched together with the user's previous one.
        ``max_tokens`` (up to the setting) and ``temperature`` override the
        model settings for this answer.

        Returns the finished ``Answer`` when there is nothing to ask the model
        (the service abstains), else what ``answer`` or ``stream`` needs.
        Raises the request's errors before anything is streamed.
        """
        started = time.perf_counter()
        k, coll = self._check(collection, question, top_k, "question")
        chosen = check_mode(mode, self.settings)
        plan = self.plan(strategy, samples)
        flt = check_filter(filters)
        answer_tokens = self.max_answer_tokens
        if max_tokens is not None:
            answer_tokens = bounded_int(
                max_tokens,
                name="max_tokens",
                low=1,
                high=self.max_answer_tokens,
                setting="RAG_LLM__MAX_TOKENS",
            )
        timings: dict[str, float] = {}
        ranked = self.retriever.retrieve(
            coll,
            search_text(question, history),
            top_k=k,
            mode=chosen,
            flt=flt,
            timings=timings,
            rerank=rerank,
        )
        base = Answer(
            answer=NO_ANSWER,
            sources=[],
            citations=[],
            invalid_citations=[],
            usage=Usage(),
            timings=timings,
            model="",
            mode=chosen,
            strategy=plan.name,
        )
        if not ranked:
            if self.catalog.chunk_count(coll.id) == 0:
                why = f"The collection {collection!r} has no indexed documents."
            elif flt is not None:
                why = "No indexed chunk matches the filters."
            else:
                why = "No indexed chunk contains the question's words."
            return _abstain(base, started, f"{NO_ANSWER} {why}", "no_sources")
        hits = {hit.chunk.id: hit for hit in ranked}
        model = self._chat_model()
        # Room for the answer (twice over for reasoning and checking) and the instructions.
        answer_room = answer_tokens * (1 if plan.name == "direct" else 2)
        room = model.context_window - answer_room - 200 - (HISTORY_TOKENS if history else 0)
        packed = pack_context(
            [(hit.chunk, hit.score) for hit in ranked],
            budget_tokens=max(64, min(self.settings.context_tokens, room)),
            count_tokens=model.count_tokens,
        )
        base = replace(
            base,
            sources=[self._source(s.n, hits[s.chunk.id], s.text) for s in packed],
            model=model.name,
        )
        best = max((h.dense_score for h in ranked if h.dense_score is not None), default=None)
        if best is not None and best < self.settings.abstain_min_score:
            return _abstain(
                base,
                started,
                f"{NO_ANSWER} No source is close enough to the question "
                f"(best similarity {best:.2f}).",
                "low_retrieval_score",
            )
        context = Context(
            question=question,
            sources=packed,
            system_prompt=self.settings.system_prompt,
            max_tokens=answer_tokens,
            temperature=self.temperature if temperature is None else temperature,
            history=recent_turns(history, model.count_tokens),
        )
        return Prepared(base, plan, context, model, started)

    def ask(
        self,
        collection: str,
        question: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: ChunkFilter | None = None,
        strategy: str | None = None,
        samples: int | None = None,
        rerank: bool | None = None,
    ) -> Answer:
        """Answer ``question`` from the collection's best chunks, citing them.

        ``mode`` and ``filters`` choose the chunks as in ``retrieve``;
        ``strategy`` (direct, cot, self_consistency, reflect) how the model is
        asked, ``samples`` how many answers self_consistency votes over.  When
        the sources do not hold the answer the result says so with
        ``answerable=False`` instead of guessing.
        """
        prepared = self.prepare(
            collection,
            question,
            top_k,
            mode=mode,
            filters=filters,
            strategy=strategy,
            samples=samples,
            rerank=rerank,
        )
        return prepared if isinstance(prepared, Answer) else self.answer(prepared)

    def answer(self, prepared: Prepared) -> Answer:
        """Ask the model with the prepared strategy and check its answer."""
        cost = Cost()
        try:
            draft = run_strategy(prepared.plan, prepared.model, prepared.context, cost)
        except ModelBusy:
            raise
        except ModelError as exc:
            return _degraded(prepared, cost, exc)
        return self._finish(prepared, draft, cost)

    def stream(self, prepared: Prepared) -> Iterator[str | Answer]:
        """The answer's text as the model writes it, then the checked ``Answer``.

        Only ``direct`` streams token by token; the other strategies need the
        whole reply before any of it is the answer, so they yield only the end.
        Closing the iterator stops the generation.  A busy or failing model
        ends the stream with a degraded answer rather than an exception.
        """
        if prepared.plan.name != "direct":
            try:
                yield self.answer(prepared)
            except ModelBusy as exc:
                yield _degraded(prepared, Cost(), exc)
            return
        cost = Cost()
        pieces: list[str] = []
        answered_by = prepared.model.name
        start = time.perf_counter()
        deltas = prepared.model.stream(
            build_messages(
                prepared.context.question,
                prepared.context.sources,
                system_prompt=prepared.context.system_prompt,
                history=prepared.context.history,
            ),
            max_tokens=prepared.context.max_tokens,
            temperature=prepared.context.temperature,
            stop=STOP_SEQUENCES,
        )
        try:
            for delta in deltas:
                if delta.model:
                    answered_by = delta.model
                if delta.text:
                    pieces.append(delta.text)
                    yield delta.text
                if delta.usage is not None:
                    cost.prompt_tokens = delta.usage.prompt_tokens
                    cost.completion_tokens = delta.usage.completion_tokens
        except ModelError as exc:
            cost.ms = _ms(start)
            yield _degraded(prepared, cost, exc)
            return
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()
        cost.calls = 1
        cost.ms = _ms(start)
        yield self._finish(prepared, Draft("".join(pieces), answered_by), cost)

    def _finish(self, prepared: Prepared, draft: Draft, cost: Cost) -> Answer:
        timings = prepared.base.timings
        packed = prepared.context.sources
        timings["generate_ms"] = cost.ms
        text, citations, invalid = self._checked(draft.text, packed)
        cited_by = "model" if citations else "none"
        for n in draft.extra_citations:
            if n not in citations:
                citations.append(n)
        declined = is_no_answer(text)
        if not citations and not declined:
            citations = infer_citations(text, packed)
            cited_by = "inferred" if citations else "none"
        timings["total_ms"] = _ms(prepared.started)
        return replace(
            prepared.base,
            answer=NO_ANSWER if declined else text,
            citations=[] if declined else citations,
            invalid_citations=invalid,
            usage=cost.usage,
            model=draft.model or prepared.model.name,
            citation_mode="none" if declined else cited_by,
            answerable=not declined,
            abstain_reason="model_declined" if declined else None,
            reasoning=draft.reasoning,
            agreement=draft.agreement,
            unsupported=draft.unsupported,
            cost=cost,
        )

    @staticmethod
    def _checked(raw: str, packed: Sequence[ContextSource]) -> tuple[str, list[int], list[int]]:
        """Drop citations to sources that were never given and count them."""
        cleaned = clean_answer(raw)
        valid, invalid = extract_citations(cleaned, len(packed))
        text = strip_invalid_citations(cleaned, invalid) if invalid else cleaned
        if not text:
            text = NO_ANSWER
        return text, valid, invalid


def _abstain(base: Answer, started: float, text: str, reason: str) -> Answer:
    base.timings["generate_ms"] = 0.0
    base.timings["total_ms"] = _ms(started)
    return replace(base, answer=text, answerable=False, abstain_reason=reason)


def _degraded(prepared: Prepared, cost: Cost, exc: ModelError) -> Answer:
    timings = prepared.base.timings
    timings["generate_ms"] = cost.ms
    timings["total_ms"] = _ms(prepared.started)
    log.warning("model failed; answering with sources only error=%s", exc)
    return replace(
        prepared.base,
        answer="The language model is unavailable; here are the most relevant sources.",
        usage=cost.usage,
        degraded=True,
        degraded_reason=f"{exc.code}: {exc.message}",
        cost=cost,
    )
