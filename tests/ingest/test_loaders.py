"""The document loaders, on real documents and on generated, broken and hostile ones."""

from __future__ import annotations

import codecs
import gc
import random
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingest.loaders import (
    SECTION_SEPARATOR,
    SUPPORTED_TYPES,
    LoadedDocument,
    detect_kind,
    load_document,
)
from ingest.loaders import html as html_loader
from ingest.loaders import pdf as pdf_loader
from rag_service.config import IngestSettings
from rag_service.errors import (
    CorruptDocument,
    DocumentTooLarge,
    EmptyDocument,
    EncryptedDocument,
    UnsupportedDocument,
)

DATA = Path(__file__).resolve().parent.parent / "data"
REAL_PDF = DATA / "shared-mime-info-spec.pdf"
REAL_HTML = DATA / "shared-mime-info-spec-unified-system.html"
REAL_MARKDOWN = DATA / "shared-mime-info-README.md"
DEBIAN_REFERENCE = Path("/usr/share/debian-reference/debian-reference.en.pdf")
ENGINES = ("pypdfium2", "pypdf")
PdfFactory = Callable[..., bytes]
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06"


def load(
    data: bytes, filename: str, content_type: str | None = None, **limits: Any
) -> LoadedDocument:
    return load_document(data, filename, IngestSettings(**limits), content_type)


def full_text(doc: LoadedDocument) -> str:
    return SECTION_SEPARATOR.join(section.text for section in doc.sections)


def assert_offsets(doc: LoadedDocument) -> None:
    text = full_text(doc)
    for section in doc.sections:
        assert text[section.start : section.start + len(section.text)] == section.text


# --- detection ---------------------------------------------------------------


def test_pdf_named_txt_is_read_as_pdf(make_pdf: PdfFactory) -> None:
    data = make_pdf(["Quarterly figures for the north region"])
    assert detect_kind(data, "notes.txt", "text/plain") == "pdf"
    doc = load(data, "notes.txt", "text/plain")
    assert doc.content_type == "application/pdf"
    assert "Quarterly figures" in doc.sections[0].text


def test_pdf_header_after_leading_junk_is_found(make_pdf: PdfFactory) -> None:
    assert detect_kind(b"\r\n\r\n" + make_pdf(["x"]), "scan") == "pdf"


@pytest.mark.parametrize(
    ("filename", "content_type"), [("report.pdf", None), ("upload", "application/pdf")]
)
def test_text_claiming_to_be_pdf_is_corrupt(filename: str, content_type: str | None) -> None:
    with pytest.raises(CorruptDocument, match="not a PDF"):
        load(b"This is plain text, not a PDF at all.\n", filename, content_type)


@pytest.mark.parametrize("filename", ["image.png", "image.txt", "image.pdf", "image"])
def test_png_is_refused_whatever_its_name(filename: str) -> None:
    expected = CorruptDocument if filename.endswith(".pdf") else UnsupportedDocument
    with pytest.raises(expected, match="PNG image") as caught:
        detect_kind(PNG_HEADER + bytes(200), filename)
    if expected is UnsupportedDocument:
        assert "supported types" in caught.value.message
        assert all(description in caught.value.message for description in SUPPORTED_TYPES.values())


def test_zip_container_such_as_docx_is_unsupported() -> None:
    with pytest.raises(UnsupportedDocument, match="DOCX"):
        detect_kind(b"PK\x03\x04\x14\x00\x06\x00" + bytes(100), "letter.docx")


def test_nul_heavy_binary_is_unsupported() -> None:
    blob = random.Random(7).randbytes(4096) + bytes(4096)
    with pytest.raises(UnsupportedDocument, match="binary data"):
        load(blob, "data.bin")


@pytest.mark.parametrize(
    ("filename", "kind"),
    [
        ("a.md", "markdown"),
        ("A.MARKDOWN", "markdown"),
        ("a.html", "html"),
        ("a.htm", "html"),
        ("a.txt", "text"),
        ("a.text", "text"),
        ("a.rst", "text"),
        ("a.csv", "text"),
        ("a.log", "text"),
        ("README", "text"),
    ],
)
def test_extension_decides_for_text_content(filename: str, kind: str) -> None:
    assert detect_kind(b"# Title\n\nSome words.\n", filename) == kind


@pytest.mark.parametrize(
    ("data", "content_type", "kind"),
    [
        (b"# Title\n", "text/markdown; charset=utf-8", "markdown"),
        (b"<p>hi</p>", "text/html", "html"),
        (b"plain words", "text/csv", "text"),
        (b"plain words", "application/octet-stream", "text"),
        (b"  <!DOCTYPE html><html><body>x</body></html>", None, "html"),
    ],
)
def test_declared_type_and_content_decide_without_extension(
    data: bytes, content_type: str | None, kind: str
) -> None:
    assert detect_kind(data, "upload", content_type) == kind


def test_extension_beats_declared_type() -> None:
    assert detect_kind(b"# Title\n", "notes.md", "text/html") == "markdown"


@pytest.mark.parametrize("data", [b"", b"  \n\t\r\n ", b"\x00\x00\x00"])
@pytest.mark.parametrize("filename", ["empty.pdf", "empty.txt", "empty.md", "empty.html"])
def test_empty_upload_is_empty_document(data: bytes, filename: str) -> None:
    with pytest.raises(EmptyDocument):
        load(data, filename)


def test_utf16_without_bom_is_text_not_binary() -> None:
    data = "Plain words in UTF-16 without a byte order mark.".encode("utf-16-le")
    assert detect_kind(data, "notes.txt") == "text"
    assert full_text(load(data, "notes.txt")) == "Plain words in UTF-16 without a byte order mark."


# --- plain text ----------------------------------------------------------------

FRENCH = "Le café était très agréable ; naïve élève, coût 5 € pour deux thés à l\u2019école."
GERMAN = "Grüße aus München! Die Straße ist schön und das Wetter äußerst angenehm."
RUSSIAN = "Привет, как дела? Это текст в старой кодировке для проверки загрузчика."


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("\ufeff" + FRENCH, FRENCH),
        (FRENCH, FRENCH),
        (FRENCH.encode("utf-16"), FRENCH),
        (codecs.BOM_UTF16_BE + FRENCH.encode("utf-16-be"), FRENCH),
        (FRENCH.encode("utf-32"), FRENCH),
        (FRENCH.encode("cp1252"), FRENCH),
        (GERMAN.encode("latin-1"), GERMAN),
        (RUSSIAN.encode("cp1251"), RUSSIAN),
    ],
    ids=[
        "utf8-bom",
        "utf8",
        "utf16le-bom",
        "utf16be-bom",
        "utf32-bom",
        "cp1252",
        "latin1",
        "cp1251",
    ],
)
def test_text_encodings_are_detected(data: bytes | str, expected: str) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    doc = load(raw, "notes.txt")
    assert full_text(doc) == expected
    assert doc.content_type == "text/plain"


def test_short_legacy_text_is_not_taken_for_utf16() -> None:
    assert full_text(load("Plain café".encode("cp1252"), "a.txt")) == "Plain café"


def test_invalid_utf8_is_replaced_not_raised() -> None:
    doc = load(b"valid caf\xc3\xa9, then a broken byte \xff here\n", "notes.txt")
    assert full_text(doc) == "valid café, then a broken byte \ufffd here"


def test_declared_charset_is_used() -> None:
    greek = "Καλημέρα κόσμε, αυτό είναι ελληνικό κείμενο."
    doc = load(greek.encode("iso-8859-7"), "a.txt", "text/plain; charset=ISO-8859-7")
    assert full_text(doc) == greek


def test_nul_bytes_and_line_endings_are_cleaned() -> None:
    doc = load(b"Hello\x00 world\x00\r\nsecond line\rthird line\n\n", "notes.txt")
    assert full_text(doc) == "Hello world\nsecond line\nthird line"


def test_text_is_one_section_without_page() -> None:
    doc = load(b"First paragraph.\n\nSecond paragraph.\n", "notes.txt")
    assert len(doc.sections) == 1
    section = doc.sections[0]
    assert (section.page, section.headings, section.start) == (None, (), 0)
    assert doc.pages is None


def test_text_over_max_chars_is_too_large() -> None:
    with pytest.raises(DocumentTooLarge, match="limit is 10"):
        load(b"eleven chars and more", "notes.txt", max_chars=10)


# --- markdown ------------------------------------------------------------------

GUIDE_MD = b"""Preamble before any heading.

# Guide

Intro text.

## Install

Generic steps.

### On Debian

```sh
# not a heading: a shell comment in a fenced block
apt install rag
## neither is this
```

### On Fedora

dnf install rag

## Use `rag` *daily*

Run it.

Appendix
========

Setext heading body.
"""


def test_markdown_sections_follow_heading_paths() -> None:
    doc = load(GUIDE_MD, "guide.md")
    assert doc.content_type == "text/markdown"
    assert doc.title == "Guide"
    assert [s.headings for s in doc.sections] == [
        (),
        ("Guide",),
        ("Guide", "Install"),
        ("Guide", "Install", "On Debian"),
        ("Guide", "Install", "On Fedora"),
        ("Guide", "Use rag daily"),
        ("Appendix",),
    ]
    debian = doc.sections[3]
    assert debian.text.startswith("### On Debian\n")
    assert "# not a heading" in debian.text
    assert "## neither is this\n```" in debian.text
    assert doc.sections[5].text.startswith("## Use `rag` *daily*")
    assert doc.sections[6].text == "Appendix\n========\n\nSetext heading body."
    assert all(s.page is None for s in doc.sections)
    assert_offsets(doc)


def test_markdown_skipped_levels_keep_the_path_short() -> None:
    doc = load(b"# A\n\na\n\n### B\n\nb\n\n## C\n\nc\n", "x.md")
    assert [s.headings for s in doc.sections] == [("A",), ("A", "B"), ("A", "C")]


def test_markdown_heading_inside_blockquote_does_not_split() -> None:
    doc = load(b"# Top\n\n> # Quoted\n> text\n\nmore\n", "x.md")
    assert [s.headings for s in doc.sections] == [("Top",)]


def test_markdown_front_matter_gives_title_not_a_heading() -> None:
    source = b'---\ntitle: "Release notes"\nauthor: me\n---\nBody text.\n\n## Fixes\n\nMany.\n'
    doc = load(source, "r.md")
    assert doc.title == "Release notes"
    assert [s.headings for s in doc.sections] == [(), ("Fixes",)]
    assert "author: me" not in full_text(doc)


def test_markdown_with_only_front_matter_is_empty() -> None:
    with pytest.raises(EmptyDocument):
        load(b"---\ntitle: Nothing\n---\n\n", "r.md")


def test_real_readme_markdown() -> None:
    doc = load(REAL_MARKDOWN.read_bytes(), REAL_MARKDOWN.name)
    assert doc.title == "Shared MIME Info"
    assert [s.headings for s in doc.sections] == [
        ("Shared MIME Info",),
        ("Shared MIME Info", "Installation"),
        ("Shared MIME Info", "Useful reference links"),
    ]
    assert "$ meson _build -Dprefix=/usr" in doc.sections[1].text
    assert_offsets(doc)


# --- html ----------------------------------------------------------------------

PAGE_HTML = b"""<!DOCTYPE html>
<html><head><title> Rag  Manual </title>
<style>body { color: red }</style><script>var secret = "script text";</script></head>
<body>
<header><h1>Site banner</h1><nav><a href="/">Home</a> <a href="/docs">Docs</a></nav></header>
<main>
  <h1>Manual</h1>
  <p>First   paragraph
     spans lines.</p><p>Second paragraph.</p>
  <h2>Install</h2>
  <div>Use the <b>package</b>.<br>Or the source.</div>
  <aside>Related links</aside>
  <h3>On Debian</h3>
  <pre>  apt install rag
    --yes</pre>
  <table><tr><th>Option</th><th>Default</th></tr><tr><td>port</td><td></td><td>8000</td></tr></table>
  <p hidden>Hidden text</p><p style="display: none">Invisible</p>
  <noscript>Enable JavaScript</noscript><template><p>Template text</p></template>
  <h2>Use</h2>
  <ul><li>Ask</li><li>Read</li></ul>
</main>
<footer>Copyright footer</footer>
</body></html>
"""


def test_html_main_content_with_heading_paths() -> None:
    doc = load(PAGE_HTML, "manual.html")
    assert doc.content_type == "text/html"
    assert doc.title == "Rag Manual"
    assert [s.headings for s in doc.sections] == [
        ("Manual",),
        ("Manual", "Install"),
        ("Manual", "Install", "On Debian"),
        ("Manual", "Use"),
    ]
    assert doc.sections[0].text == "Manual\n\nFirst paragraph spans lines.\n\nSecond paragraph."
    assert doc.sections[1].text == "Install\n\nUse the package.\nOr the source."
    assert "  apt install rag\n    --yes" in doc.sections[2].text
    assert "Option | Default\n\nport | 8000" in doc.sections[2].text
    assert doc.sections[3].text == "Use\n\nAsk\n\nRead"
    text = full_text(doc)
    dropped = ["script text", "color: red", "Site banner", "Docs", "Related links"]
    dropped += ["Hidden text", "Invisible", "JavaScript", "Template text", "Copyright"]
    assert [phrase for phrase in dropped if phrase in text] == []
    assert_offsets(doc)


def test_html_articles_when_no_main_keep_their_own_header() -> None:
    page = b"""<html><body><div class="sidebar">Sidebar junk</div>
    <article><header><h1>First post</h1><p>By Ann</p></header><p>Post one.</p></article>
    <article><h1>Second post</h1><p>Post two.</p></article>
    <footer>Site footer</footer></body></html>"""
    doc = load(page, "blog.html")
    assert [s.headings for s in doc.sections] == [("First post",), ("Second post",)]
    assert doc.sections[0].text == "First post\n\nBy Ann\n\nPost one."
    assert "Sidebar" not in full_text(doc)
    assert "Site footer" not in full_text(doc)


def test_html_body_when_no_main_or_article() -> None:
    doc = load(b"<html><body><p>Only body text.</p><script>x()</script></body></html>", "a.html")
    assert full_text(doc) == "Only body text."
    assert doc.title is None


def test_html_meta_charset_is_honoured() -> None:
    page = '<html><head><meta charset="koi8-r"></head><body><p>Привет, мир</p></body></html>'
    assert full_text(load(page.encode("koi8-r"), "ru.html")) == "Привет, мир"


def test_html_with_xml_declaration_loads_without_warning() -> None:
    page = b'<?xml version="1.0" encoding="utf-8"?><html><body><p>XHTML body</p></body></html>'
    assert full_text(load(page, "x.xhtml")) == "XHTML body"


def test_html_file_without_tags_is_its_text() -> None:
    doc = load(b"just words in an .html file", "a.html")
    assert full_text(doc) == "just words in an .html file"


def test_html_with_only_scripts_is_empty() -> None:
    with pytest.raises(EmptyDocument, match="no visible text"):
        load(b"<html><head><script>var a = 1;</script></head><body> </body></html>", "a.html")


def test_html_nested_tag_bomb_is_read() -> None:
    depth = 100_000
    page = (
        b"<html><body><main><h1>Top</h1>"
        + b"<div>" * depth
        + b"deep text"
        + b"</div>" * depth
        + b"<p>after</p></main></body></html>"
    )
    started = time.monotonic()
    doc = load(page, "bomb.html")
    assert time.monotonic() - started < 60
    assert full_text(doc) == "Top\n\ndeep text\n\nafter"


def test_html_falls_back_to_flat_text_on_recursion_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def too_deep(markup: str) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(html_loader, "_structured_parts", too_deep)
    doc = load(PAGE_HTML, "manual.html")
    text = full_text(doc)
    assert "First paragraph spans lines." in text
    assert "Second paragraph." in text
    assert "script text" not in text


def test_real_html_chapter() -> None:
    doc = load(REAL_HTML.read_bytes(), REAL_HTML.name)
    assert doc.title == "Unified system"
    by_heading = {s.headings: s.text for s in doc.sections}
    chapter = "2. Unified system"
    xattr_section = (chapter, "2.10. Storing the MIME type using Extended Attributes")
    assert "user.mime_type" in by_heading[xattr_section]
    assert (chapter, "2.17. User modification") in by_heading
    assert_offsets(doc)


# --- pdf -----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_generated_pdf_has_one_section_per_page_with_text(
    make_pdf: PdfFactory, engine: str
) -> None:
    data = make_pdf(
        ["Alpha page talks about apples.", "", "Gamma page talks about grapes."],
        title="Fruit Report",
    )
    doc = load(data, "fruit.pdf", pdf_engine=engine)
    assert doc.content_type == "application/pdf"
    assert doc.pages == 3
    assert doc.title == "Fruit Report"
    assert [s.page for s in doc.sections] == [1, 3]
    assert doc.sections[0].text == "Alpha page talks about apples."
    assert doc.sections[1].text == "Gamma page talks about grapes."
    assert doc.metadata["pdf_engine"] == engine
    assert_offsets(doc)


@pytest.mark.parametrize("engine", ENGINES)
def test_real_pdf_pages_and_known_words(engine: str) -> None:
    doc = load(REAL_PDF.read_bytes(), REAL_PDF.name, pdf_engine=engine)
    assert doc.pages == 17
    assert [s.page for s in doc.sections] == list(range(1, 18))
    by_page = {s.page: s.text for s in doc.sections}
    assert "Storing the MIME type using Extended Attributes" in by_page[14]
    assert "user.mime_type" in by_page[14]
    assert "MIME-Magic" in by_page[9]
    assert "user.mime_type" not in by_page[1]
    assert "\r" not in full_text(doc)
    assert_offsets(doc)


def test_pdfium_keeps_word_spacing_on_real_pdf() -> None:
    doc = load(REAL_PDF.read_bytes(), REAL_PDF.name, pdf_engine="pypdfium2")
    assert "This is version 0.21 of the Shared MIME-info Database specification" in full_text(doc)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["RC4", "AES_128", "AES_256"])
def test_password_protected_pdf_is_encrypted_document(
    make_pdf: PdfFactory, engine: str, method: str
) -> None:
    data = make_pdf(["Top secret"], owner_password="owner", user_password="user", encryption=method)
    with pytest.raises(EncryptedDocument, match="remove the password"):
        load(data, "secret.pdf", pdf_engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_pdf_with_owner_password_only_opens(make_pdf: PdfFactory, engine: str) -> None:
    data = make_pdf(["Readable but not printable"], owner_password="owner", encryption="AES_128")
    assert full_text(load(data, "locked.pdf", pdf_engine=engine)) == "Readable but not printable"


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_pdf_is_corrupt(make_pdf: PdfFactory, engine: str) -> None:
    data = make_pdf(["Page one text", "Page two text"])
    with pytest.raises(CorruptDocument) as caught:
        load(data[: len(data) // 2], "cut.pdf", pdf_engine=engine)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_real_pdf_is_corrupt(engine: str) -> None:
    data = REAL_PDF.read_bytes()
    with pytest.raises(CorruptDocument):
        load(data[: len(data) // 2], "cut.pdf", pdf_engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_byte_pdf_is_empty(engine: str) -> None:
    with pytest.raises(EmptyDocument):
        load(b"", "nothing.pdf", pdf_engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_scanned_pdf_without_text_layer_is_empty(make_pdf: PdfFactory, engine: str) -> None:
    data = make_pdf(["", ""], drawing_only=True)
    with pytest.raises(EmptyDocument, match="no text layer") as caught:
        load(data, "scan.pdf", pdf_engine=engine)
    assert "OCR is not supported" in caught.value.message


@pytest.mark.parametrize("engine", ENGINES)
def test_page_limit_is_checked_before_extracting(
    make_pdf: PdfFactory, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_extract(text: str) -> str:
        raise AssertionError("text was extracted before the page count was checked")

    monkeypatch.setattr(pdf_loader, "normalise_page_text", must_not_extract)
    with pytest.raises(DocumentTooLarge, match="3 pages; the limit is 2"):
        load(make_pdf(["one", "two", "three"]), "long.pdf", pdf_engine=engine, max_pages=2)


@pytest.mark.parametrize("engine", ENGINES)
def test_pdf_over_max_chars_is_too_large(make_pdf: PdfFactory, engine: str) -> None:
    data = make_pdf(["A page with rather more than twenty characters.", "More."])
    with pytest.raises(DocumentTooLarge, match="20 characters"):
        load(data, "big.pdf", pdf_engine=engine, max_chars=20)


def _page_failure(engine: str) -> Exception:
    """The exception each engine raises for a page it cannot read."""
    if engine == "pypdfium2":
        import pypdfium2

        return pypdfium2.PdfiumError("page failed")  # type: ignore[no-any-return]
    from pypdf.errors import PdfReadError

    return PdfReadError("page failed")


@pytest.mark.parametrize("engine", ENGINES)
def test_one_unreadable_page_does_not_lose_the_others(
    make_pdf: PdfFactory, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_normalise = pdf_loader.normalise_page_text

    def fail_on_page_two(text: str) -> str:
        if "page two" in text:
            raise _page_failure(engine)
        return real_normalise(text)

    monkeypatch.setattr(pdf_loader, "normalise_page_text", fail_on_page_two)
    # in-process: the child process would not see the patched function
    doc = load(
        make_pdf(["page one", "page two", "page three"]),
        "a.pdf",
        pdf_engine=engine,
        pdf_isolation="none",
    )
    assert [s.page for s in doc.sections] == [1, 3]
    assert doc.metadata["unreadable_pages"] == "2"


@pytest.mark.parametrize("engine", ENGINES)
def test_pdf_with_no_readable_page_is_corrupt(
    make_pdf: PdfFactory, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_fail(text: str) -> str:
        raise _page_failure(engine)

    monkeypatch.setattr(pdf_loader, "normalise_page_text", always_fail)
    with pytest.raises(CorruptDocument, match="none of its 2 pages"):
        load(make_pdf(["one", "two"]), "a.pdf", pdf_engine=engine, pdf_isolation="none")


def test_page_text_normalisation() -> None:
    raw = "Head\x00ing  with\t spaces \r\n\r\n\r\n\r\nnext distri\ufffebution\rend  "
    assert pdf_loader.normalise_page_text(raw) == "Heading with spaces\n\nnext distribution\nend"


def test_pdfium_is_safe_from_many_threads() -> None:
    data = REAL_PDF.read_bytes()
    expected = full_text(load(data, "spec.pdf"))
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                results.append(full_text(load(data, "spec.pdf")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [expected] * 12


def test_pdfium_leaves_nothing_to_finalise() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(REAL_PDF.read_bytes(), "spec.pdf", pdf_engine="pypdfium2")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.slow
def test_pdfium_spaces_words_in_tex_output() -> None:
    assert DEBIAN_REFERENCE.exists(), "apt-get install debian-reference-en (or run .ci/run)"
    doc = load(DEBIAN_REFERENCE.read_bytes(), DEBIAN_REFERENCE.name)
    assert doc.pages == 261
    text = full_text(doc)
    assert "Replace it with the following to track" in text
    assert "Replaceitwiththefollowingtotrack" not in text
