"""Safety limits applied while parsing untrusted documents."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ParseLimits:
    """Upper bounds that keep one hostile file from exhausting a worker.

    - ``max_pages``: PDF pages.
    - ``max_zip_uncompressed_bytes`` / ``max_zip_ratio`` / ``max_zip_entries``: checked
      on a DOCX's ZIP directory before anything is inflated.
    - ``max_html_depth``: element nesting depth of HTML. lxml (libxml2) itself stops
      nesting at 2048 levels, so values above that cannot be enforced.
    - ``max_text_chars``: characters of extracted text.
    """

    max_pages: int = 2000
    max_zip_uncompressed_bytes: int = 200 * 2**20
    max_zip_ratio: float = 100.0
    max_zip_entries: int = 10_000
    max_html_depth: int = 400
    max_text_chars: int = 20_000_000

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"ParseLimits.{field.name} must be positive")


DEFAULT_LIMITS = ParseLimits()
