"""Who is asking: the API key behind a request, and what it may reach.

With ``auth.required`` off (the default, for a service on 127.0.0.1) a
request without a valid key may do anything (OpenAI clients insist on sending
some key, so a placeholder must not fail them); a request that brings a
valid key is held to its scope and collections either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from rag_service.errors import Forbidden, Unauthorized
from rag_service.storage.keys import ApiKey, KeyStore, Scope


@dataclass(frozen=True)
class Principal:
    """The key a request came with; ``key=None`` means keys are off and none was sent."""

    key: ApiKey | None = None

    def require(self, scope: Scope, collection: str | None = None) -> None:
        """``Forbidden`` unless the key's scope and collections cover the request."""
        if self.key is None:
            return
        if not self.key.allows_scope(scope):
            raise Forbidden(f"this API key has scope {self.key.scope!r}; this needs {scope!r}")
        if collection is not None and not self.key.allows_collection(collection):
            raise Forbidden(f"this API key does not reach collection {collection!r}")

    def can_see(self, collection: str) -> bool:
        return self.key is None or self.key.allows_collection(collection)


def presented_key(request: Request) -> str:
    """The key in ``Authorization: Bearer ...`` (or ``X-API-Key``), or ``""``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return request.headers.get("x-api-key", "").strip()


def principal_for(token: str, *, required: bool, keys: KeyStore) -> Principal:
    """Who ``token`` stands for, or ``Unauthorized``."""
    if not token:
        if required:
            raise Unauthorized(
                "this service requires an API key: send `Authorization: Bearer rag_...` "
                "(an operator creates one with `rag keys create`)"
            )
        return Principal()
    key = keys.verify(token)
    if key is not None:
        return Principal(key)
    if required:
        raise Unauthorized("the API key is unknown or revoked")
    # Keys are off: OpenAI clients must send some key, so a placeholder is no error.
    return Principal()
