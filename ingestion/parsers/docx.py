"""DOCX: paragraphs and table rows with python-docx, after a ZIP bomb check."""

from __future__ import annotations

import io
import re
import zipfile

import docx
from docx.document import Document
from docx.styles.style import CharacterStyle
from docx.table import Table
from docx.text.paragraph import Paragraph

from ingestion.document import HeadingTrail, ParsedDocument, SectionBuilder
from ingestion.errors import CorruptDocumentError, UnsafeDocumentError, corrupt_on_error
from ingestion.limits import ParseLimits
from ingestion.zipdir import open_bounded

_HEADING_STYLE = re.compile(r"heading\s*([1-9])", re.IGNORECASE)
# Small entries compress extremely well without being dangerous (a file of spaces);
# the ratio only matters once an entry is big enough to hurt.
_RATIO_FLOOR_BYTES = 2**20
_STYLE_CHAIN_LIMIT = 8


def parse_docx(data: bytes, limits: ParseLimits) -> ParsedDocument:
    """Body paragraphs and tables in order; "Heading N" styles build the heading path."""
    check_zip(data, limits)
    with corrupt_on_error("DOCX"):
        document = docx.Document(io.BytesIO(data))
        builder = SectionBuilder(limits)
        _add_body(document, builder)
        return builder.build("docx", title=_title(document))


def check_zip(data: bytes, limits: ParseLimits) -> None:
    """Refuse zip bombs using only the ZIP directory: nothing is inflated here.

    zipfile stops inflating an entry at its declared size, so the declared sizes
    checked here bound what python-docx can later read. The entry count is bounded
    from the directory's own records before zipfile lists them.
    """
    try:
        with open_bounded(data, limits.max_zip_entries, "DOCX") as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptDocumentError("DOCX is not a readable ZIP archive") from exc
    if len(entries) > limits.max_zip_entries:
        raise UnsafeDocumentError(
            f"DOCX has {len(entries)} ZIP entries; the limit is {limits.max_zip_entries}"
        )
    total = sum(entry.file_size for entry in entries)
    if total > limits.max_zip_uncompressed_bytes:
        raise UnsafeDocumentError(
            f"DOCX would inflate to {total:,} bytes; the limit is "
            f"{limits.max_zip_uncompressed_bytes:,}"
        )
    for entry in entries:
        ratio = entry.file_size / max(entry.compress_size, 1)
        if entry.file_size > _RATIO_FLOOR_BYTES and ratio > limits.max_zip_ratio:
            raise UnsafeDocumentError(
                f"DOCX entry {entry.filename!r} has compression ratio {ratio:.0f}; "
                f"the limit is {limits.max_zip_ratio:.0f}"
            )


def _add_body(document: Document, builder: SectionBuilder) -> None:
    trail = HeadingTrail()
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            _add_paragraph(block, trail, builder)
        else:
            _add_table(block, trail, builder)


def _add_paragraph(paragraph: Paragraph, trail: HeadingTrail, builder: SectionBuilder) -> None:
    text = paragraph.text.strip()
    level = _heading_level(paragraph.style)
    path = trail.enter(level, text) if level is not None and text else trail.path
    builder.add(text, heading_path=path)


def _add_table(table: Table, trail: HeadingTrail, builder: SectionBuilder) -> None:
    """One section per row, cells joined by " | "; merged cells are listed once."""
    for row in table.rows:
        cells: list[str] = []
        previous: object = None
        for cell in row.cells:
            # A merged cell is returned once per grid column it spans.
            if previous is not None and cell._tc is previous:
                continue
            previous = cell._tc
            cells.append(" ".join(cell.text.split()))
        builder.add(" | ".join(cells), heading_path=trail.path)


def _heading_level(style: CharacterStyle | None) -> int | None:
    """Level of a "Heading N" style, or of the heading style it is based on."""
    for _ in range(_STYLE_CHAIN_LIMIT):
        if style is None:
            return None
        match = _HEADING_STYLE.fullmatch(style.name or "")
        if match:
            return int(match.group(1))
        style = style.base_style
    return None


def _title(document: Document) -> str | None:
    title = str(document.core_properties.title or "").strip()
    if title:
        return title
    for paragraph in document.paragraphs:
        if paragraph.style is not None and paragraph.style.name == "Title":
            return paragraph.text.strip() or None
    return None
