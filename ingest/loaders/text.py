"""Plain text: find the encoding, decode without ever failing, clean up.

The decoding helpers here are shared by the Markdown and HTML loaders, so
every text-like upload goes through the same encoding logic.
"""

from __future__ import annotations

import codecs

import charset_normalizer

from ingest.loaders.base import LoadedDocument, build_sections
from rag_service.config import IngestSettings
from rag_service.errors import EmptyDocument

TEXT_CONTENT_TYPE = "text/plain"

# Byte order marks, longest first: the UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

# C0 control characters other than tab, newline, carriage return and form
# feed carry no text; NUL in particular breaks tokenizers and SQLite FTS.
_CONTROL_CHARS = dict.fromkeys(
    [c for c in range(32) if chr(c) not in "\t\n\r\f"] + [0x7F],
    None,
)

_HIGH_BYTES = bytes(range(128, 256))
# Below this many non-ASCII bytes, encoding detection is a coin toss.
_MIN_NON_ASCII_TO_GUESS = 16

# How much of a file the BOM-less UTF-16 test looks at.
_SNIFF_BYTES = 8192


def unicode_encoding(data: bytes) -> str | None:
    """The UTF-8/16/32 codec a byte order mark (or a UTF-16 NUL pattern) announces.

    UTF-16 text without a BOM shows up as every other byte being NUL; we
    recognise that for mostly-ASCII text so it is not mistaken for binary.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding
    sample = data[:_SNIFF_BYTES]
    pairs = len(sample) // 2
    if pairs < 2 or sample.count(0) < pairs // 2:
        return None
    even_nuls = sample[0 : pairs * 2 : 2].count(0)
    odd_nuls = sample[1 : pairs * 2 : 2].count(0)
    if odd_nuls >= 0.9 * pairs and even_nuls <= 0.1 * pairs:
        return "utf-16-le"
    if even_nuls >= 0.9 * pairs and odd_nuls <= 0.1 * pairs:
        return "utf-16-be"
    return None


def charset_from_content_type(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a MIME type, if it names a codec Python knows."""
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return known_codec(value.strip().strip("\"'"))
    return None


def known_codec(name: str | None) -> str | None:
    """``name`` if Python has a codec of that name, else None."""
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _mostly_utf8(data: bytes) -> bool:
    """Whether undecodable bytes are rare slips in otherwise valid UTF-8.

    A UTF-8 file with a few broken bytes still has many valid multi-byte
    characters; a Latin-1 or cp1252 file has none, because its accented
    letters are lone high bytes.  Decoding the first as UTF-8 with
    replacement keeps every good character intact, where a legacy codec
    would garble all of them.
    """
    decoded = data.decode("utf-8", errors="replace")
    bad = decoded.count("\ufffd")
    ascii_chars = len(decoded.encode("ascii", errors="ignore"))
    good = len(decoded) - ascii_chars - bad
    return good > 0 and bad <= good


def _legacy_decode(data: bytes) -> str:
    """Decode bytes that are not UTF-8 in any form, with a guessed 8-bit codec.

    charset-normalizer needs material to work with: on a handful of accented
    letters it guesses at random (even UTF-16 for ten ASCII bytes).  So few
    non-ASCII bytes mean cp1252, the usual legacy codec of Western text and
    what browsers read Latin-1 as; otherwise its best 8-bit or multi-byte
    guess wins.
    """
    non_ascii = len(data) - len(data.translate(None, _HIGH_BYTES))
    if non_ascii >= _MIN_NON_ASCII_TO_GUESS:
        for match in charset_normalizer.from_bytes(data):
            if not match.encoding.startswith(("utf_16", "utf_32")):
                return str(match)
    return data.decode("cp1252", errors="replace")


def decode_text(data: bytes, hint: str | None = None) -> str:
    """Decode bytes of unknown encoding to text; never raises.

    Order: a byte order mark, then the encoding the caller was told
    (``hint``, e.g. an HTTP or ``<meta>`` charset) if the bytes are valid in
    it, then strict UTF-8, then UTF-8 with replacement characters if the
    file is mostly UTF-8, and last a legacy 8-bit codec.
    """
    unicode = unicode_encoding(data)
    if unicode is not None:
        return data.decode(unicode, errors="replace").lstrip("\ufeff")
    for encoding in (known_codec(hint), "utf-8"):
        if encoding is None:
            continue
        try:
            return data.decode(encoding).lstrip("\ufeff")
        except UnicodeDecodeError:
            continue
    if _mostly_utf8(data):
        return data.decode("utf-8", errors="replace")
    return _legacy_decode(data)


def clean_text(text: str) -> str:
    """Drop control characters (NUL first of all) and use ``\\n`` line endings."""
    text = text.translate(_CONTROL_CHARS)
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")


def load_text(
    data: bytes,
    name: str,
    settings: IngestSettings,
    content_type: str | None = None,
) -> LoadedDocument:
    """Load a plain text file as one section; the chunker splits it later."""
    text = clean_text(decode_text(data, charset_from_content_type(content_type))).strip("\n")
    if not text.strip():
        raise EmptyDocument(f"{name} contains no text")
    return LoadedDocument(
        sections=build_sections([(text.rstrip(), None, ())]),
        content_type=TEXT_CONTENT_TYPE,
    )
