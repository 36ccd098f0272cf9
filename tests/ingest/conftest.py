"""Fixtures for the loader tests: PDFs written on the fly by fpdf2."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

PdfFactory = Callable[..., bytes]


def build_pdf(
    pages: Sequence[str],
    *,
    title: str | None = None,
    owner_password: str | None = None,
    user_password: str | None = None,
    encryption: str = "RC4",
    drawing_only: bool = False,
) -> bytes:
    """A real PDF with one text per page (an empty string makes an empty page).

    ``drawing_only`` puts a filled rectangle, and no text, on every page: what
    a scanned document looks like to a text extractor.
    """
    from fpdf import FPDF
    from fpdf.enums import EncryptionMethod

    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    if title is not None:
        pdf.set_title(title)
    for text in pages:
        pdf.add_page()
        if drawing_only:
            pdf.set_fill_color(90, 90, 90)
            pdf.rect(20, 20, 150, 200, style="F")
        elif text:
            pdf.multi_cell(0, 8, text)
    if owner_password is not None:
        pdf.set_encryption(
            owner_password=owner_password,
            user_password=user_password,
            encryption_method=EncryptionMethod[encryption],
        )
    return bytes(pdf.output())


@pytest.fixture
def make_pdf() -> PdfFactory:
    """``make_pdf(pages, **options)``: see ``build_pdf``."""
    return build_pdf
