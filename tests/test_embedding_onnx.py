"""The onnx-int8 embedding backend: one contract for both backends, agreement with torch,
and collections that refuse the backend that did not embed them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ingest.chunking import Chunker
from ingest.loaders import load_document
from rag_service import onnx_quantize
from rag_service.api import create_app
from rag_service.config import EmbeddingSettings, Settings, resolve_embedding_model
from rag_service.embedding import Embedder, SentenceTransformerEmbedder, make_embedder
from rag_service.embedding_onnx import MODEL_ID, OnnxInt8Embedder
from rag_service.errors import EmbeddingError, EmbeddingMismatch
from rag_service.runtime import Runtime
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job

SPEC_PDF = Path(__file__).parent / "data" / "shared-mime-info-spec.pdf"
TEXTS = [
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
    "apt-get install debian-reference-en",
    "Größe, naïve café — 東京 🚀",
]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int8 graph cache of this module: built by its first load, from the torch weights."""
    return tmp_path_factory.mktemp("onnx-cache")


def _onnx(cache: Path, **fields: object) -> EmbeddingSettings:
    return EmbeddingSettings.model_validate(
        {"backend": "onnx-int8", "onnx_cache_dir": str(cache), **fields}
    )


@pytest.fixture(scope="module")
def onnx_embedder(onnx_cache: Path) -> Iterator[OnnxInt8Embedder]:
    """The real int8 model, built into ``onnx_cache`` and loaded once for this module."""
    model = OnnxInt8Embedder(_onnx(onnx_cache))
    yield model
    model.close()


@pytest.fixture(params=["torch", "onnx-int8"])
def backend(request: pytest.FixtureRequest) -> Embedder:
    """Each real backend in turn, for the contract every embedder keeps."""
    name = "embedder" if request.param == "torch" else "onnx_embedder"
    model: Embedder = request.getfixturevalue(name)
    return model


@pytest.fixture(scope="module")
def spec_chunks(embedder: SentenceTransformerEmbedder) -> list[str]:
    """The chunk texts of a real 17-page PDF, cut as the service cuts them."""
    settings = Settings()
    doc = load_document(SPEC_PDF.read_bytes(), SPEC_PDF.name, settings.ingest, "application/pdf")
    chunker = Chunker(
        settings.chunking,
        tokenizer=embedder.tokenizer(),
        count_tokens=embedder.count_tokens,
        max_seq_length=embedder.max_seq_length,
    )
    return [c.text for c in chunker.chunk(doc)]


# -- the contract, over both backends --------------------------------------------


def test_vectors_have_the_model_shape_and_unit_length(backend: Embedder) -> None:
    vectors = backend.embed(TEXTS)

    assert vectors.shape == (len(TEXTS), backend.dim) == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert backend.embed_query(TEXTS[0]).shape == (384,)


def test_same_text_same_vector(backend: Embedder) -> None:
    np.testing.assert_array_equal(backend.embed(TEXTS), backend.embed(TEXTS))


def test_a_text_gets_the_same_vector_alone_as_in_a_batch(backend: Embedder) -> None:
    together = backend.embed(TEXTS)
    alone = np.vstack([backend.embed([t]) for t in TEXTS])

    # Padding to the longest text of the batch moves the last digits, nothing more.
    np.testing.assert_allclose(together, alone, atol=2e-3)
    assert float(np.min(np.sum(together * alone, axis=1))) > 0.999


def test_no_texts_give_no_vectors(backend: Embedder) -> None:
    assert backend.embed([]).shape == (0, backend.dim)


def test_a_text_over_the_model_limit_is_truncated_not_refused(backend: Embedder) -> None:
    head = "Mirrors of the archive are listed in sources.list. "
    long_text = head * 200  # about 2,000 tokens, eight times max_seq_length
    assert backend.count_tokens(long_text) > 4 * backend.max_seq_length

    vector = backend.embed([long_text])[0]

    # Only the first max_seq_length tokens count: 100 repeats already fill them.
    np.testing.assert_allclose(vector, backend.embed([head * 100])[0], atol=2e-3)


def test_backends_count_tokens_and_cut_chunks_identically(
    embedder: SentenceTransformerEmbedder, onnx_embedder: OnnxInt8Embedder, spec_chunks: list[str]
) -> None:
    samples = [*TEXTS, "", "  \n\t ", *spec_chunks]
    assert [onnx_embedder.count_tokens(t) for t in samples] == [
        embedder.count_tokens(t) for t in samples
    ]
    assert onnx_embedder.max_seq_length == embedder.max_seq_length == 256

    settings = Settings()
    doc = load_document(SPEC_PDF.read_bytes(), SPEC_PDF.name, settings.ingest, "application/pdf")
    chunker = Chunker(
        settings.chunking,
        tokenizer=onnx_embedder.tokenizer(),
        count_tokens=onnx_embedder.count_tokens,
        max_seq_length=onnx_embedder.max_seq_length,
    )
    assert [c.text for c in chunker.chunk(doc)] == spec_chunks


# -- agreement with torch ----------------------------------------------------------


def test_int8_vectors_point_where_the_torch_vectors_point(
    embedder: SentenceTransformerEmbedder, onnx_embedder: OnnxInt8Embedder, spec_chunks: list[str]
) -> None:
    assert len(spec_chunks) >= 30
    cosines = np.sum(embedder.embed(spec_chunks) * onnx_embedder.embed(spec_chunks), axis=1)

    assert float(cosines.mean()) >= 0.99
    assert float(cosines.min()) >= 0.95


def test_int8_ranks_chunks_for_a_question_as_torch_does(
    embedder: SentenceTransformerEmbedder, onnx_embedder: OnnxInt8Embedder, spec_chunks: list[str]
) -> None:
    question = "Which file lists the glob patterns that map file names to MIME types?"
    torch_scores = embedder.embed(spec_chunks) @ embedder.embed_query(question)
    onnx_scores = onnx_embedder.embed(spec_chunks) @ onnx_embedder.embed_query(question)

    top_torch = set(np.argsort(-torch_scores)[:5].tolist())
    top_onnx = set(np.argsort(-onnx_scores)[:5].tolist())
    assert len(top_torch & top_onnx) >= 4


# -- settings and the factory -----------------------------------------------------


def test_backend_is_chosen_by_setting_and_recorded_in_the_model_id(
    embedder: SentenceTransformerEmbedder, onnx_embedder: OnnxInt8Embedder
) -> None:
    assert Settings().embedding.backend == "torch"
    assert embedder.model_id == "all-MiniLM-L6-v2"  # existing collections stay valid
    assert onnx_embedder.model_id == MODEL_ID == "all-MiniLM-L6-v2+onnx-int8"


def test_backend_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_EMBEDDING__BACKEND", "onnx-int8")
    monkeypatch.setenv("RAG_EMBEDDING__THREADS", "2")

    embedding = Settings().embedding

    assert (embedding.backend, embedding.threads) == ("onnx-int8", 2)


def test_factory_builds_the_named_backend(onnx_cache: Path) -> None:
    model = make_embedder(_onnx(onnx_cache, threads=1, batch_size=4))
    try:
        assert isinstance(model, OnnxInt8Embedder)
        assert model.batch_size == 4
        assert model.embed(TEXTS).shape == (len(TEXTS), 384)
    finally:
        model.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backend": "openvino"}, "backend"),
        ({"backend": "onnx-int8", "model": "all-mpnet-base-v2"}, "RAG_EMBEDDING__BACKEND=torch"),
        ({"backend": "onnx-int8", "device": "cuda"}, "CPU only"),
        ({"threads": -1}, "threads"),
    ],
)
def test_invalid_backend_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EmbeddingSettings(**fields)


def test_a_missing_runtime_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError

    with pytest.raises(EmbeddingError, match="pip install onnxruntime"):
        make_embedder(EmbeddingSettings(backend="onnx-int8"))


def test_missing_onnx_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # only needed to build the graph

    with pytest.raises(EmbeddingError, match="pip install onnx"):
        OnnxInt8Embedder(_onnx(tmp_path))
    assert not list(tmp_path.glob("*.onnx"))


# -- the int8 graph and its cache ---------------------------------------------------


def test_the_graph_multiplies_in_int8(onnx_embedder: OnnxInt8Embedder, onnx_cache: Path) -> None:
    import onnx

    [path] = onnx_cache.glob("*.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]

    # In layers 1-5, query, key, value, attention output and FFN input are int8
    # MatMulInteger; fp32 stay the two attention-score products (activations
    # times activations), the FFN output, which int8 rounded most, and all of
    # layer 0, whose errors every later layer carries.
    assert ops.count("MatMulInteger") == 5 * 5
    assert ops.count("MatMul") == 5 * 3 + 8
    assert "DequantizeLinear" not in ops  # no int8 weights turned back into fp32


def test_the_graph_is_built_once_then_loaded_from_the_cache(
    onnx_embedder: OnnxInt8Embedder, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [built] = onnx_cache.glob("*.onnx")
    stamp = built.stat().st_mtime_ns

    def no_rebuild(folder: Path, target: Path) -> None:
        raise AssertionError(f"rebuilt {target}")

    monkeypatch.setattr(onnx_quantize, "convert", no_rebuild)
    again = OnnxInt8Embedder(_onnx(onnx_cache))
    try:
        np.testing.assert_array_equal(again.embed(TEXTS), onnx_embedder.embed(TEXTS))
    finally:
        again.close()
    assert list(onnx_cache.glob("*.onnx")) == [built]
    assert built.stat().st_mtime_ns == stamp
    assert json.loads(built.with_suffix(".json").read_text())["recipe_version"] == (
        onnx_quantize.RECIPE_VERSION
    )


def test_new_weights_or_a_new_recipe_build_a_new_file(
    onnx_embedder: OnnxInt8Embedder, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(resolve_embedding_model("all-MiniLM-L6-v2"))
    [built] = onnx_cache.glob("*.onnx")
    assert onnx_quantize.cached_path(folder, onnx_cache) == built
    assert onnx_quantize.source_digest(folder)[:16] in built.name

    converted: list[Path] = []

    def fake_convert(source: Path, target: Path) -> None:
        converted.append(target)
        target.write_bytes(built.read_bytes())

    monkeypatch.setattr(onnx_quantize, "convert", fake_convert)
    monkeypatch.setattr(onnx_quantize, "RECIPE_VERSION", onnx_quantize.RECIPE_VERSION + 1)
    rebuilt = onnx_quantize.int8_model(folder, onnx_cache)
    assert onnx_quantize.int8_model(folder, onnx_cache) == rebuilt  # and only once

    assert converted == [rebuilt] and rebuilt != built and rebuilt.is_file()
    other = onnx_cache / "other-weights"
    other.mkdir()
    (other / onnx_quantize.WEIGHTS_FILE).write_bytes(b"other weights")
    assert onnx_quantize.cached_path(other, onnx_cache) not in (built, rebuilt)


def test_concurrent_first_loads_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(resolve_embedding_model("all-MiniLM-L6-v2"))
    converted: list[Path] = []

    def slow_convert(source: Path, target: Path) -> None:
        converted.append(target)
        time.sleep(0.2)  # long enough for every other thread to reach the lock
        target.write_bytes(b"graph")

    monkeypatch.setattr(onnx_quantize, "convert", slow_convert)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: onnx_quantize.int8_model(folder, tmp_path), range(4)))

    assert len(converted) == 1 and len(set(paths)) == 1 and paths[0].read_bytes() == b"graph"


def test_a_failed_build_leaves_nothing_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_quantize(fp32: Path, out: Path) -> None:
        assert fp32.stat().st_size > 1_000_000  # the real fp32 export ran
        out.write_bytes(b"half a graph")
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_quantize, "quantize", broken_quantize)
    with pytest.raises(EmbeddingError, match=r"cannot build the int8 embedding model.*disk full"):
        OnnxInt8Embedder(_onnx(tmp_path))

    left = sorted(p.name for p in tmp_path.iterdir())
    assert all(name.endswith(".lock") for name in left), left  # no graph, no temp files


# -- through the service ------------------------------------------------------------

PAGES = [
    "The museum opens at nine o'clock on weekdays.",
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
]


def _settings(data: Path, onnx_cache: Path) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": data,
            "ingest": {"worker_threads": 1, "poll_interval_s": 0.05},
            "embedding": {"backend": "onnx-int8", "onnx_cache_dir": str(onnx_cache)},
        }
    )


def _ingest(client: TestClient, collection: str) -> None:
    response = client.post(
        f"/v1/collections/{collection}/documents",
        files=[("files", ("guide.pdf", make_pdf(PAGES)))],
    )
    assert response.status_code == 202, response.text
    assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"


def test_ingest_and_retrieve_through_the_app_with_onnx_int8(
    tmp_path: Path, onnx_cache: Path
) -> None:
    settings = _settings(tmp_path / "data", onnx_cache)
    with TestClient(create_app(settings, chat_model=ScriptedChatModel())) as client:
        _ingest(client, "docs")

        response = client.post(
            "/v1/retrieve",
            json={
                "collection": "docs",
                "query": "What does an adult ticket cost?",
                "mode": "dense",
            },
        )
        collection = client.get("/v1/collections/docs").json()

    assert response.status_code == 200, response.text
    sources = response.json()["results"]
    assert "twelve euros" in sources[0]["text"] and sources[0]["page"] == 2
    assert collection["embed_model"] == "all-MiniLM-L6-v2+onnx-int8"


def _refusals(client: TestClient, collection: str) -> list[tuple[str, int, dict[str, str]]]:
    """Every path that would search or fill ``collection`` with this service's vectors."""
    text = "What does an adult ticket cost?"
    question = {"collection": collection, "question": text}
    search = {"collection": collection, "query": text}
    calls = [
        ("retrieve", client.post("/v1/retrieve", json={**search, "mode": "dense"})),
        ("hybrid", client.post("/v1/retrieve", json={**search, "mode": "hybrid"})),
        ("query", client.post("/v1/query", json=question)),
        ("stream", client.post("/v1/query", json={**question, "stream": True})),
        (
            "chat",
            client.post(
                "/v1/chat/completions",
                json={
                    "model": f"rag:{collection}",
                    "messages": [{"role": "user", "content": text}],
                },
            ),
        ),
        (
            "upload",
            client.post(
                f"/v1/collections/{collection}/documents",
                files=[("files", ("more.pdf", make_pdf(["Another page."])))],
            ),
        ),
        (
            "embeddings",
            client.post("/v1/embeddings", json={"model": collection, "input": ["ticket"]}),
        ),
    ]
    return [(name, r.status_code, r.json().get("error", {})) for name, r in calls]


@pytest.mark.parametrize(("first", "then"), [("torch", "onnx-int8"), ("onnx-int8", "torch")])
def test_a_collection_refuses_the_other_backend_on_every_path(
    tmp_path: Path,
    embedder: SentenceTransformerEmbedder,
    onnx_embedder: OnnxInt8Embedder,
    first: str,
    then: str,
) -> None:
    models: dict[str, Embedder] = {"torch": embedder, "onnx-int8": onnx_embedder}
    settings = _settings(tmp_path / "data", tmp_path / "unused-cache")
    with TestClient(
        create_app(settings, embedder=models[first], chat_model=ScriptedChatModel())
    ) as client:
        _ingest(client, "docs")

    with TestClient(
        create_app(settings, embedder=models[then], chat_model=ScriptedChatModel())
    ) as client:
        refusals = _refusals(client, "docs")
        listed = client.get("/v1/collections/docs").json()

    for name, status, error in refusals:
        assert status == 409, (name, status, error)
        assert error["code"] == "embedding_mismatch", name
        assert models[first].model_id in error["message"], name
        assert models[then].model_id in error["message"], name
    assert listed["embed_model"] == models[first].model_id
    assert listed["document_count"] == 1  # the refused upload left nothing behind


def test_the_library_refuses_the_other_backend_too(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, onnx_embedder: OnnxInt8Embedder
) -> None:
    settings = _settings(tmp_path / "data", tmp_path / "unused-cache")
    with Runtime.open(settings, embedder=onnx_embedder, workers=1) as rag:
        receipt = rag.documents.add_text("docs", " ".join(PAGES), source="guide.txt")
        assert rag.wait_for_job(receipt.job_id).status == "succeeded"

    with Runtime.open(settings, embedder=embedder) as rag:
        with pytest.raises(EmbeddingMismatch) as refused_query:
            rag.query.retrieve("docs", "What does an adult ticket cost?")
        with pytest.raises(EmbeddingMismatch) as refused_upload:
            rag.documents.add_text("docs", "Another page.", source="more.txt")

    for refused in (refused_query, refused_upload):
        message = str(refused.value)
        assert "all-MiniLM-L6-v2+onnx-int8" in message
        assert re.search(r"runs all-MiniLM-L6-v2(?!\+)", message), message
