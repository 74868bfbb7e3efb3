"""Which of our formats a file is, judged by its content before its name."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import PurePosixPath
from typing import Literal

import filetype  # type: ignore[import-untyped]

from ingestion.document import Format
from ingestion.encoding import decode_declared, decode_guessed
from ingestion.errors import EmptyDocumentError, UnsupportedFormatError
from ingestion.limits import DEFAULT_LIMITS
from ingestion.zipdir import open_bounded

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
# JSON is recognised from a prefix this long (see _is_json); "\uXXXX" cut at the end of
# the prefix errs up to this many characters before it.
_JSON_SNIFF_CHARS = 65_536
_JSON_TAIL_SLACK = 8
_JSON_CLOSE = {"{": "}", "[": "]"}
_NON_SPACE = re.compile(r"\S")
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

    Raises `EmptyDocumentError` for 0 bytes, `UnsafeDocumentError` for a ZIP whose
    directory holds more entries than ``DEFAULT_LIMITS.max_zip_entries``, and
    `UnsupportedFormatError` (naming what was found) for anything that is not PDF, DOCX,
    HTML, Markdown or text. A damaged
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
        # Bounded before zipfile lists the directory (UnsafeDocumentError above it).
        with open_bounded(data, DEFAULT_LIMITS.max_zip_entries) as archive:
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
    """JSON, judged from its first ``_JSON_SNIFF_CHARS`` characters: a whole document
    is decoded only when it is that short (a 50 MB array would cost seconds and a
    gigabyte of objects); a longer one must match at both ends and decode, as far as
    the prefix goes, without an error before the prefix runs out."""
    first = _NON_SPACE.search(text)
    if first is None or not text.startswith(("{", "["), first.start()):
        return False
    start = first.start()
    if len(text) - start > _JSON_SNIFF_CHARS:
        tail = text[-_JSON_SNIFF_CHARS:].rstrip()
        if not tail or tail[-1] != _JSON_CLOSE[text[start]]:
            return False
        return _valid_json_prefix(text[start:start + _JSON_SNIFF_CHARS])
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # "[[[[...": nested deeper than json decodes
        return False
    return True


def _valid_json_prefix(prefix: str) -> bool:
    """True if ``prefix`` could start a JSON document: decoding it fails only because it
    ends (an unterminated string, or an error within its last few characters)."""
    try:
        json.loads(prefix)
    except json.JSONDecodeError as exc:
        return (exc.msg.startswith("Unterminated string")
                or exc.pos >= len(prefix) - _JSON_TAIL_SLACK)
    except RecursionError:
        return False
    return False  # a complete document in the prefix, followed by more text
