"""Checks on names and values that every entry point shares."""

from __future__ import annotations

import re
import unicodedata

from rag_service.errors import EmbeddingMismatch, InvalidRequest

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Folder names inside the data directory that a collection may not take.
RESERVED_NAMES = frozenset({"blobs", "tmp", "catalog.sqlite3"})
MAX_SOURCE_CHARS = 255


def collection_name(name: str) -> str:
    """A valid collection name, or ``InvalidRequest`` saying what is allowed."""
    if not COLLECTION_NAME.match(name) or name.lower() in RESERVED_NAMES or ".." in name:
        raise InvalidRequest(
            f"invalid collection name {name[:80]!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (not 'blobs' or 'tmp')"
        )
    return name


def source_name(name: str | None) -> str:
    """The file name a document is listed under, without any directory part.

    Names are never used as paths (blobs are stored by hash), so a name with
    ``../`` is reduced to its last part; control characters are refused.
    """
    if name is None:
        raise InvalidRequest("every file needs a file name")
    if "\x00" in name or any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidRequest("file names may not contain NUL or other control characters")
    base = re.split(r"[\\/]", name)[-1].strip()
    if base in {"", ".", ".."}:
        raise InvalidRequest(f"file name {name[:80]!r} has no usable name part")
    if len(base) > MAX_SOURCE_CHARS:
        raise InvalidRequest(f"file name is longer than {MAX_SOURCE_CHARS} characters")
    return unicodedata.normalize("NFC", base)


def bounded_int(value: int, *, name: str, low: int, high: int, setting: str) -> int:
    """``value`` if within ``[low, high]``, else ``InvalidRequest``."""
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high} ({setting}); got {value}")
    return value


def same_embedder(collection: str, built_with: tuple[str, int], running: tuple[str, int]) -> None:
    """Refuse to mix vectors: ``EmbeddingMismatch`` unless ``(model, dim)`` are equal.

    The model id names the backend too (``all-MiniLM-L6-v2+onnx-int8``), so a
    collection embedded by torch is never searched or extended with ONNX
    vectors, or the other way round.
    """
    if built_with == running:
        return
    raise EmbeddingMismatch(
        f"collection {collection!r} was embedded with {built_with[0]} ({built_with[1]} dims) "
        f"but this process runs {running[0]} ({running[1]} dims); set RAG_EMBEDDING__MODEL "
        "and RAG_EMBEDDING__BACKEND to what built it, or use another collection"
    )
