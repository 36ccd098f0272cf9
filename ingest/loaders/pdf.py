"""PDF: one section per page with text, read by pypdfium2 or pypdf.

pypdfium2 (Google's PDFium) is the default: it is an order of magnitude
faster and puts spaces between words where pypdf, on TeX output, often glues
them together.  pypdf is the pure-Python alternative, chosen with
``ingest.pdf_engine``.  Both engines are imported lazily, so the one not in
use costs nothing.

Both report the same errors: a password-protected file is
``EncryptedDocument``, a damaged one ``CorruptDocument``, a scan without a
text layer ``EmptyDocument``; the page limit is checked before any text is
extracted.

Neither engine bounds what a compressed stream inflates to: PDFium inflates
a whole content stream in memory (a 2 MB file whose stream is 2 GB of zeros
costs it 3 GB of RAM, and it aborts the process when an allocation fails).
So the Flate streams are inflated once, in bounded steps and without
keeping the output, to measure them before either engine sees the file.
Other bombs (LZW, or Flate under ASCII85) and pages that keep PDFium busy are
stopped by reading in a child process capped in memory and time
(``ingest.pdf_isolation``, see ``ingest.loaders.isolation``).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ingest.loaders.base import LoadedDocument, build_sections
from rag_service.config import IngestSettings
from rag_service.errors import (
    CorruptDocument,
    DocumentTooLarge,
    EmptyDocument,
    EncryptedDocument,
)

logger = logging.getLogger(__name__)

PDF_CONTENT_TYPE = "application/pdf"

# PDFium is not thread-safe, not even across different documents: every
# call into it must be serialised process-wide.  Ingestion workers may be
# threads, hence one lock for the whole module.
_PDFIUM_LOCK = threading.Lock()

# pypdf reports damaged files through many exception types besides its own;
# these are the ones its parser is known to let escape on malformed input.
_PYPDF_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    AssertionError,
    RecursionError,
    OverflowError,
    struct.error,
    zlib.error,
)

# Control characters carry no text.  PDFium marks a word hyphenated across
# a line break with U+FFFE and has already joined the two halves, so the
# mark is simply dropped ("distri\ufffebution" -> "distribution").
_DROPPED_CHARS = dict.fromkeys(
    [c for c in range(32) if chr(c) not in "\t\n\r\f"] + [0x7F, 0xFFFE, 0xFFFF],
    None,
)


def normalise_page_text(text: str) -> str:
    """Tidy extracted page text: no NULs, ``\\n`` line ends, single spaces.

    Blank lines between paragraphs are kept (at most one), because the
    chunker splits on them.
    """
    text = text.translate(_DROPPED_CHARS)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n")


@dataclass(frozen=True)
class PdfText:
    """What an engine read: the page count, text per page, title, author."""

    pages: int
    page_texts: tuple[str, ...]
    title: str | None
    author: str | None
    unreadable_pages: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict, the form in which it leaves the extraction child."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> PdfText:
        return cls(
            pages=int(value["pages"]),
            page_texts=tuple(str(t) for t in value["page_texts"]),
            title=value["title"],
            author=value["author"],
            unreadable_pages=tuple(int(n) for n in value["unreadable_pages"]),
        )


class _Budget:
    """Counts extracted characters and time so an oversized PDF fails early."""

    def __init__(self, name: str, settings: IngestSettings) -> None:
        self._name = name
        self._max_chars = settings.max_chars
        self._max_seconds = settings.max_seconds_per_document
        self._deadline = time.monotonic() + self._max_seconds
        self._used = 0

    def spend(self, text: str) -> None:
        self._used += len(text)
        if self._used > self._max_chars:
            raise DocumentTooLarge(
                f"{self._name} has more than {self._max_chars:,} characters of text"
            )
        if time.monotonic() > self._deadline:
            raise DocumentTooLarge(
                f"{self._name} took more than {self._max_seconds:g} s to read "
                "(RAG_INGEST__MAX_SECONDS_PER_DOCUMENT); split it into smaller files"
            )


# ``stream`` followed by its end of line opens stream data; ``endstream`` does not.
_STREAM_START = re.compile(rb"(?<!end)stream(?:\r\n|\n|\r)")
# How far before the ``stream`` keyword its dictionary is looked for.
_STREAM_DICT_WINDOW = 4096
# Flate layers measured per stream (``/Filter [/FlateDecode /FlateDecode]`` nests them).
_MAX_FLATE_LAYERS = 4
_INFLATE_STEP = 1 << 20


def _pieces(data: bytes, start: int) -> Iterator[bytes]:
    for offset in range(start, len(data), _INFLATE_STEP):
        yield data[offset : offset + _INFLATE_STEP]


def _inflate(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Inflate a zlib stream piece by piece, never more than one step of output at once."""
    inflater = zlib.decompressobj()
    for piece in pieces:
        while piece and not inflater.eof:
            yield inflater.decompress(piece, _INFLATE_STEP)
            piece = inflater.unconsumed_tail
        if inflater.eof:
            return


def check_inflated_size(data: bytes, name: str, limit: int) -> None:
    """Refuse a PDF whose Flate streams, images aside, inflate to more than ``limit`` bytes.

    Text extraction never decodes images, so they are not counted.  A stream
    that does not inflate is left for the engine to judge.
    """
    total = 0
    position = 0
    while (match := _STREAM_START.search(data, position)) is not None:
        position = match.end()
        head = data[max(0, match.start() - _STREAM_DICT_WINDOW) : match.start()]
        head = head[head.rfind(b"obj") + 1 :]
        layers = min(head.count(b"FlateDecode"), _MAX_FLATE_LAYERS)
        if not layers or b"/Image" in head:
            continue
        output = _pieces(data, position)
        for _ in range(layers):
            output = _inflate(output)
        try:
            for piece in output:
                total += len(piece)
                if total > limit:
                    raise DocumentTooLarge(
                        f"{name} inflates to more than {limit:,} bytes of PDF data "
                        "(a compression bomb, or a PDF too large for "
                        "RAG_INGEST__MAX_INFLATED_BYTES); split it into smaller files"
                    )
        except zlib.error:
            continue


def _check_pages(name: str, pages: int, settings: IngestSettings) -> None:
    if pages > settings.max_pages:
        raise DocumentTooLarge(f"{name} has {pages:,} pages; the limit is {settings.max_pages:,}")


def _encrypted(name: str) -> EncryptedDocument:
    return EncryptedDocument(
        f"{name} is password-protected; remove the password and upload it again"
    )


def _collect(
    name: str,
    pages: int,
    read_page: Callable[[int], str],
    budget: _Budget,
    failures: tuple[type[Exception], ...],
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Text of every page (``""`` if unreadable) and the numbers of unreadable pages.

    One bad page should not cost the rest of the document, so a page the
    engine fails on is logged and skipped.
    """
    texts: list[str] = []
    unreadable: list[int] = []
    for index in range(pages):
        try:
            text = normalise_page_text(read_page(index))
        except failures as exc:
            logger.warning("pdf page unreadable name=%s page=%d error=%s", name, index + 1, exc)
            unreadable.append(index + 1)
            text = ""
        budget.spend(text)
        texts.append(text)
    return tuple(texts), tuple(unreadable)


def _clean_meta(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    value = " ".join(value.replace("\x00", "").split())
    return value or None


def _read_with_pdfium(data: bytes, name: str, settings: IngestSettings) -> PdfText:
    import pypdfium2
    import pypdfium2.raw as pdfium_c

    with _PDFIUM_LOCK:
        try:
            pdf = pypdfium2.PdfDocument(data)
        except pypdfium2.PdfiumError as exc:
            if exc.err_code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
                raise _encrypted(name) from exc
            if exc.err_code == pdfium_c.FPDF_ERR_SUCCESS:
                # PDFium opened the file but found no page in it.
                raise EmptyDocument(f"{name} is a PDF without pages") from exc
            raise CorruptDocument(f"{name} is damaged and cannot be read as a PDF") from exc
        try:
            pages = len(pdf)
            _check_pages(name, pages, settings)

            def read_page(index: int) -> str:
                page = pdf[index]
                try:
                    textpage = page.get_textpage()
                    try:
                        return str(textpage.get_text_range())
                    finally:
                        textpage.close()
                finally:
                    page.close()

            budget = _Budget(name, settings)
            texts, unreadable = _collect(name, pages, read_page, budget, (pypdfium2.PdfiumError,))
            return PdfText(
                pages=pages,
                page_texts=texts,
                title=_clean_meta(pdf.get_metadata_value("Title")),
                author=_clean_meta(pdf.get_metadata_value("Author")),
                unreadable_pages=unreadable,
            )
        finally:
            pdf.close()


def _read_with_pypdf(data: bytes, name: str, settings: IngestSettings) -> PdfText:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

    failures: tuple[type[Exception], ...] = (PyPdfError, *_PYPDF_PARSE_ERRORS)
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        # Many PDFs are encrypted with an empty user password (an owner
        # password only restricts printing or copying); they open as is.
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise _encrypted(name)
        pages = len(reader.pages)
    except (FileNotDecryptedError, DependencyError) as exc:
        # DependencyError: AES encryption needs the `cryptography` package.
        raise EncryptedDocument(
            f"{name} is encrypted in a way this server cannot open; "
            "remove the password or encryption and upload it again"
        ) from exc
    except failures as exc:
        raise CorruptDocument(f"{name} is damaged and cannot be read as a PDF") from exc
    if pages == 0:
        raise EmptyDocument(f"{name} is a PDF without pages")
    _check_pages(name, pages, settings)

    def read_page(index: int) -> str:
        return reader.pages[index].extract_text()

    budget = _Budget(name, settings)
    texts, unreadable = _collect(name, pages, read_page, budget, failures)
    try:
        metadata = reader.metadata
        title = _clean_meta(metadata.title) if metadata is not None else None
        author = _clean_meta(metadata.author) if metadata is not None else None
    except failures:
        title = author = None
    return PdfText(pages, texts, title, author, unreadable)


def read_pdf(data: bytes, name: str, settings: IngestSettings) -> PdfText:
    """Measure the Flate streams, then read the text with the configured engine."""
    check_inflated_size(data, name, settings.max_inflated_bytes)
    match settings.pdf_engine:
        case "pypdfium2":
            return _read_with_pdfium(data, name, settings)
        case "pypdf":
            return _read_with_pypdf(data, name, settings)


def read_pdf_json(data: bytes, name: str, settings: IngestSettings) -> dict[str, Any]:
    """``read_pdf`` as the extraction child runs it."""
    return read_pdf(data, name, settings).to_json()


_CHILD_TARGET = f"{__name__}:read_pdf_json"


def load_pdf(
    data: bytes,
    name: str,
    settings: IngestSettings,
    content_type: str | None = None,
) -> LoadedDocument:
    """Load a PDF as one section per page that has text, pages numbered from 1."""
    match settings.pdf_isolation:
        case "process":
            from ingest.loaders.isolation import default_sandbox

            reply = default_sandbox().run(_CHILD_TARGET, data, name, settings)
            read = PdfText.from_json(reply)
        case "none":
            read = read_pdf(data, name, settings)
    if read.unreadable_pages and len(read.unreadable_pages) == read.pages:
        raise CorruptDocument(f"{name} is damaged: none of its {read.pages} pages can be read")
    sections = build_sections(
        [(text, number, ()) for number, text in enumerate(read.page_texts, start=1)]
    )
    if not sections:
        raise EmptyDocument(
            f"{name} has {read.pages} page(s) but no text layer (probably a scan); "
            "OCR is not supported"
        )
    metadata: dict[str, str] = {"pdf_engine": settings.pdf_engine}
    if read.author:
        metadata["author"] = read.author
    if read.unreadable_pages:
        metadata["unreadable_pages"] = ",".join(str(n) for n in read.unreadable_pages)
    return LoadedDocument(
        sections=sections,
        content_type=PDF_CONTENT_TYPE,
        pages=read.pages,
        title=read.title,
        metadata=metadata,
    )
