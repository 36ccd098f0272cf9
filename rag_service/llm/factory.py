"""Choose the model backend named by settings; imports are lazy."""

from __future__ import annotations

from rag_service.config import LLMSettings
from rag_service.llm.base import ChatModel
from rag_service.llm.resilient import CircuitBreaker, FallbackChatModel


def create_chat_model(settings: LLMSettings) -> ChatModel:
    """The model ``settings`` names, behind its circuit breaker, with its fallback if set.

    ``FallbackChatModel(CircuitBreaker(primary), CircuitBreaker(fallback))``:
    each server has its own breaker, so a dead primary is skipped at once
    while the fallback answers.
    """
    primary = _guarded(settings)
    if settings.fallback is None:
        return primary
    try:
        fallback = _guarded(settings.fallback)
    except BaseException:
        primary.close()
        raise
    return FallbackChatModel(primary, fallback)


def _guarded(settings: LLMSettings) -> ChatModel:
    """One backend, behind a circuit breaker when it is a server.

    The local model runs in this process: there is no server to spare, and
    its overload is already shed by its bounded queue (``ModelBusy``).
    ``breaker_failures=0`` turns the breaker off.
    """
    model = create_backend(settings)
    if settings.backend == "local" or settings.breaker_failures == 0:
        return model
    return CircuitBreaker(
        model, failures=settings.breaker_failures, reset_s=settings.breaker_reset_s
    )


def create_backend(settings: LLMSettings) -> ChatModel:
    """The bare backend ``settings.backend`` names: no breaker, no fallback."""
    match settings.backend:
        case "local":
            from rag_service.llm.local import LocalChatModel

            return LocalChatModel(settings)
        case "openai":
            from rag_service.llm.openai import OpenAIChatModel

            return OpenAIChatModel(settings)
