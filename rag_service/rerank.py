"""Rerankers: score (query, text) pairs jointly to reorder retrieval candidates.

A cross-encoder reads the question and a chunk together, so it judges
relevance better than the cosine of two separately made vectors or BM25, at
the price of one model pass per candidate.  Retrieval therefore asks it about
the few best fused candidates only (``query.rerank_candidates``).
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections.abc import Sequence

import numpy as np

from rag_service.config import QuerySettings
from rag_service.errors import EmbeddingError

log = logging.getLogger(__name__)


class Reranker(abc.ABC):
    """The smallest surface a reranking backend needs."""

    #: Name shown in logs.
    name: str

    @abc.abstractmethod
    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        """One relevance score per text, in the order given; higher is more relevant."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""


class CrossEncoderReranker(Reranker):
    """A sentence-transformers ``CrossEncoder`` run on the CPU by torch.

    Loaded at construction, so a wrong model path fails at start rather than at
    the first question.  Safe to share between threads.
    """

    def __init__(self, model: str, *, batch_size: int = 16, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not model.strip():
            raise EmbeddingError(
                "RAG_QUERY__RERANK_MODEL is empty; unset it to turn reranking off, or name a "
                "cross-encoder folder"
            )
        started = time.perf_counter()
        try:
            from sentence_transformers import CrossEncoder
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
            self._model = CrossEncoder(model, device=device)
        except ImportError as exc:
            raise EmbeddingError(
                "sentence-transformers is not installed: pip install sentence-transformers"
            ) from exc
        except (OSError, ValueError) as exc:
            raise EmbeddingError(
                f"cannot load rerank model {model!r}: {exc} (setting RAG_QUERY__RERANK_MODEL; "
                "it must be a local cross-encoder folder, no model can be downloaded here)"
            ) from exc
        labels = self._model.num_labels
        if labels != 1:
            raise EmbeddingError(
                f"rerank model {model!r} gives {labels} scores per pair; a reranker must give "
                "one (setting RAG_QUERY__RERANK_MODEL)"
            )
        self.name = model
        self.batch_size = batch_size
        # The fast tokenizer is not safe to call from several threads at once
        # ("Already borrowed"); scoring one query at a time is what the CPU
        # allows anyway.
        self._lock = threading.Lock()
        log.info("reranker ready model=%s seconds=%.1f", model, time.perf_counter() - started)

    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        pairs = [(query, text) for text in texts]
        try:
            with self._lock:
                scores = self._model.predict(
                    pairs,
                    batch_size=self.batch_size,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                )
        except (RuntimeError, ValueError) as exc:
            raise EmbeddingError(f"reranking failed: {exc}") from exc
        return [float(s) for s in np.asarray(scores, dtype=np.float32).reshape(-1)]


def load_reranker(settings: QuerySettings) -> Reranker | None:
    """The configured reranker, loaded now; None when ``rerank_model`` is unset."""
    if settings.rerank_model is None:
        return None
    return CrossEncoderReranker(settings.rerank_model, batch_size=settings.rerank_batch_size)
