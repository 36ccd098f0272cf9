"""Decide what kind of document an upload is, trusting its bytes before its name.

Uploads are often mislabelled: a PDF saved as ``.txt``, a Word file renamed
``.md``, a browser that sends ``application/octet-stream`` for everything.
So the content is sniffed first (the ``%PDF-`` header, signatures of common
binary formats, the share of control bytes), then the file extension is
used, then the declared content type, and last a look at the text itself.
"""

from __future__ import annotations

from pathlib import PurePath

from ingest.loaders.text import unicode_encoding
from rag_service.errors import CorruptDocument, EmptyDocument, UnsupportedDocument

SUPPORTED_TYPES: dict[str, str] = {
    "pdf": "PDF with a text layer (.pdf)",
    "text": "plain text in any common encoding (.txt, .text, .rst, .csv, .log and similar)",
    "markdown": "Markdown (.md, .markdown)",
    "html": "HTML pages (.html, .htm)",
}

CONTENT_TYPES: dict[str, str] = {
    "pdf": "application/pdf",
    "text": "text/plain",
    "markdown": "text/markdown",
    "html": "text/html",
}

PDF_MAGIC = b"%PDF-"
# The PDF reference lets the header sit anywhere in the first 1024 bytes.
_PDF_HEADER_WINDOW = 1024

_EXTENSIONS: dict[str, str] = {
    ".pdf": "pdf",
    ".md": "markdown",
    ".markdown": "markdown",
    ".mkd": "markdown",
    ".mdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    **dict.fromkeys(
        (
            ".txt", ".text", ".rst", ".csv", ".tsv", ".log", ".json", ".jsonl", ".ndjson",
            ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".tex", ".adoc", ".asciidoc",
            ".org", ".srt", ".vtt",
        ),
        "text",
    ),
}  # fmt: skip

_DECLARED_TYPES: dict[str, str] = {
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/html": "html",
    "application/xhtml+xml": "html",
}

# Signatures of formats people upload by mistake, so the error can say what
# the file is instead of just "binary".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive (DOCX, XLSX, PPTX, ODT and EPUB files are ZIP archives)"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Microsoft Office file (DOC, XLS or PPT)"),
    (b"{\\rtf", "an RTF document"),
    (b"%!PS", "a PostScript file"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x7fELF", "an executable program"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"OggS", "an Ogg media file"),
    (b"fLaC", "a FLAC audio file"),
)

_SNIFF_BYTES = 8192
# Bytes that text files contain: printable ASCII, tab, newline, CR, form
# feed, ESC (ANSI colours in logs) and every high byte (UTF-8 or legacy).
_TEXT_BYTES = bytes([9, 10, 12, 13, 27, *range(32, 127), *range(128, 256)])
# Share of control bytes above which a sample is binary whatever else holds,
# and the lower share that is enough when it is not UTF-8 either.
_BINARY_SHARE = 0.10
_BINARY_SHARE_NOT_UTF8 = 0.02


def supported_summary() -> str:
    """One line naming every supported type, for error messages."""
    return "supported types: " + "; ".join(SUPPORTED_TYPES.values())


def _signature(data: bytes) -> str | None:
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return what
    if data[:4] == b"RIFF" and data[8:12] in (b"WEBP", b"WAVE", b"AVI "):
        return "a RIFF media file (WebP, WAV or AVI)"
    if data[4:8] == b"ftyp":
        return "an MP4, MOV or HEIC media file"
    return None


def _valid_utf8_sample(sample: bytes, truncated: bool) -> bool:
    """Whether a sample is UTF-8, forgiving a character cut at its end."""
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        return truncated and exc.start >= len(sample) - 3 and exc.reason == "unexpected end of data"
    return True


def looks_binary(data: bytes) -> bool:
    """Whether the bytes are not text in any encoding a loader can read.

    A few stray NULs or control bytes do not make a file binary (the text
    loader strips them); a large share of them does.
    """
    if unicode_encoding(data) is not None:
        return False
    sample = data[:_SNIFF_BYTES]
    if not sample:
        return False
    share = len(sample.translate(None, _TEXT_BYTES)) / len(sample)
    if share > _BINARY_SHARE:
        return True
    return share > _BINARY_SHARE_NOT_UTF8 and not _valid_utf8_sample(
        sample, truncated=len(data) > len(sample)
    )


def _looks_like_html(data: bytes) -> bool:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html"))


def detect_kind(data: bytes, filename: str, declared_content_type: str | None = None) -> str:
    """Which loader reads this upload: ``"pdf"``, ``"text"``, ``"markdown"`` or ``"html"``.

    Raises ``EmptyDocument`` for an empty upload, ``CorruptDocument`` for a
    file that claims to be a PDF but is not, and ``UnsupportedDocument`` for
    binary data of any other kind.
    """
    name = PurePath(filename).name or "the upload"
    if not data.strip(b" \t\r\n\f\x00"):
        raise EmptyDocument(f"{name} is empty")
    if PDF_MAGIC in data[:_PDF_HEADER_WINDOW]:
        return "pdf"

    extension = PurePath(filename).suffix.lower()
    declared = (declared_content_type or "").split(";")[0].strip().lower()
    by_extension = _EXTENSIONS.get(extension)
    by_declared = _DECLARED_TYPES.get(declared)
    what = _signature(data)

    if by_extension == "pdf" or (by_extension is None and by_declared == "pdf"):
        seen = f"it looks like {what}" if what else "it has no %PDF- header"
        raise CorruptDocument(f"not a PDF: {name} is named or sent as a PDF, but {seen}")
    if what is not None:
        raise UnsupportedDocument(f"{name} looks like {what}; {supported_summary()}")
    if looks_binary(data):
        raise UnsupportedDocument(
            f"{name} is binary data, not a document this service reads; {supported_summary()}"
        )
    if by_extension == "markdown" and _looks_like_html(data):
        return "html"  # a saved web page renamed .md: its tags are not Markdown text
    if by_extension is not None:
        return by_extension
    if by_declared is not None:
        return by_declared
    if declared.startswith("text/"):
        return "text"
    return "html" if _looks_like_html(data) else "text"
