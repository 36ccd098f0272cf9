"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rag_service.llm.base import Usage as UsageValue
from rag_service.retrieval import RetrievalMode
from rag_service.services.answers import Answer, Retrieval
from rag_service.services.answers import Source as SourceValue
from rag_service.storage.filters import ChunkFilter, MetadataScalar
from rag_service.storage.records import Collection, Document, Job
from rag_service.strategies import Cost as CostValue
from rag_service.strategies import StrategyName


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. `collection_not_found`.")
    message: str = Field(description="What went wrong and what to do about it.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class DocumentOut(BaseModel):
    id: str
    collection: str
    source: str = Field(description="The uploaded file name.")
    sha256: str
    size: int
    content_type: str | None
    status: str = Field(description="queued | processing | indexed | failed")
    pages: int | None
    chunk_count: int
    error: str | None
    metadata: dict[str, Any]
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, doc: Document) -> DocumentOut:
        return cls(**{name: getattr(doc, name) for name in cls.model_fields})


class UploadResponse(BaseModel):
    job_id: str
    documents: list[DocumentOut]


class TextDocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, description="The document's text.")
    source: str = Field("text.txt", min_length=1, description="Name it is listed under.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class TextUploadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[TextDocumentIn] = Field(min_length=1)


class ProgressOut(BaseModel):
    documents_total: int
    documents_done: int
    documents_failed: int
    chunks_total: int
    chunks_done: int


class JobOut(BaseModel):
    id: str
    collection: str
    status: str = Field(description="queued | running | succeeded | failed")
    stage: str | None = Field(
        description="queued | parsing | chunking | embedding | indexing | done"
    )
    progress: ProgressOut
    error: str | None = Field(description="Why the job (or some of its documents) failed.")
    attempts: int
    document_ids: list[str]
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        p = job.progress
        return cls(
            id=job.id,
            collection=job.collection,
            status=job.status,
            stage=job.stage,
            progress=ProgressOut(
                documents_total=p.documents_total,
                documents_done=p.documents_done,
                documents_failed=p.documents_failed,
                chunks_total=p.chunks_total,
                chunks_done=p.chunks_done,
            ),
            error=job.error,
            attempts=job.attempts,
            document_ids=list(job.document_ids),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


INDEX_DESCRIPTION = (
    "FAISS index type and parameters: `flat` (exact, the default), "
    "`hnsw[:m=32,ef_construction=80,ef_search=128]`, `ivf[:nlist=1024,nprobe=16]` or "
    "`ivfpq[:nlist=1024,nprobe=16,m=48,nbits=8,rerank=8]`. IVF types stay exact until "
    "the collection holds enough chunks to train (39 per list)."
)


class CollectionOut(BaseModel):
    name: str
    embed_model: str
    dim: int
    document_count: int
    chunk_count: int
    created_at: float
    index: str = Field("flat", description="The collection's index spec, all parameters given.")
    reindexing: bool = Field(False, description="A reindex is building a new index now.")

    @classmethod
    def of(cls, c: Collection, *, reindexing: bool = False) -> CollectionOut:
        return cls(
            name=c.name,
            embed_model=c.embed_model,
            dim=c.dim,
            document_count=c.document_count,
            chunk_count=c.chunk_count,
            created_at=c.created_at,
            index=c.index_spec,
            reindexing=reindexing,
        )


#: The shape of a spec; which parameters each type takes and their ranges are checked after.
INDEX_PATTERN = r"^(flat|hnsw|ivf|ivfpq)(:[a-z_]+=[0-9]+(,[a-z_]+=[0-9]+)*)?$"


class CollectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The new collection's name.")
    index: str = Field("flat", description=INDEX_DESCRIPTION, pattern=INDEX_PATTERN)


class ReindexIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str = Field(description=INDEX_DESCRIPTION, pattern=INDEX_PATTERN)


class ReindexOut(BaseModel):
    collection: str
    index: str = Field(description="The spec being built, all parameters given.")
    status: str = Field(description="`started`: searches use the old index until the swap.")


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class DocumentList(BaseModel):
    documents: list[DocumentOut]
    total: int
    limit: int
    offset: int


class FiltersIn(BaseModel):
    """Which chunks may be returned; fields combine with AND, list values with OR."""

    model_config = ConfigDict(extra="forbid")
    document_ids: list[str] | None = Field(
        None, min_length=1, description="Only these documents (ids from the upload response)."
    )
    sources: list[str] | None = Field(
        None, min_length=1, description="Only documents uploaded under these file names."
    )
    file_types: list[str] | None = Field(
        None,
        min_length=1,
        description='Extensions or MIME types: "pdf", "md", ".html", "text/plain".',
    )
    page_from: int | None = Field(
        None, ge=1, description="First page (inclusive); chunks without a page are left out."
    )
    page_to: int | None = Field(
        None, ge=1, description="Last page (inclusive); chunks without a page are left out."
    )
    metadata: dict[str, MetadataScalar | list[MetadataScalar]] | None = Field(
        None,
        description='Equality on the metadata given at upload, e.g. {"team": "ops"}; '
        "a list matches any of its values.",
    )

    def to_value(self) -> ChunkFilter:
        return ChunkFilter(
            document_ids=None if self.document_ids is None else tuple(self.document_ids),
            sources=None if self.sources is None else tuple(self.sources),
            file_types=None if self.file_types is None else tuple(self.file_types),
            page_from=self.page_from,
            page_to=self.page_to,
            metadata=self.metadata,
        )


MODE_DESCRIPTION = (
    "dense: embedding similarity; keyword: BM25 on the words; hybrid (default): both, "
    "fused by reciprocal rank."
)


class RetrieveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: str = Field(description="Collection to search.")
    query: str = Field(description="What to look for.")
    top_k: int | None = Field(None, description="How many chunks to return (default 5).")
    mode: RetrievalMode | None = Field(None, description=MODE_DESCRIPTION)
    filters: FiltersIn | None = Field(None, description="Restrict the chunks searched.")
    rerank: bool | None = Field(
        None,
        description="Reorder the candidates with the cross-encoder (default: when "
        "RAG_QUERY__RERANK_MODEL is set; true without one is a 422).",
    )


STRATEGY_DESCRIPTION = (
    "How the model is asked: direct (default, one call); cot (reason step by step, then a "
    "marked final answer; the reasoning comes back apart); self_consistency (`samples` "
    "step-by-step answers at a temperature, the most agreed answer wins); reflect (a "
    "draft, then the model checks each sentence against the sources and unsupported "
    "ones are removed)."
)


class QueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: str = Field(description="Collection to answer from.")
    question: str = Field(description="The question.")
    top_k: int | None = Field(None, description="How many chunks to give the model (default 5).")
    mode: RetrievalMode | None = Field(None, description=MODE_DESCRIPTION)
    filters: FiltersIn | None = Field(None, description="Restrict the chunks searched.")
    strategy: StrategyName | None = Field(None, description=STRATEGY_DESCRIPTION)
    samples: int | None = Field(
        None, description="Answers self_consistency votes over (default 5, at most 8)."
    )
    rerank: bool | None = Field(
        None,
        description="Reorder the candidates with the cross-encoder (default: when "
        "RAG_QUERY__RERANK_MODEL is set; true without one is a 422).",
    )
    stream: bool = Field(
        False,
        description="Send Server-Sent Events: sources, tokens as written, then the answer.",
    )


class SourceOut(BaseModel):
    n: int = Field(description="The number the answer cites it by, `[n]`.")
    chunk_id: int
    document_id: str
    source: str = Field(description="The uploaded file name.")
    page: int | None = Field(description="1-based page for PDFs, null otherwise.")
    headings: list[str]
    start_char: int = Field(description="Offset of the chunk in the document's extracted text.")
    end_char: int
    text: str
    score: float = Field(
        description="What the mode ranks by: cosine similarity (dense), BM25 (keyword, "
        "higher is better) or the reciprocal-rank-fusion score (hybrid)."
    )
    dense_score: float | None = Field(
        None, description="Cosine similarity to the query; null in keyword mode."
    )
    keyword_score: float | None = Field(
        None,
        description="BM25 of the query's words (higher is better); null in dense mode or "
        "when the chunk holds none of the words.",
    )
    dense_rank: int | None = Field(
        None, description="Place among the dense candidates (1 = best); null outside them."
    )
    keyword_rank: int | None = Field(
        None, description="Place among the keyword candidates (1 = best); null outside them."
    )
    rerank_score: float | None = Field(
        None, description="The cross-encoder's score when reranking ordered the results."
    )

    @classmethod
    def of(cls, s: SourceValue) -> SourceOut:
        return cls(
            n=s.n,
            chunk_id=s.chunk_id,
            document_id=s.document_id,
            source=s.source,
            page=s.page,
            headings=list(s.headings),
            start_char=s.start_char,
            end_char=s.end_char,
            text=s.text,
            score=s.score,
            dense_score=s.dense_score,
            keyword_score=s.keyword_score,
            dense_rank=s.dense_rank,
            keyword_rank=s.keyword_rank,
            rerank_score=s.rerank_score,
        )


class RetrieveOut(BaseModel):
    results: list[SourceOut]
    timings: dict[str, float]
    mode: RetrievalMode = Field(description="The retrieval mode used.")

    @classmethod
    def of(cls, r: Retrieval) -> RetrieveOut:
        return cls(results=[SourceOut.of(s) for s in r.results], timings=r.timings, mode=r.mode)


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, u: UsageValue) -> UsageOut:
        return cls(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
        )


class CostOut(BaseModel):
    calls: int = Field(description="Model calls the strategy made.")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    ms: float = Field(description="Milliseconds spent in the model.")

    @classmethod
    def of(cls, c: CostValue) -> CostOut:
        return cls(
            calls=c.calls,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            total_tokens=c.total_tokens,
            ms=c.ms,
        )


class QueryOut(BaseModel):
    answer: str
    answerable: bool = Field(
        description="False when the service abstained because the sources do not hold the "
        "answer; `answer` then says so in a plain sentence."
    )
    abstain_reason: str | None = Field(
        description="no_sources: nothing matched; low_retrieval_score: nothing close enough "
        "to the question, the model was not asked; model_declined: the model found no "
        "answer in the sources."
    )
    strategy: StrategyName = Field(description="The prompting strategy used.")
    reasoning: str | None = Field(
        None, description="The step-by-step reasoning (cot, self_consistency)."
    )
    agreement: float | None = Field(
        None, description="Share of self_consistency samples that agreed with the answer."
    )
    unsupported: list[str] = Field(
        default_factory=list, description="Draft sentences reflect found unsupported and removed."
    )
    cost: CostOut = Field(description="What the strategy cost: calls, tokens, model time.")
    sources: list[SourceOut] = Field(description="Every source the model was given.")
    citations: list[int] = Field(description="Source numbers the answer cites, in order.")
    citation_mode: str = Field(
        description="model: the answer's own [n] marks; inferred: matched from the answer's "
        "words because the model wrote none; none: nothing cited."
    )
    invalid_citations: int = Field(description="Citations to sources never given, removed.")
    usage: UsageOut = Field(description="Tokens of every model call, summed.")
    timings: dict[str, float] = Field(
        description="Milliseconds: embed, dense, keyword, search, generate, total."
    )
    model: str
    degraded: bool = Field(description="True when the model failed and only sources are returned.")
    degraded_reason: str | None
    mode: RetrievalMode = Field(description="The retrieval mode used.")

    @classmethod
    def of(cls, a: Answer) -> QueryOut:
        return cls(
            answer=a.answer,
            sources=[SourceOut.of(s) for s in a.sources],
            citations=a.citations,
            citation_mode=a.citation_mode,
            invalid_citations=len(a.invalid_citations),
            usage=UsageOut.of(a.usage),
            timings=a.timings,
            model=a.model,
            degraded=a.degraded,
            degraded_reason=a.degraded_reason,
            mode=a.mode,
            answerable=a.answerable,
            abstain_reason=a.abstain_reason,
            strategy=a.strategy,
            reasoning=a.reasoning,
            agreement=a.agreement,
            unsupported=list(a.unsupported),
            cost=CostOut.of(a.cost),
        )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    """Each part on its own; a part that is not ready is `loading` or `error: <code>: <why>`."""

    status: str = Field(
        description="ready (200) when every part is, else loading or error (503); error when "
        "some part failed."
    )
    embedder: str = Field(description="The embedding model's id once loaded, else loading.")
    index: str = Field(description="open when the catalog answers and the indexes are loaded.")
    model: str = Field(description="loaded when the language model is in memory.")
    workers: int = Field(description="Ingestion worker threads alive in this process.")
