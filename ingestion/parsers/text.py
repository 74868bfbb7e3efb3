"""Plain text (JSON included): the decoded file is the text; paragraphs are sections."""

from __future__ import annotations

from ingestion.document import (
    ParsedDocument,
    check_text_size,
    document_from_source,
    normalize_newlines,
    paragraph_spans,
)
from ingestion.encoding import decode_text
from ingestion.limits import ParseLimits


def parse_text(data: bytes, limits: ParseLimits) -> ParsedDocument:
    """Offsets point into the decoded file (BOM removed, newlines normalized to LF)."""
    text = normalize_newlines(decode_text(data))
    check_text_size(text, limits)
    spans = ((start, end, ()) for start, end in paragraph_spans(text))
    return document_from_source("text", text, spans)
