"""Bodies of the OpenAI-compatible endpoints, as OpenAI clients send and parse them.

Requests allow fields this service does not use (clients send ``user``,
``stop``, ``presence_penalty`` ...); responses carry the RAG extras (sources,
citations) in fields OpenAI clients ignore.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rag_service.api.schemas import FiltersIn, QueryOut, SourceOut, UsageOut
from rag_service.retrieval import RetrievalMode
from rag_service.strategies import StrategyName

MODEL_PREFIX = "rag:"


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or a list of parts of which the `text` parts are read."
    )

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "\n".join(
            str(part.get("text", "")) for part in self.content if part.get("type") == "text"
        )


class ChatCompletionIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(
        description=f"`{MODEL_PREFIX}<collection>`: the collection to answer from "
        "(see GET /v1/models)."
    )
    messages: list[ChatMessageIn] = Field(
        min_length=1,
        description="The conversation; the last user message is the question, earlier turns "
        "are its context. The service's own system prompt conditions the model; system "
        "messages sent here are not passed on (set RAG_QUERY__SYSTEM_PROMPT instead).",
    )
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(
        None, description='`{"include_usage": true}` adds a last chunk with the usage.'
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, description="At most RAG_LLM__MAX_TOKENS.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
    n: int | None = Field(None, ge=1, le=1, description="Only one choice is produced.")
    # RAG extras, all optional.
    top_k: int | None = Field(None, description="Sources to retrieve (default 5).")
    mode: RetrievalMode | None = None
    strategy: StrategyName | None = None
    filters: FiltersIn | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = "stop"


class RagExtras(BaseModel):
    """What the native `/v1/query` would have said, for clients that look."""

    citations: list[int]
    answerable: bool
    degraded: bool
    degraded_reason: str | None
    strategy: StrategyName

    @classmethod
    def of(cls, out: QueryOut) -> RagExtras:
        return cls(
            citations=out.citations,
            answerable=out.answerable,
            degraded=out.degraded,
            degraded_reason=out.degraded_reason,
            strategy=out.strategy,
        )


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut
    sources: list[SourceOut] = Field(description="Every source the model was given.")
    rag: RagExtras


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rag-service"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingsIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(
        description=f"`{MODEL_PREFIX}<collection>` (embeds with that collection's model) or "
        "the embedding model's own id."
    )
    input: str | list[str] = Field(description="One text or a list of texts.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Must equal the model's dimension.")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 LE bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage
