"""API keys over HTTP: 401 without a key, 403 outside its scope or collections."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import AuthSettings, LimitsSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.storage.catalog import Catalog
from rag_service.storage.keys import KeyStore
from tests.helpers import ScriptedChatModel, wait_for_job

TEXT = {"documents": [{"text": "Tickets cost twelve euros for adults.", "source": "t.txt"}]}


def make_key(settings: Settings, scope: str, collections: list[str]) -> dict[str, str]:
    catalog = Catalog(settings.data_dir / "catalog.sqlite3")
    try:
        _, secret = KeyStore(catalog).create(scope, scope, collections)
    finally:
        catalog.close()
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def locked(settings: Settings) -> Settings:
    return settings.model_copy(update={"auth": AuthSettings(required=True)})


@pytest.fixture
def app_client(
    locked: Settings, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> Iterator[TestClient]:
    with TestClient(create_app(locked, embedder=embedder, chat_model=scripted)) as c:
        yield c


def test_without_a_key_every_v1_route_is_401_but_probes_stay_open(
    app_client: TestClient,
) -> None:
    for method, path in [
        ("GET", "/v1/collections"),
        ("POST", "/v1/query"),
        ("POST", "/v1/retrieve"),
        ("GET", "/v1/models"),
        ("GET", "/v1/jobs/job_x"),
    ]:
        response = app_client.request(method, path, json={})
        assert response.status_code == 401, (path, response.text)
        assert "rag keys create" in response.json()["error"]["message"]
    assert app_client.get("/healthz").status_code == 200
    assert app_client.get("/readyz").status_code in (200, 503)
    # Metrics name the collections: with keys on, they need an admin key.
    assert app_client.get("/metrics").status_code == 401
    bad = app_client.get("/v1/collections", headers={"Authorization": "Bearer rag_nope"})
    assert bad.status_code == 401
    assert "unknown or revoked" in bad.json()["error"]["message"]


def test_scopes_and_collections_are_enforced(app_client: TestClient, locked: Settings) -> None:
    writer = make_key(locked, "write", ["docs"])
    reader = make_key(locked, "read", ["docs"])
    other = make_key(locked, "admin", ["wiki"])

    job = app_client.post("/v1/collections/docs/documents", json=TEXT, headers=writer)
    assert job.status_code == 202, job.text
    assert wait_for_job(app_client, job.json()["job_id"], headers=writer)["status"] == ("succeeded")
    assert (
        app_client.post("/v1/collections/wiki/documents", json=TEXT, headers=other).status_code
        == 202
    )

    # A read key asks and retrieves, but cannot upload or delete.
    asked = app_client.post(
        "/v1/query", json={"collection": "docs", "question": "ticket price?"}, headers=reader
    )
    assert asked.status_code == 200
    refused = app_client.post("/v1/collections/docs/documents", json=TEXT, headers=reader)
    assert refused.status_code == 403 and "scope" in refused.json()["error"]["message"]
    assert app_client.delete("/v1/collections/docs", headers=reader).status_code == 403

    # A key never sees a collection outside its list.
    for response in (
        app_client.post(
            "/v1/retrieve", json={"collection": "docs", "query": "tickets"}, headers=other
        ),
        app_client.post(
            "/v1/query", json={"collection": "docs", "question": "tickets?"}, headers=other
        ),
        app_client.get("/v1/collections/docs/documents", headers=other),
        app_client.post(
            "/v1/chat/completions",
            json={"model": "rag:docs", "messages": [{"role": "user", "content": "tickets?"}]},
            headers=other,
        ),
    ):
        assert response.status_code == 403, response.text
    names = [
        c["name"] for c in app_client.get("/v1/collections", headers=other).json()["collections"]
    ]
    assert names == ["wiki"]
    models = [m["id"] for m in app_client.get("/v1/models", headers=reader).json()["data"]]
    assert models == ["rag:docs"]
    hidden = app_client.get(f"/v1/jobs/{job.json()['job_id']}", headers=other)
    assert hidden.status_code == 404
    assert app_client.get("/metrics", headers=reader).status_code == 403
    assert app_client.get("/metrics", headers=other).status_code == 200


def test_a_revoked_key_stops_working_at_once(app_client: TestClient, locked: Settings) -> None:
    headers = make_key(locked, "read", ["*"])
    assert app_client.get("/v1/collections", headers=headers).status_code == 200
    catalog = Catalog(locked.data_dir / "catalog.sqlite3")
    try:
        store = KeyStore(catalog)
        store.revoke(store.list()[0].id)
    finally:
        catalog.close()
    assert app_client.get("/v1/collections", headers=headers).status_code == 401


def test_keys_off_by_default_a_placeholder_passes_a_real_key_still_binds(
    client: TestClient, settings: Settings
) -> None:
    assert client.get("/v1/collections").status_code == 200
    placeholder = client.get("/v1/collections", headers={"Authorization": "Bearer sk-x"})
    assert placeholder.status_code == 200
    reader = make_key(settings, "read", ["docs"])
    refused = client.post("/v1/collections/docs/documents", json=TEXT, headers=reader)
    assert refused.status_code == 403


def test_rate_limits_follow_the_key_not_the_address(
    locked: Settings, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> None:
    limited = locked.model_copy(update={"limits": LimitsSettings(requests_per_minute=2)})
    one = make_key(limited, "read", ["*"])
    two = make_key(limited, "read", ["*"])
    with TestClient(create_app(limited, embedder=embedder, chat_model=scripted)) as c:
        assert [c.get("/v1/collections", headers=one).status_code for _ in range(3)] == [
            200,
            200,
            429,
        ]
        # Same address, another key: its own budget.
        assert c.get("/v1/collections", headers=two).status_code == 200
