"""Real documents of every supported format, made by the libraries people make them with."""

from __future__ import annotations

import io
import zipfile

from docx import Document as DocxDocument
from fpdf import FPDF


def make_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per string (text really extractable)."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
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


def make_docx_bomb(uncompressed_mb: int = 300) -> bytes:
    """A zip that claims to be a DOCX and inflates to hundreds of MB of zeros."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        with zf.open("word/document.xml", "w") as member:
            block = b"\0" * 2**20
            for _ in range(uncompressed_mb):
                member.write(block)
    return buf.getvalue()
