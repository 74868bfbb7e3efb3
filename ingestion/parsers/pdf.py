"""PDF: text per page with pypdf; page numbers are 1-based."""

from __future__ import annotations

import io

from pypdf import PageObject, PasswordType, PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError

from ingestion.document import ParsedDocument, SectionBuilder, paragraph_spans
from ingestion.errors import CorruptDocumentError, UnsafeDocumentError, corrupt_on_error
from ingestion.limits import ParseLimits

_ENCRYPTED = "PDF is encrypted and cannot be opened without a password"


def parse_pdf(data: bytes, limits: ParseLimits) -> ParsedDocument:
    """One section per blank-line separated block of each page's text."""
    with corrupt_on_error("PDF"):
        try:
            return _parse(data, limits)
        except LimitReachedError as exc:
            raise UnsafeDocumentError(f"PDF exceeds a decoding limit: {exc}") from exc
        except (FileNotDecryptedError, DependencyError) as exc:
            raise CorruptDocumentError(_ENCRYPTED) from exc


def _parse(data: bytes, limits: ParseLimits) -> ParsedDocument:
    reader = PdfReader(io.BytesIO(data))
    _unlock(reader)
    page_count = len(reader.pages)
    if page_count > limits.max_pages:
        raise UnsafeDocumentError(f"PDF has {page_count} pages; the limit is {limits.max_pages}")
    builder = SectionBuilder(limits)
    for number, page in enumerate(reader.pages, start=1):
        text = _page_text(page)
        for start, end in paragraph_spans(text):
            builder.add(text[start:end], page=number)
    return builder.build(
        "pdf",
        page_count=page_count,
        title=_title(reader),
        empty_reason="PDF has no extractable text (scanned pages need OCR, not supported)",
    )


def _unlock(reader: PdfReader) -> None:
    """Open encrypted PDFs that need no password (owner-password-only files are common)."""
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise CorruptDocumentError(_ENCRYPTED)


def _page_text(page: PageObject) -> str:
    return page.extract_text().replace("\r\n", "\n").replace("\r", "\n")


def _title(reader: PdfReader) -> str | None:
    try:
        metadata = reader.metadata
        title = metadata.title if metadata is not None else None
    except Exception:  # a broken info dictionary must not fail a readable document
        return None
    return title.strip() or None if isinstance(title, str) else None
