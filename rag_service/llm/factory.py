"""Choose the model backend named by settings; imports are lazy."""

from __future__ import annotations

from rag_service.config import LLMSettings
from rag_service.llm.base import ChatModel


def create_chat_model(settings: LLMSettings) -> ChatModel:
    """Build the backend ``settings.backend`` names."""
    match settings.backend:
        case "local":
            from rag_service.llm.local import LocalChatModel

            return LocalChatModel(settings)
        case "openai":
            from rag_service.llm.openai import OpenAIChatModel

            return OpenAIChatModel(settings)
