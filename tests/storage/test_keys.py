"""API keys in the catalog, and `rag keys` on the command line."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rag_service.cli import app
from rag_service.errors import InvalidRequest
from rag_service.storage.catalog import Catalog
from rag_service.storage.keys import KeyNotFound, KeyStore


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(Catalog(tmp_path / "catalog.sqlite3"))


def test_a_created_key_verifies_and_only_its_hash_is_stored(
    store: KeyStore, tmp_path: Path
) -> None:
    key, secret = store.create("ci", "write", ["docs", "wiki"])
    assert secret.startswith(f"rag_{key.id}_")
    found = store.verify(secret)
    assert found is not None and found.id == key.id
    assert found.scope == "write" and found.collections == ("docs", "wiki")
    raw = sqlite3.connect(tmp_path / "catalog.sqlite3").execute("SELECT * FROM api_keys").fetchall()
    assert secret.split("_", 2)[2] not in repr(raw)
    assert store.list()[0].last_used_at is not None


def test_wrong_unknown_malformed_and_revoked_keys_do_not_verify(store: KeyStore) -> None:
    key, secret = store.create("", "read", ["docs"])
    assert store.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.verify("rag_000000000000_" + "x" * 43) is None
    assert store.verify("not a key") is None
    assert store.verify("") is None
    store.revoke(key.id)
    assert store.verify(secret) is None
    assert store.list()[0].revoked_at is not None
    with pytest.raises(KeyNotFound):
        store.revoke("nope")


def test_scopes_nest_and_collections_limit(store: KeyStore) -> None:
    reader, _ = store.create("r", "read", ["docs"])
    admin, _ = store.create("a", "admin", ["*"])
    assert reader.allows_scope("read") and not reader.allows_scope("write")
    assert admin.allows_scope("write") and admin.allows_scope("read")
    assert reader.allows_collection("docs") and not reader.allows_collection("wiki")
    assert admin.allows_collection("anything")


def test_bad_key_requests_are_refused(store: KeyStore) -> None:
    with pytest.raises(InvalidRequest, match="scope"):
        store.create("x", "owner", ["docs"])
    with pytest.raises(InvalidRequest, match="collection"):
        store.create("x", "read", [" ", ""])
    with pytest.raises(InvalidRequest):
        store.create("x", "read", ["../etc"])


def test_cli_creates_lists_and_revokes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "--collections", "docs,wiki", "--scope", "write"])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("rag_")
    listed = runner.invoke(app, ["keys", "list", "--json"])
    keys = json.loads(listed.stdout)
    assert [(k["scope"], k["collections"]) for k in keys] == [("write", ["docs", "wiki"])]
    assert secret not in listed.stdout
    revoked = runner.invoke(app, ["keys", "revoke", keys[0]["id"]])
    assert revoked.exit_code == 0
    assert "revoked" in runner.invoke(app, ["keys", "list"]).stdout
    bad = runner.invoke(app, ["keys", "create", "--collections", "docs", "--scope", "root"])
    assert bad.exit_code == 1 and "scope" in bad.output
    missing = runner.invoke(app, ["keys", "revoke", "nope"])
    assert missing.exit_code == 1 and "rag keys list" in missing.output
