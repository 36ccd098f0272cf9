"""API keys: created once, shown once, kept as a hash, checked in constant time.

A key reads ``rag_<id>_<secret>``: the id finds the row, the secret's SHA-256
is compared with ``hmac.compare_digest``.  Scopes nest: ``admin`` can do what
``write`` can, ``write`` what ``read`` can.  A key reaches only the
collections it lists (``*``: all).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

from rag_service.errors import InvalidRequest, NotFound
from rag_service.services.validation import collection_name
from rag_service.storage.catalog import Catalog

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)
ALL_COLLECTIONS = "*"

_KEY = re.compile(r"^rag_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
#: Compared against when the id is unknown, so a miss costs what a hit does.
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
#: ``last_used_at`` is written at most this often per key.
_TOUCH_EVERY_S = 60.0


class KeyNotFound(NotFound):
    """No API key has the given id."""

    code = "key_not_found"


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: everything but the secret."""

    id: str
    name: str
    scope: Scope
    collections: tuple[str, ...]
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    def allows_scope(self, needed: Scope) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)

    def allows_collection(self, collection: str) -> bool:
        return ALL_COLLECTIONS in self.collections or collection in self.collections


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        scope=row["scope"],
        collections=tuple(json.loads(row["collections"])),
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


class KeyStore:
    """The catalog's API keys."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def create(self, name: str, scope: str, collections: Sequence[str]) -> tuple[ApiKey, str]:
        """A new key and its full secret string, which is not stored and cannot be shown again."""
        if scope not in SCOPES:
            raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
        wanted = tuple(dict.fromkeys(c.strip() for c in collections if c.strip()))
        if not wanted:
            raise InvalidRequest("a key needs at least one collection, or * for all")
        for c in wanted:
            if c != ALL_COLLECTIONS:
                collection_name(c)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self.catalog.write() as conn:
            conn.execute(
                "INSERT INTO api_keys(id, name, secret_hash, scope, collections, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, name.strip() or key_id, _hash(secret), scope, json.dumps(wanted), now),
            )
        key = ApiKey(key_id, name.strip() or key_id, cast(Scope, scope), wanted, now, None, None)
        return key, f"rag_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        rows = self.catalog.read().execute("SELECT * FROM api_keys ORDER BY created_at, id")
        return [_row(r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Stop a key from working at once; revoking twice is harmless."""
        with self.catalog.write() as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFound(f"no API key with id {key_id!r}; see `rag keys list`")
        return _row(row)

    def verify(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` stands for, or None (unknown, wrong or revoked)."""
        match = _KEY.match(presented.strip())
        key_id, secret = match.groups() if match else ("", presented)
        row = None
        if key_id:
            row = (
                self.catalog.read()
                .execute("SELECT * FROM api_keys WHERE id = ?", (key_id,))
                .fetchone()
            )
        expected = row["secret_hash"] if row is not None else _DUMMY_HASH
        if not hmac.compare_digest(_hash(secret), expected) or row is None:
            return None
        key = _row(row)
        if key.revoked_at is not None:
            return None
        now = time.time()
        if key.last_used_at is None or now - key.last_used_at > _TOUCH_EVERY_S:
            with self.catalog.write() as conn:
                conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key.id))
        return key
