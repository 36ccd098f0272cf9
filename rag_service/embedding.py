"""Embedders: text in, normalised float32 vectors out."""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from rag_service.config import EmbeddingSettings, resolve_embedding_model
from rag_service.errors import EmbeddingError

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]


class Embedder(abc.ABC):
    """The smallest surface a backend needs: embed a batch, count tokens."""

    #: Name recorded with every collection this embedder fills.
    model_id: str
    #: Vector dimension.
    dim: int
    #: Longest input in tokens, special tokens included.
    max_seq_length: int
    batch_size: int = 32

    @abc.abstractmethod
    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        """Unit-length vectors for one batch of texts, shape ``(len(texts), dim)``."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes, without special tokens."""

    def tokenizer(self) -> Any:
        """A ``tokenizers.Tokenizer`` for token-aware chunking, or None."""
        return None

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed any number of texts in batches."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        parts = [
            self.embed_batch(texts[i : i + self.batch_size])
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.vstack(parts).astype(np.float32, copy=False)

    def embed_query(self, text: str) -> Vectors:
        """One vector for a question."""
        return np.asarray(self.embed([text])[0], dtype=np.float32)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model run on the CPU by torch."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        location = resolve_embedding_model(settings.model)
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            # no "Loading weights" bar on every start
            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

            self._model = SentenceTransformer(location, device=settings.device)
        except ImportError as exc:
            raise EmbeddingError(
                "sentence-transformers is not installed: pip install sentence-transformers"
            ) from exc
        except (OSError, ValueError) as exc:
            raise EmbeddingError(
                f"cannot load embedding model {settings.model!r} from {location!r}: {exc} "
                "(setting RAG_EMBEDDING__MODEL; no model can be downloaded here)"
            ) from exc
        self.model_id = settings.model.removeprefix("sentence-transformers/")
        get_dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        dim, max_len = get_dim(), self._model.max_seq_length
        if dim is None or max_len is None:
            raise EmbeddingError(f"model {settings.model!r} reports no dimension or max length")
        self.dim = int(dim)
        self.max_seq_length = int(max_len)
        self.batch_size = settings.batch_size
        self._tokenizer = self._plain_tokenizer()

    def _plain_tokenizer(self) -> Any:
        """The model's fast tokenizer with padding and truncation turned off.

        all-MiniLM-L6-v2's tokenizer file ships with both fixed at 128 tokens,
        which would make every text count as 128.
        """
        backend = getattr(self._model.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend.to_str())
        tok.no_padding()
        tok.no_truncation()
        return tok

    def tokenizer(self) -> Any:
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        return len(self._model.tokenizer.tokenize(text))

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        try:
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except (RuntimeError, ValueError) as exc:
            raise EmbeddingError(f"embedding failed: {exc}") from exc
        return np.asarray(vectors, dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> Vectors:
        # sentence-transformers batches (and sorts by length) on its own.
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_batch(texts)


def make_embedder(settings: EmbeddingSettings) -> Embedder:
    """The embedder ``settings.backend`` names, importing only that backend."""
    match settings.backend:
        case "torch":
            return SentenceTransformerEmbedder(settings)
        case "onnx-int8":
            from rag_service.embedding_onnx import OnnxInt8Embedder

            return OnnxInt8Embedder(settings)
