"""Ingestion failures, one class per way a document can be refused.

The messages are meant for a knowledge-base admin: they say what was wrong with the
file, never how the code works. Callers map the classes to outcomes (HTTP status,
retry or permanent failure); nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class IngestionError(Exception):
    """Base class: the document cannot be turned into text; the message says why."""


class UnsupportedFormatError(IngestionError):
    """The bytes are not one of the supported formats (PDF, DOCX, HTML, Markdown, text)."""


class EmptyDocumentError(IngestionError):
    """The file is empty or has no extractable text."""


class CorruptDocumentError(IngestionError):
    """The file claims a supported format but cannot be parsed; retrying will not help."""


class UnsafeDocumentError(IngestionError):
    """The file is over a safety limit (zip bomb, nesting, page or text size)."""


@contextmanager
def corrupt_on_error(what: str) -> Iterator[None]:
    """Turn any failure of a third-party parser into `CorruptDocumentError`.

    Parsing libraries raise many unrelated exception types on malformed input
    (KeyError, ValueError, their own errors...); for us they all mean the same thing:
    the file is unreadable, so the worker must fail it once instead of retrying.
    """
    try:
        yield
    except (IngestionError, MemoryError):
        raise
    except Exception as exc:
        raise CorruptDocumentError(f"unreadable {what}: {short(exc)}") from exc


def short(exc: BaseException, limit: int = 200) -> str:
    """An exception's message (or its type's name), at most ``limit`` characters."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
