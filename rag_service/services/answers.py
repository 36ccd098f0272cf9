"""What a question gives back: ranked sources, retrievals and answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from rag_service.llm.base import Usage
from rag_service.retrieval import RetrievalMode
from rag_service.strategies import Cost, StrategyName


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
    #: The cross-encoder's score, when reranking reordered the candidates.
    rerank_score: float | None = None


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
    #: False when the service abstained: the sources do not hold the answer.
    answerable: bool = True
    #: Why it abstained: no_sources, low_retrieval_score or model_declined.
    abstain_reason: str | None = None
    strategy: StrategyName = "direct"
    #: The step-by-step reasoning (cot, self_consistency), apart from the answer.
    reasoning: str | None = None
    #: Share of self_consistency samples that agreed with the returned answer.
    agreement: float | None = None
    #: Draft sentences reflection found unsupported and removed.
    unsupported: tuple[str, ...] = ()
    cost: Cost = field(default_factory=Cost)
