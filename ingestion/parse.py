"""bytes + detected format -> `ParsedDocument` (text with sections and offsets)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ingestion.document import Format, ParsedDocument
from ingestion.errors import EmptyDocumentError, UnsupportedFormatError
from ingestion.limits import DEFAULT_LIMITS, ParseLimits
from ingestion.parsers.docx import parse_docx
from ingestion.parsers.html import parse_html
from ingestion.parsers.markdown import parse_markdown
from ingestion.parsers.pdf import parse_pdf
from ingestion.parsers.text import parse_text

_PARSERS: Mapping[str, Callable[[bytes, ParseLimits], ParsedDocument]] = {
    "pdf": parse_pdf,
    "docx": parse_docx,
    "html": parse_html,
    "markdown": parse_markdown,
    "text": parse_text,
}


def parse_document(
    data: bytes, fmt: Format, limits: ParseLimits = DEFAULT_LIMITS
) -> ParsedDocument:
    """Extract text and structure from ``data`` of format ``fmt`` (see `detect_format`).

    Sections of PDF, DOCX and HTML are joined with a blank line; for Markdown and text
    the document text is the decoded source (newlines normalized) so offsets map to it.
    Raises `EmptyDocumentError`, `CorruptDocumentError` or `UnsafeDocumentError`.
    """
    if not data:
        raise EmptyDocumentError("the file is empty (0 bytes)")
    parser = _PARSERS.get(fmt)
    if parser is None:
        raise UnsupportedFormatError(f"unsupported format {fmt!r}")
    return parser(data, limits)
