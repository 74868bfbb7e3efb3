"""Bytes -> str for the text-based formats (plain text, Markdown, HTML)."""

from __future__ import annotations

import codecs
import re

import charset_normalizer

from ingestion.errors import CorruptDocumentError

# Longest BOMs first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

# C0 controls other than tab, newline, vertical tab, form feed, carriage return and escape.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
_SAMPLE_CHARS = 65_536
_MAX_CONTROL_RATIO = 0.01
_WESTERN_CHAOS_MARGIN = 0.15


def decode_text(data: bytes) -> str:
    """Decode text: BOM, else UTF-8, else a charset guess; `CorruptDocumentError` if none fits."""
    text = decode_declared(data)
    if text is None:
        text = decode_guessed(data)
    if text is None:
        raise CorruptDocumentError("not valid UTF-8 text (nor another recognisable encoding)")
    return text


def decode_declared(data: bytes) -> str | None:
    """Decode by BOM or as strict UTF-8; None when that fails or the result looks binary."""
    codec = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return None
    return None if looks_binary(text) else text


def decode_guessed(data: bytes) -> str | None:
    """Decode with charset_normalizer's best guess (legacy code pages); None if unsure."""
    matches = charset_normalizer.from_bytes(data)
    best = matches.best()
    if best is None:
        return None
    # On short texts the pick among near-equally plausible Latin code pages is close to
    # arbitrary; unlabelled legacy text is most often Windows-1252 (the WHATWG default).
    western = next((match for match in matches if match.encoding == "cp1252"), None)
    if western is not None and western.chaos <= best.chaos + _WESTERN_CHAOS_MARGIN:
        best = western
    text = str(best)
    return None if looks_binary(text) else text


def looks_binary(text: str) -> bool:
    """True for NULs or more than a trace of control characters: not a text document."""
    if "\x00" in text:
        return True
    sample = text[:_SAMPLE_CHARS]
    controls = len(_CONTROL.findall(sample))
    return controls > _MAX_CONTROL_RATIO * max(len(sample), 1)
