"""Which of our formats a file is, judged by its content before its name."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import PurePosixPath
from typing import Literal

import filetype  # type: ignore[import-untyped]

from ingestion.document import Format
from ingestion.encoding import decode_declared, decode_guessed
from ingestion.errors import EmptyDocumentError, UnsupportedFormatError

_Hint = Literal["docx", "html", "markdown", "text"]

_EXTENSION_HINTS: dict[str, _Hint] = {
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".mdown": "markdown",
    ".mkd": "markdown",
    ".txt": "text",
    ".text": "text",
    ".json": "text",
    ".csv": "text",
    ".log": "text",
}
_TYPE_HINTS: dict[str, _Hint] = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/plain": "text",
    "application/json": "text",
    "text/csv": "text",
}

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# Formats people upload by mistake that filetype does not name (or that decode as text).
_KNOWN_UNSUPPORTED = (
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Microsoft Office file (.doc/.xls/.ppt)"),
    (b"{\\rtf", "an RTF document"),
)
_SNIFF_CHARS = 16_384
# Detection runs in the upload request: an encoding is guessed from this much of a file
# that is not UTF-8 (a guess over the whole of a 50 MB file takes seconds).
_GUESS_BYTES = 256 * 1024
# Leading comments, each ending at its first "-->": a lazy ".*?" here could also span
# several comments, and backtracking over every way to split them took exponential time
# (30 empty comments before a non-tag: minutes).
_LEADING = r"\A\s*(?:<\?xml[^>]*>\s*)?(?:<!--(?:(?!-->).)*-->\s*)*"
# The WHATWG MIME-sniffing "HTML" patterns, after an optional XML declaration and comments.
_HTML_START = re.compile(
    _LEADING + r"<(?:!doctype\s+html|html|head|body|script|iframe|h1|div|font|table|a"
    r"|style|title|b|br|p|meta)(?=[\s/>])",
    re.IGNORECASE | re.DOTALL,
)
_HTML_DOCUMENT_START = re.compile(
    _LEADING + r"<(?:!doctype\s+html|html)(?=[\s/>])", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<(?:html|head|body|p|div|h[1-6])(?=[\s/>])", re.IGNORECASE)
# ATX headings, code fences, inline links: signals that plain prose would not carry.
# Bounded runs: from each "[" of "[[[[..." an unbounded scan would make this quadratic.
_MARKDOWN_SIGNAL = re.compile(
    r"^ {0,3}(?:#{1,6}[ \t]+\S|```|~~~)|\[[^\]\n]{1,300}\]\([^)\s]{1,2000}\)", re.MULTILINE
)


def detect_format(
    data: bytes, filename: str | None = None, declared_type: str | None = None
) -> Format:
    """Detect the format of ``data`` from its content; name and type only break ties.

    Raises `EmptyDocumentError` for 0 bytes and `UnsupportedFormatError` (naming what
    was found) for anything that is not PDF, DOCX, HTML, Markdown or text. A damaged
    ZIP is reported as "docx" only when the name or type says DOCX, so that parsing
    fails it as corrupt.
    """
    if not data:
        raise EmptyDocumentError("the file is empty (0 bytes)")
    hint = _hint(filename, declared_type)
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(_ZIP_MAGICS):
        return _zip_format(data, hint)
    for magic, name in _KNOWN_UNSUPPORTED:
        if data.startswith(magic):
            raise UnsupportedFormatError(f"unsupported file type: {name}")
    text = decode_declared(data)
    if text is None:
        kind = filetype.guess(data)
        if kind is not None:
            raise UnsupportedFormatError(f"unsupported file type: {kind.mime} (.{kind.extension})")
        text = decode_guessed(data[:_GUESS_BYTES])  # the parser decodes all of it
    if text is None:
        raise UnsupportedFormatError(
            "unsupported binary data: not PDF, DOCX, HTML, Markdown or text"
        )
    return _text_format(text, hint)


def _hint(filename: str | None, declared_type: str | None) -> _Hint | None:
    """What the name (preferred) or the declared media type suggest."""
    if filename:
        suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
        if suffix in _EXTENSION_HINTS:
            return _EXTENSION_HINTS[suffix]
    if declared_type:
        return _TYPE_HINTS.get(declared_type.split(";")[0].strip().lower())
    return None


def _zip_format(data: bytes, hint: _Hint | None) -> Format:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if hint == "docx":
            return "docx"
        raise UnsupportedFormatError("damaged or unreadable ZIP archive") from exc
    if "word/document.xml" in names:
        return "docx"
    raise UnsupportedFormatError(f"unsupported file type: {_zip_kind(names)}")


def _zip_kind(names: set[str]) -> str:
    if any(name.startswith("xl/") for name in names):
        return "an Excel workbook (XLSX)"
    if any(name.startswith("ppt/") for name in names):
        return "a PowerPoint presentation (PPTX)"
    if "mimetype" in names:
        return "an OpenDocument or EPUB file"
    return "a ZIP archive that is not a Word document"


def _text_format(text: str, hint: _Hint | None) -> Format:
    head = text[:_SNIFF_CHARS]
    # Markdown may open with inline HTML (<div align=center>); a whole page may not.
    if _HTML_START.match(head) and (hint != "markdown" or _HTML_DOCUMENT_START.match(head)):
        return "html"
    if hint == "html" and _HTML_TAG.search(head):
        return "html"
    if hint in ("markdown", "text"):
        return hint
    if _is_json(text):
        return "text"
    return "markdown" if _MARKDOWN_SIGNAL.search(head) else "text"


def _is_json(text: str) -> bool:
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return False
    try:
        json.loads(stripped)
    except (ValueError, RecursionError):  # "[[[[...": nested deeper than json decodes
        return False
    return True
