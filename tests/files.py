"""Real documents of every supported format, made by the libraries people make them with."""

from __future__ import annotations

import functools
import io
import zipfile

from docx import Document as DocxDocument
from fpdf import FPDF


def make_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per text (fpdf2, core font; text really extractable)."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_docx(heading: str, paragraphs: list[str], table: list[list[str]] | None = None) -> bytes:
    """A DOCX with a heading, paragraphs and an optional table."""
    doc = DocxDocument()
    doc.add_heading(heading, level=1)
    for p in paragraphs:
        doc.add_paragraph(p)
    if table:
        t = doc.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                t.cell(r, c).text = cell
    buf = io.BytesIO()
    doc.save(buf)
    return buf.getvalue()


def make_html(title: str, body: str) -> bytes:
    """An HTML page with boilerplate around the content."""
    return (
        f"<!doctype html><html><head><title>{title}</title>"
        "<script>var tracking = 'SCRIPT-NOISE';</script></head><body>"
        "<nav><a href='/'>Home</a> NAV-NOISE</nav>"
        f"<article><h1>{title}</h1><p>{body}</p></article></body></html>"
    ).encode()


@functools.cache
def make_docx_bomb(size: int = 300 * 2**20) -> bytes:
    """A ZIP claiming to be a DOCX whose word/document.xml inflates to ``size`` zero bytes.

    Written 1 MiB at a time, so building it never holds the inflated data in memory.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as entry:
            block = bytes(2**20)
            for _ in range(size // len(block)):
                entry.write(block)
    return buffer.getvalue()
