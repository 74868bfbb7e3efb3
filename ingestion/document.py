"""The parsed form of a document: one text plus the structural sections inside it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from ingestion.errors import EmptyDocumentError, UnsafeDocumentError
from ingestion.limits import ParseLimits

Format = Literal["pdf", "docx", "html", "markdown", "text"]

HeadingPath = tuple[str, ...]

# Blocks extracted from PDF, DOCX and HTML are joined with a blank line.
SECTION_SEPARATOR = "\n\n"

_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


@dataclass(frozen=True)
class Section:
    """A structural block (paragraph, list item, table rows, code block, heading).

    ``text == ParsedDocument.text[start:end]``; ``page`` is 1-based (PDF only);
    ``heading_path`` lists the enclosing headings, outermost first; a heading's own
    section includes the heading itself.
    """

    text: str
    start: int
    end: int
    page: int | None
    heading_path: HeadingPath


@dataclass(frozen=True)
class ParsedDocument:
    """Extracted text of one document and its sections, in reading order."""

    format: Format
    text: str
    sections: tuple[Section, ...]
    page_count: int | None
    title: str | None


class HeadingTrail:
    """The chain of headings that encloses the current position of a document walk."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []

    @property
    def path(self) -> HeadingPath:
        """Enclosing heading texts, outermost first."""
        return tuple(text for _, text in self._stack)

    def enter(self, level: int, text: str) -> HeadingPath:
        """Record a heading of ``level`` (1 = top); return the path that now applies."""
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, text))
        return self.path


class SectionBuilder:
    """Collects extracted blocks and joins them into a `ParsedDocument`."""

    def __init__(self, limits: ParseLimits) -> None:
        self._max_chars = limits.max_text_chars
        self._parts: list[str] = []
        self._sections: list[Section] = []
        self._length = 0

    def add(self, text: str, *, page: int | None = None, heading_path: HeadingPath = ()) -> None:
        """Append one block; blank blocks are skipped, NULs dropped (Postgres rejects them)."""
        text = text.replace("\x00", "").strip()
        if not text:
            return
        start = self._length + (len(SECTION_SEPARATOR) if self._parts else 0)
        end = start + len(text)
        if end > self._max_chars:
            raise UnsafeDocumentError(_too_long(self._max_chars))
        self._parts.append(text)
        self._sections.append(Section(text, start, end, page, heading_path))
        self._length = end

    def build(
        self,
        fmt: Format,
        *,
        page_count: int | None = None,
        title: str | None = None,
        empty_reason: str = "no extractable text",
    ) -> ParsedDocument:
        """The finished document; `EmptyDocumentError` when no block had text."""
        if not self._sections:
            raise EmptyDocumentError(empty_reason)
        text = SECTION_SEPARATOR.join(self._parts)
        return ParsedDocument(fmt, text, tuple(self._sections), page_count, title)


def check_text_size(text: str, limits: ParseLimits) -> None:
    """Refuse text longer than ``limits.max_text_chars``."""
    if len(text) > limits.max_text_chars:
        raise UnsafeDocumentError(_too_long(limits.max_text_chars))


def document_from_source(
    fmt: Format,
    text: str,
    spans: Iterable[tuple[int, int, HeadingPath]],
    *,
    title: str | None = None,
) -> ParsedDocument:
    """A document whose text is the source itself, sections being spans of it.

    Spans are trimmed of surrounding whitespace; empty or out-of-order ones are dropped.
    """
    sections: list[Section] = []
    for raw_start, raw_end, heading_path in spans:
        start, end = strip_span(text, raw_start, raw_end)
        if start < end and (not sections or start >= sections[-1].end):
            sections.append(Section(text[start:end], start, end, None, heading_path))
    if not sections:
        raise EmptyDocumentError("no extractable text")
    return ParsedDocument(fmt, text, tuple(sections), None, title)


def paragraph_spans(text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, end) spans of the blank-line separated paragraphs of ``text[start:end]``."""
    end = len(text) if end is None else end
    for separator in _BLANK_LINE.finditer(text, start, end):
        yield start, separator.start()
        start = separator.end()
    yield start, end


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Move ``start``/``end`` inwards past whitespace (the text itself is untouched)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR become LF, so line-based offsets agree across platforms."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _too_long(max_chars: int) -> str:
    return f"document text is longer than the limit of {max_chars:,} characters"
