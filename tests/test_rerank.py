"""The cross-encoder rerank stage, on a real catalog, FAISS and embedder.

The cross-encoder is a tiny BERT with random weights from a fixed seed,
saved next to all-MiniLM-L6-v2's tokenizer and loaded by sentence-transformers
like any other: its scores mean nothing, but they are the model's own, so the
expected order is computed by asking the model directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rag_service.config import QuerySettings, Settings, resolve_embedding_model
from rag_service.embedding import Embedder
from rag_service.errors import EmbeddingError, InvalidRequest
from rag_service.rerank import CrossEncoderReranker, Reranker, load_reranker
from rag_service.retrieval import RankedChunk, RetrievalMode, Retriever
from rag_service.runtime import Runtime
from rag_service.storage.catalog import Catalog, IncomingFile
from rag_service.storage.filters import ChunkFilter
from rag_service.storage.records import NewChunk
from rag_service.storage.vectors import VectorStore
from tests.helpers import ScriptedChatModel

QUESTION = "How do I clear a paper jam in the printer?"
TOPICS = [
    "clearing a paper jam from the input tray",
    "replacing the toner cartridge",
    "joining the printer to a wireless network",
    "installing the printer driver on Linux",
    "printing on both sides of the paper",
    "what error code E1234 means",
    "cleaning the print heads",
    "loading envelopes and labels",
    "updating the printer firmware",
    "saving energy with sleep mode",
]
WAYS = ["Step by step", "In short", "Troubleshooting"]
MODES = ["dense", "keyword", "hybrid"]


def build_cross_encoder(path: Path, *, num_labels: int = 1) -> Path:
    """A tiny random BERT cross-encoder with the embedder's tokenizer, saved to ``path``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedding_model("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.2,  # spreads the scores: no ties among the candidates
    )
    config.num_labels = num_labels
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder"))


@pytest.fixture(scope="module")
def reranker(model_dir: Path) -> CrossEncoderReranker:
    # A batch smaller than the candidates, so scores come from several batches.
    return CrossEncoderReranker(str(model_dir), batch_size=3)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Any:
    """A second, independent load of the same model, asked directly."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_dir), device="cpu")


def add_corpus(catalog: Catalog, embedder: Embedder) -> None:
    """30 one-chunk printer notes embedded by the real embedder; every third is team a."""
    texts = [f"{WAYS[i % 3]}, printer manual section {i}: {TOPICS[i // 3]}." for i in range(30)]
    for i, (text, vector) in enumerate(zip(texts, embedder.embed(texts), strict=True)):
        sha = hashlib.sha256(text.encode()).hexdigest()
        _, docs = catalog.register_upload(
            "c",
            embedder.model_id,
            embedder.dim,
            [IncomingFile(f"s{i:02d}.txt", sha, len(text), None, {"team": "ab"[i % 3 != 0]})],
        )
        chunk = NewChunk(0, text, None, (), 0, len(text), embedder.count_tokens(text), vector)
        committed = catalog.commit_document(
            docs[0].id, [chunk], pages=None, content_type="text/plain"
        )
        assert committed is not None


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[Catalog]:
    """Shared by the tests, which only read it."""
    c = Catalog(tmp_path_factory.mktemp("catalog") / "catalog.sqlite3")
    add_corpus(c, embedder)
    yield c
    c.close()


def retrievers(
    catalog: Catalog,
    tmp_path: Path,
    embedder: Embedder,
    reranker: Reranker | None,
    **settings: Any,
) -> tuple[Retriever, Retriever]:
    """A retriever with ``reranker`` and the same one without, on one store."""
    store = VectorStore(catalog, tmp_path)
    query = QuerySettings(**settings)
    common: dict[str, Any] = {"catalog": catalog, "vectors": store, "embedder": embedder}
    return (
        Retriever(**common, settings=query, reranker=reranker),
        Retriever(**common, settings=query),
    )


def ids(hits: Sequence[RankedChunk]) -> list[int]:
    return [h.chunk.id for h in hits]


def expected(
    plain: Retriever,
    oracle: Any,
    catalog: Catalog,
    *,
    top_k: int,
    mode: RetrievalMode,
    flt: ChunkFilter | None = None,
) -> list[tuple[int, float, float]]:
    """(chunk id, cross-encoder score, mode score) of the fused candidates in the model's order."""
    candidates = max(top_k, plain.settings.rerank_candidates)
    coll = catalog.get_collection("c", counts=False)
    fused = plain.retrieve(coll, QUESTION, top_k=candidates, mode=mode, flt=flt, timings={})
    scores = oracle.predict([(QUESTION, h.chunk.text) for h in fused], show_progress_bar=False)
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [(fused[i].chunk.id, float(scores[i]), fused[i].score) for i in order][:top_k]


# -- the stage ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_rerank_orders_the_fused_candidates_by_the_models_scores_then_cuts(
    catalog: Catalog,
    tmp_path: Path,
    embedder: Embedder,
    reranker: CrossEncoderReranker,
    oracle: Any,
    mode: RetrievalMode,
) -> None:
    ranked, plain = retrievers(catalog, tmp_path, embedder, reranker, rerank_candidates=8)
    coll = catalog.get_collection("c", counts=False)
    timings: dict[str, float] = {}

    hits = ranked.retrieve(coll, QUESTION, top_k=3, mode=mode, flt=None, timings=timings)

    want = expected(plain, oracle, catalog, top_k=3, mode=mode)
    assert ids(hits) == [cid for cid, _, _ in want]
    assert [h.rerank_score for h in hits] == pytest.approx([s for _, s, _ in want], abs=1e-6)
    assert [h.score for h in hits] == pytest.approx([s for _, _, s in want])  # the mode's own
    assert timings["rerank_ms"] >= 0 and {"embed_ms", "search_ms"} <= set(timings)
    # The cut came after reranking: candidates from beyond the fused top 3 made it.
    fused = plain.retrieve(coll, QUESTION, top_k=3, mode=mode, flt=None, timings={})
    assert not set(ids(hits)) <= set(ids(fused))


@pytest.mark.parametrize("mode", MODES)
def test_each_signal_searches_deep_enough_for_the_rerank_candidates(
    catalog: Catalog,
    tmp_path: Path,
    embedder: Embedder,
    reranker: CrossEncoderReranker,
    oracle: Any,
    mode: RetrievalMode,
) -> None:
    # Pools of exactly top_k: only the reranking itself can ask for 8 candidates.
    tight = {"rerank_candidates": 8, "min_candidates": 1, "candidates_per_result": 1}
    ranked, plain = retrievers(catalog, tmp_path, embedder, reranker, **tight)
    coll = catalog.get_collection("c", counts=False)

    hits = ranked.retrieve(coll, QUESTION, top_k=2, mode=mode, flt=None, timings={})

    assert ids(hits) == [cid for cid, _, _ in expected(plain, oracle, catalog, top_k=2, mode=mode)]
    fused = plain.retrieve(coll, QUESTION, top_k=2, mode=mode, flt=None, timings={})
    assert not set(ids(hits)) <= set(ids(fused))


def test_top_k_above_rerank_candidates_reranks_top_k(
    catalog: Catalog,
    tmp_path: Path,
    embedder: Embedder,
    reranker: CrossEncoderReranker,
    oracle: Any,
) -> None:
    ranked, plain = retrievers(catalog, tmp_path, embedder, reranker, rerank_candidates=4)
    coll = catalog.get_collection("c", counts=False)

    hits = ranked.retrieve(coll, QUESTION, top_k=10, mode="hybrid", flt=None, timings={})

    fused = plain.retrieve(coll, QUESTION, top_k=10, mode="hybrid", flt=None, timings={})
    assert sorted(ids(hits)) == sorted(ids(fused)) and ids(hits) != ids(fused)
    want = expected(plain, oracle, catalog, top_k=10, mode="hybrid")
    assert ids(hits) == [cid for cid, _, _ in want]
    assert all(h.dense_score is not None and h.keyword_score is not None for h in hits)


@pytest.mark.parametrize("exact_max", [5000, 0], ids=["exact", "over-fetch"])
@pytest.mark.parametrize("mode", MODES)
def test_filters_hold_after_reranking(
    catalog: Catalog,
    tmp_path: Path,
    embedder: Embedder,
    reranker: CrossEncoderReranker,
    oracle: Any,
    mode: RetrievalMode,
    exact_max: int,
) -> None:
    ranked, plain = retrievers(
        catalog, tmp_path, embedder, reranker, rerank_candidates=6, filter_exact_max=exact_max
    )
    coll = catalog.get_collection("c", counts=False)
    flt = ChunkFilter(metadata={"team": "a"})

    hits = ranked.retrieve(coll, QUESTION, top_k=3, mode=mode, flt=flt, timings={})

    assert len(hits) == 3
    assert {int(h.chunk.source[1:3]) % 3 for h in hits} == {0}  # team a only
    want = expected(plain, oracle, catalog, top_k=3, mode=mode, flt=flt)
    assert ids(hits) == [cid for cid, _, _ in want]


@pytest.mark.parametrize("mode", MODES)
def test_rerank_false_gives_the_fused_order(
    catalog: Catalog,
    tmp_path: Path,
    embedder: Embedder,
    reranker: CrossEncoderReranker,
    mode: RetrievalMode,
) -> None:
    ranked, plain = retrievers(catalog, tmp_path, embedder, reranker, rerank_candidates=8)
    coll = catalog.get_collection("c", counts=False)
    timings: dict[str, float] = {}

    hits = ranked.retrieve(
        coll, QUESTION, top_k=5, mode=mode, flt=None, timings=timings, rerank=False
    )

    assert hits == plain.retrieve(coll, QUESTION, top_k=5, mode=mode, flt=None, timings={})
    assert all(h.rerank_score is None for h in hits) and "rerank_ms" not in timings


def test_rerank_true_without_a_model_is_an_invalid_request(
    catalog: Catalog, tmp_path: Path, embedder: Embedder
) -> None:
    _, plain = retrievers(catalog, tmp_path, embedder, None)
    coll = catalog.get_collection("c", counts=False)
    with pytest.raises(InvalidRequest, match="reranking is off: set RAG_QUERY__RERANK_MODEL"):
        plain.retrieve(coll, QUESTION, top_k=3, mode="hybrid", flt=None, timings={}, rerank=True)

    timings: dict[str, float] = {}
    hits = plain.retrieve(coll, QUESTION, top_k=3, mode="hybrid", flt=None, timings=timings)
    assert len(hits) == 3 and "rerank_ms" not in timings  # None: off without a model


def test_a_query_without_candidates_is_not_scored(
    catalog: Catalog, tmp_path: Path, embedder: Embedder, reranker: CrossEncoderReranker
) -> None:
    ranked, _ = retrievers(catalog, tmp_path, embedder, reranker)
    coll = catalog.get_collection("c", counts=False)
    assert ranked.retrieve(coll, "?!", top_k=3, mode="keyword", flt=None, timings={}) == []


class MiscountingReranker(Reranker):
    """A broken backend: one score, whatever it is given."""

    name = "miscounting"

    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        return [1.0]


def test_a_reranker_giving_the_wrong_number_of_scores_is_an_error(
    catalog: Catalog, tmp_path: Path, embedder: Embedder
) -> None:
    ranked, _ = retrievers(catalog, tmp_path, embedder, MiscountingReranker())
    coll = catalog.get_collection("c", counts=False)
    with pytest.raises(EmbeddingError, match="gave 1 scores for 20 texts"):
        ranked.retrieve(coll, QUESTION, top_k=3, mode="dense", flt=None, timings={})


# -- the model -----------------------------------------------------------------------------


def test_scores_are_the_models_and_safe_from_many_threads(
    reranker: CrossEncoderReranker, oracle: Any
) -> None:
    texts = [f"{way}: {topic}" for topic in TOPICS for way in WAYS]
    serial = reranker.score(QUESTION, texts)
    want = oracle.predict([(QUESTION, t) for t in texts], show_progress_bar=False)
    assert serial == pytest.approx([float(s) for s in want], abs=1e-6)
    assert reranker.score(QUESTION, []) == []

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: reranker.score(QUESTION, texts), range(16)))
    assert all(r == pytest.approx(serial, abs=1e-6) for r in results)


def test_load_reranker_is_off_without_a_model(model_dir: Path) -> None:
    assert load_reranker(QuerySettings()) is None
    loaded = load_reranker(QuerySettings(rerank_model=str(model_dir), rerank_batch_size=7))
    assert isinstance(loaded, CrossEncoderReranker) and loaded.batch_size == 7


# -- wired into the runtime ---------------------------------------------------------------


def test_runtime_reranks_queries_with_the_configured_model(
    tmp_path: Path, embedder: Embedder, model_dir: Path, oracle: Any
) -> None:
    query = QuerySettings(rerank_model=str(model_dir), rerank_candidates=8)
    settings = Settings(data_dir=tmp_path / "data", query=query)
    with Runtime.open(settings, embedder=embedder, chat_model=ScriptedChatModel()) as rag:
        assert isinstance(rag.reranker, CrossEncoderReranker)
        add_corpus(rag.catalog, embedder)

        got = rag.query.retrieve("c", QUESTION, 3, mode="hybrid")

        plain = Retriever(
            catalog=rag.catalog, vectors=rag.vectors, embedder=embedder, settings=query
        )
        want = expected(plain, oracle, rag.catalog, top_k=3, mode="hybrid")
        assert [s.chunk_id for s in got.results] == [cid for cid, _, _ in want]
        assert "rerank_ms" in got.timings
        assert [s.rerank_score for s in got.results] == [
            pytest.approx(score, abs=1e-5) for _, score, _ in want
        ]
        off = rag.query.retrieve("c", QUESTION, 3, mode="hybrid", rerank=False)
        assert all(s.rerank_score is None for s in off.results)
        assert "rerank_ms" not in off.timings


def test_http_rerank_flag_without_a_model_is_422(client: TestClient) -> None:
    for path, body in (
        ("/v1/retrieve", {"collection": "c", "query": "x", "rerank": True}),
        ("/v1/query", {"collection": "c", "question": "x", "rerank": True}),
    ):
        client.post("/v1/collections/c/documents", json={"documents": [{"text": "x y z"}]})
        response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert "RAG_QUERY__RERANK_MODEL" in response.json()["error"]["message"]


def test_a_bad_rerank_model_fails_runtime_open_clearly(tmp_path: Path, embedder: Embedder) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    two_labels = build_cross_encoder(tmp_path / "two-labels", num_labels=2)
    cases = [
        (str(tmp_path / "no-such-model"), "cannot load rerank model .*no-such-model"),
        (str(not_a_model), "cannot load rerank model .*not-a-model"),
        ("cross-encoder/not-downloaded-here", "no model can be downloaded here"),
        (str(two_labels), "gives 2 scores per pair"),
        ("  ", "RAG_QUERY__RERANK_MODEL is empty"),
    ]
    for path, message in cases:
        data = tmp_path / "data"
        settings = Settings(data_dir=data, query=QuerySettings(rerank_model=path))
        with pytest.raises(EmbeddingError, match=message) as caught:
            Runtime.open(settings, embedder=embedder, chat_model=ScriptedChatModel())
        assert "RAG_QUERY__RERANK_MODEL" in caught.value.message
        assert not data.exists()  # it failed before opening anything
