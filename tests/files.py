"""Real documents of every supported format, made by the libraries people make them with,
and hostile ones (bombs, files that make a parser spin) written byte by byte."""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib

from docx import Document as DocxDocument
from fpdf import FPDF
from pypdf import PdfWriter


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


def _pdf_with_pages(streams: list[bytes], pages: list[int]) -> bytes:
    """A PDF written object by object (hostile files are not what PDF libraries make):
    page i draws with Helvetica from ``streams[pages[i]]``, a FlateDecode stream."""
    first_stream = 4 + len(pages)
    kids = " ".join(f"{4 + i} 0 R" for i in range(len(pages)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    objects += [f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents "
                f"{first_stream + index} 0 R /Resources << /Font << /F1 3 0 R >> >> >>".encode()
                for index in pages]
    objects += [f"<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode()
                + stream + b"\nendstream" for stream in streams]
    out, offsets = bytearray(b"%PDF-1.7\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


def _deflate(block: bytes, repeat: int, head: bytes = b"", tail: bytes = b"") -> bytes:
    """zlib data inflating to ``head + block * repeat + tail``, built without holding it."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(head)]
    parts += [compressor.compress(block) for _ in range(repeat)]
    return b"".join([*parts, compressor.compress(tail), compressor.flush()])


@functools.cache
def make_pdf_bomb(pages: int = 20, mib_per_page: int = 70) -> bytes:
    """A small PDF whose pages' content streams each inflate to ``mib_per_page`` MiB
    (blank space: under pypdf's 75 MB per-stream cap, yet pages x MiB in all)."""
    stream = _deflate(b" " * 2**20, mib_per_page)
    return _pdf_with_pages([stream] * pages, list(range(pages)))  # one stream object each


@functools.cache
def make_spinning_pdf(pages: int = 2000, operators_per_page: int = 150_000) -> bytes:
    """A small PDF whose every page shows an empty string ``operators_per_page`` times
    (one stream shared by all pages): text extraction works through each operator of
    each page in pure Python, about a second per page, and finds no text."""
    stream = _deflate(b"() Tj ", operators_per_page, head=b"BT /F1 12 Tf ", tail=b"ET\n")
    return _pdf_with_pages([stream], [0] * pages)


def make_blank_pdf(pages: int) -> bytes:
    """A PDF of ``pages`` empty pages (pypdf's writer)."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(612, 792)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def make_zip_directory(records: int, claimed: int | None = None) -> bytes:
    """A ZIP whose central directory holds ``records`` one-letter entries and whose end
    record claims ``claimed`` entries (ZIP64 above 65,535). No entry has any data: only
    the directory matters to whoever lists it. About 47 bytes per record."""
    record = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0,
                         0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    prefix = b"PK\x03\x04" + bytes(26)  # a local header's signature: sniffed as a ZIP
    directory = record * records
    claimed = records if claimed is None else claimed
    cd_offset, cd_size = len(prefix), len(directory)
    tail = b""
    if claimed > 0xFFFF:
        zip64_at = cd_offset + cd_size
        tail = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, claimed, claimed,
                           cd_size, cd_offset)
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
        claimed, cd_size, cd_offset = 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, claimed, claimed, cd_size, cd_offset, 0)
    return prefix + directory + tail + end
