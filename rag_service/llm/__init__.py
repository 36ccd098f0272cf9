"""Language-model clients behind one ``ChatModel`` interface."""

from rag_service.llm.base import ChatMessage, ChatModel, Completion, StreamDelta, Usage
from rag_service.llm.factory import create_chat_model

__all__ = ["ChatMessage", "ChatModel", "Completion", "StreamDelta", "Usage", "create_chat_model"]
