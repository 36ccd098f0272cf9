"""Document loaders: uploaded bytes in, text with its structure out.

``load_document`` is the one entry point: it decides what the upload is
(``detect_kind``), hands it to the loader for that kind and enforces the
size limits.  Every failure is a ``DocumentError`` from
``rag_service.errors`` with a message meant for the person who uploaded the
file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath

from ingest.loaders.base import SECTION_SEPARATOR, LoadedDocument, Section, build_sections
from ingest.loaders.detect import CONTENT_TYPES, SUPPORTED_TYPES, detect_kind
from ingest.loaders.html import load_html
from ingest.loaders.markdown import load_markdown
from ingest.loaders.pdf import load_pdf
from ingest.loaders.text import load_text
from rag_service.config import IngestSettings
from rag_service.errors import DocumentTooLarge

__all__ = [
    "CONTENT_TYPES",
    "SECTION_SEPARATOR",
    "SUPPORTED_TYPES",
    "LoadedDocument",
    "Section",
    "build_sections",
    "detect_kind",
    "load_document",
]

Loader = Callable[[bytes, str, IngestSettings, str | None], LoadedDocument]

_LOADERS: dict[str, Loader] = {
    "pdf": load_pdf,
    "text": load_text,
    "markdown": load_markdown,
    "html": load_html,
}


def load_document(
    data: bytes,
    filename: str,
    settings: IngestSettings,
    declared_content_type: str | None = None,
) -> LoadedDocument:
    """Turn an uploaded file into sections of text, or raise a ``DocumentError``.

    ``filename`` and ``declared_content_type`` are hints: the bytes decide
    first (see ``detect_kind``).  The result's ``content_type`` is the MIME
    type of the kind actually read.
    """
    name = PurePath(filename).name or "the upload"
    kind = detect_kind(data, filename, declared_content_type)
    document = _LOADERS[kind](data, name, settings, declared_content_type)
    if document.char_count > settings.max_chars:
        raise DocumentTooLarge(
            f"{name} has {document.char_count:,} characters of text; "
            f"the limit is {settings.max_chars:,}"
        )
    return document
