"""Hybrid retrieval and filters over HTTP, on the real app and the real embedder.

A small printer-support library is ingested once for the read-only tests:
text, Markdown and HTML files with metadata, and a four-page PDF.  Tests
that delete or replace documents use their own data directory.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import IngestSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job

MODES = ("dense", "keyword", "hybrid")

#: (source, text, metadata).  Every text says "printer", so a keyword search
#: for it reaches every chunk; "error" is common, "E1234" appears once, in a
#: text about a fan that an embedding does not connect with an error code.
TEXTS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "jam.txt",
        "If the printer shows a paper jam error, open the rear tray and remove the stuck sheet.",
        {"team": "support", "tier": 1},
    ),
    (
        "toner.txt",
        "The printer reports a low toner error when the cartridge is nearly empty.",
        {"team": "support", "tier": 2},
    ),
    (
        "messages.txt",
        "Error messages on the printer display explain most faults and how to clear them.",
        {"team": "ops"},
    ),
    (
        "power.txt",
        "If the printer will not start, check the power cable and the fuse for an error.",
        {"team": "ops", "urgent": True},
    ),
    (
        "firmware.txt",
        "Printer errors after a firmware update are usually fixed by restarting the device.",
        {"team": "dev", "tier": "1"},
    ),
    (
        "fan.txt",
        "Cooling: keep the vent at the back of the printer free of dust so the fan can spin. "
        "A blocked fan shows E1234.",
        {"team": "dev", "urgent": False},
    ),
    (
        "wifi.md",
        "# Wi-Fi\n\nThe printer loses its network when the router changes channel.\n",
        {"team": None},
    ),
    (
        "light.html",
        "<html><head><title>Lights</title></head><body><p>A blinking orange light means "
        "the printer needs attention; read the display.</p></body></html>",
        {},
    ),
]

PDF_PAGES = [
    "Unpacking the printer: remove the tape and the cardboard from the paper tray.",
    "Loading paper: the printer takes A4 and Letter sheets in the lower tray.",
    "Cleaning: wipe the printer rollers with a damp cloth once a month.",
    "Warranty: the printer is covered for two years from the date of purchase.",
]

E1234_QUESTION = "What does printer error E1234 mean?"


def _ingest_library(client: TestClient) -> dict[str, str]:
    """Upload the library; returns source -> document id."""
    documents = [{"text": text, "source": source, "metadata": meta} for source, text, meta in TEXTS]
    first = client.post("/v1/collections/lib/documents", json={"documents": documents})
    assert first.status_code == 202, first.text
    second = client.post(
        "/v1/collections/lib/documents",
        files=[("files", ("manual.pdf", make_pdf(PDF_PAGES)))],
        data={"metadata": '{"team": "docs"}'},
    )
    assert second.status_code == 202, second.text
    for response in (first, second):
        assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"
    docs = first.json()["documents"] + second.json()["documents"]
    return {d["source"]: d["id"] for d in docs}


@pytest.fixture(scope="module")
def library(
    tmp_path_factory: pytest.TempPathFactory, embedder: SentenceTransformerEmbedder
) -> Iterator[tuple[TestClient, dict[str, str], ScriptedChatModel]]:
    """One app with the library ingested, shared by the read-only tests."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("hybrid") / "data",
        ingest=IngestSettings(worker_threads=1, poll_interval_s=0.05),
    )
    model = ScriptedChatModel()
    with TestClient(create_app(settings, embedder=embedder, chat_model=model)) as client:
        yield client, _ingest_library(client), model


def retrieve(client: TestClient, query: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/retrieve", json={"collection": "lib", "query": query, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def sources(body: dict[str, Any]) -> list[str]:
    return [r["source"] for r in body["results"]]


# -- modes -------------------------------------------------------------------------------


def test_keyword_finds_a_rare_code_that_dense_misses_and_hybrid_keeps_it(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
) -> None:
    client, _, _ = library

    dense = retrieve(client, E1234_QUESTION, top_k=3, mode="dense")
    keyword = retrieve(client, E1234_QUESTION, top_k=3, mode="keyword")
    hybrid = retrieve(client, E1234_QUESTION, top_k=3, mode="hybrid")

    assert "fan.txt" not in sources(dense)
    assert sources(keyword)[0] == "fan.txt"
    assert "fan.txt" in sources(hybrid)
    assert [dense["mode"], keyword["mode"], hybrid["mode"]] == list(MODES)


def test_scores_say_why_a_chunk_ranked(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
) -> None:
    client, _, _ = library

    dense = retrieve(client, E1234_QUESTION, top_k=5, mode="dense")["results"]
    keyword = retrieve(client, E1234_QUESTION, top_k=5, mode="keyword")["results"]
    hybrid = retrieve(client, E1234_QUESTION, top_k=5, mode="hybrid")["results"]

    for r in dense:
        assert r["score"] == r["dense_score"] and r["keyword_score"] is None
        assert -1.0 <= r["score"] <= 1.0
    assert [r["dense_rank"] for r in dense] == [1, 2, 3, 4, 5]
    for r in keyword:
        assert r["score"] == r["keyword_score"] > 0 and r["dense_score"] is None
    assert [r["score"] for r in keyword] == sorted((r["score"] for r in keyword), reverse=True)
    for r in hybrid:
        expected = sum(1 / (60 + rank) for rank in (r["dense_rank"], r["keyword_rank"]) if rank)
        assert r["score"] == pytest.approx(expected, abs=1e-6)
        assert r["dense_score"] is not None  # filled in even outside the dense pool
    fan = next(r for r in hybrid if r["source"] == "fan.txt")
    assert fan["keyword_rank"] == 1 and fan["keyword_score"] > 0


def test_default_mode_is_hybrid_and_old_requests_still_work(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
) -> None:
    client, _, _ = library
    body = retrieve(client, "paper jam")
    assert body["mode"] == "hybrid"
    assert sources(body)[0] == "jam.txt"
    assert {"embed_ms", "search_ms", "total_ms"} <= set(body["timings"])
    first = body["results"][0]
    assert {"n", "chunk_id", "document_id", "source", "page", "text", "score"} <= set(first)


def test_keyword_only_punctuation_gives_no_hits_and_hybrid_falls_back_to_dense(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
) -> None:
    client, _, _ = library
    assert retrieve(client, "?!? ...", mode="keyword")["results"] == []
    hybrid = retrieve(client, "?!? ...", mode="hybrid", top_k=3)["results"]
    assert len(hybrid) == 3 and all(r["keyword_rank"] is None for r in hybrid)


NASTY = [
    '"unbalanced quote printer',
    "NEAR(printer jam)",
    "printer NEAR/2 jam",
    "printer AND",
    "OR",
    "NOT printer",
    "text:printer",
    "chunks_fts:jam",
    "print*",
    "^printer",
    "(printer))",
    "-printer +jam",
    '"" "" ""',
    "E1234:\"fan\" 'x'",
    "café naïve ÜNÏCÖDÉ",
    "プリンターの紙詰まり",
    "🖨️ printer",
    "'; DROP TABLE chunks; --",
    "\u0000printer",
]


@pytest.mark.parametrize("query", NASTY)
def test_nasty_queries_never_raise(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel], query: str
) -> None:
    client, _, _ = library
    for mode in ("keyword", "hybrid"):
        body = retrieve(client, query, mode=mode, top_k=3)
        if mode == "keyword" and ("printer" in query or "jam" in query):
            assert body["results"], "an indexed word in the query is still found"


# -- filters -------------------------------------------------------------------------------

ALL_TEXT = {"jam.txt", "toner.txt", "messages.txt", "power.txt", "firmware.txt", "fan.txt"}

#: (case id, filters with "@name" standing for that document's id, expected sources)
FILTERS: list[tuple[str, dict[str, Any], set[str]]] = [
    ("document_ids", {"document_ids": ["@toner.txt", "@wifi.md"]}, {"toner.txt", "wifi.md"}),
    ("sources", {"sources": ["jam.txt", "manual.pdf"]}, {"jam.txt", "manual.pdf"}),
    ("file_types pdf", {"file_types": ["pdf"]}, {"manual.pdf"}),
    ("file_types md", {"file_types": [".md"]}, {"wifi.md"}),
    ("file_types mime", {"file_types": ["text/html"]}, {"light.html"}),
    ("file_types txt", {"file_types": ["txt"]}, ALL_TEXT),
    ("page range", {"page_from": 2, "page_to": 3}, {"manual.pdf"}),
    ("metadata str", {"metadata": {"team": "ops"}}, {"messages.txt", "power.txt"}),
    ("metadata int", {"metadata": {"tier": 1}}, {"jam.txt"}),
    ("metadata str digit", {"metadata": {"tier": "1"}}, {"firmware.txt"}),
    ("metadata bool", {"metadata": {"urgent": False}}, {"fan.txt"}),
    ("metadata null", {"metadata": {"team": None}}, {"wifi.md"}),
    (
        "metadata any of",
        {"metadata": {"team": ["dev", "docs"]}},
        {"firmware.txt", "fan.txt", "manual.pdf"},
    ),
    (
        "combined",
        {"file_types": ["txt"], "metadata": {"team": "support"}},
        {"jam.txt", "toner.txt"},
    ),
]


def resolve(filters: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    if "document_ids" in filters:
        return {**filters, "document_ids": [ids[d[1:]] for d in filters["document_ids"]]}
    return filters


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("case", "filters", "expected"), FILTERS, ids=[f[0] for f in FILTERS])
def test_every_filter_kind_in_every_mode(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
    mode: str,
    case: str,
    filters: dict[str, Any],
    expected: set[str],
) -> None:
    client, ids, _ = library

    body = retrieve(client, "printer", mode=mode, top_k=20, filters=resolve(filters, ids))

    assert set(sources(body)) == expected
    if case == "page range":
        assert sorted(r["page"] for r in body["results"]) == [2, 3]


@pytest.mark.parametrize("mode", MODES)
def test_filters_apply_before_top_k(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel], mode: str
) -> None:
    client, _, _ = library
    unfiltered = sources(retrieve(client, "printer paper jam rear tray", mode=mode, top_k=20))
    assert unfiltered.index("light.html") > 2  # ranked low without the filter

    body = retrieve(
        client,
        "printer paper jam rear tray",
        mode=mode,
        top_k=1,
        filters={"file_types": ["html"]},
    )

    assert sources(body) == ["light.html"]


def test_query_uses_mode_and_filters_for_the_sources(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
) -> None:
    client, _, model = library
    response = client.post(
        "/v1/query",
        json={
            "collection": "lib",
            "question": "How should I care for the rollers?",
            "mode": "keyword",
            "filters": {"sources": ["manual.pdf"], "page_from": 3},
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "keyword"
    assert {(s["source"], s["page"]) for s in body["sources"]} <= {
        ("manual.pdf", 3),
        ("manual.pdf", 4),
    }
    assert body["sources"][0]["page"] == 3 and body["sources"][0]["keyword_score"] > 0
    assert "manual.pdf, page 3" in model.prompts[-1][1].content


def test_query_with_no_matching_chunk_says_so_without_calling_the_model(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
) -> None:
    client, _, model = library
    calls = len(model.prompts)
    body = client.post(
        "/v1/query",
        json={"collection": "lib", "question": "printer?", "filters": {"sources": ["nope"]}},
    ).json()
    assert body["sources"] == [] and "matches the filters" in body["answer"]
    body = client.post(
        "/v1/query", json={"collection": "lib", "question": "zeppelin", "mode": "keyword"}
    ).json()
    assert body["sources"] == [] and "question's words" in body["answer"]
    assert len(model.prompts) == calls


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"filters": {"team": "ops"}}, "filters.team"),
        ({"filters": {"metadata": {"team": {"nested": 1}}}}, "filters.metadata"),
        ({"filters": {"document_ids": []}}, "filters.document_ids"),
        ({"filters": {"sources": "jam.txt"}}, "filters.sources"),
        ({"filters": {"page_from": 0}}, "filters.page_from"),
        ({"filters": {"page_from": 4, "page_to": 2}}, "page_from (4) is after"),
        ({"mode": "semantic"}, "mode"),
    ],
)
@pytest.mark.parametrize("route", ["/v1/retrieve", "/v1/query"])
def test_bad_filters_and_modes_are_422(
    library: tuple[TestClient, dict[str, str], ScriptedChatModel],
    route: str,
    body: dict[str, Any],
    message: str,
) -> None:
    client, _, _ = library
    text = "query" if route == "/v1/retrieve" else "question"
    response = client.post(route, json={"collection": "lib", text: "printer", **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and message in error["message"]


# -- consistency through deletes and replacements ----------------------------------------


def test_deleted_and_replaced_documents_never_come_back(client: TestClient) -> None:
    def upload(source: str, text: str) -> str:
        response = client.post(
            "/v1/collections/kb/documents",
            json={"documents": [{"text": text, "source": source}]},
        )
        assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"
        doc_id: str = response.json()["documents"][0]["id"]
        return doc_id

    def hits(query: str, mode: str) -> list[str]:
        body = client.post(
            "/v1/retrieve", json={"collection": "kb", "query": query, "mode": mode}
        ).json()
        return [r["text"] for r in body["results"]]

    gone = upload("old.txt", "The walrus protocol was retired in 2019.")
    upload("guide.txt", "Version one of the guide covers the narwhal setting.")
    upload("other.txt", "Unrelated notes about lunch.")
    assert hits("walrus", "keyword") and hits("narwhal", "keyword")

    assert client.delete(f"/v1/collections/kb/documents/{gone}").status_code == 204
    upload("guide.txt", "Version two of the guide covers the dolphin setting.")

    for mode in ("keyword", "hybrid"):
        texts = hits("walrus narwhal dolphin", mode)
        assert not any("walrus" in t or "narwhal" in t for t in texts)
        assert any("dolphin" in t for t in texts)


def test_fts_index_matches_the_chunks_after_changes(client: TestClient, settings: Settings) -> None:
    response = client.post(
        "/v1/collections/kb/documents",
        json={
            "documents": [
                {"text": f"note {i} about otters", "source": f"{i}.txt"} for i in range(3)
            ]
        },
    )
    wait_for_job(client, response.json()["job_id"])
    client.delete(f"/v1/collections/kb/documents/{response.json()['documents'][0]['id']}")
    client.delete("/v1/collections/kb")

    conn = sqlite3.connect(settings.data_dir / "catalog.sqlite3")
    try:
        conn.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('integrity-check')")
        assert conn.execute("SELECT count(*) FROM chunks_fts").fetchone()[0] == 0
    finally:
        conn.close()
