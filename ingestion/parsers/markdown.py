"""Markdown: block structure from markdown-it-py tokens, text kept as the source.

The document text is the Markdown source itself (decoded, newlines normalized), and
each section is the exact source lines of one leaf block (paragraph, heading, code
block, table, HTML block). So chunk offsets point straight into the uploaded file and
a citation can highlight the original; the cost is that chunks carry Markdown
syntax (``#``, ``-``, backticks), which embedding models handle well.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from itertools import accumulate

from markdown_it import MarkdownIt
from markdown_it.token import Token

from ingestion.document import (
    HeadingPath,
    HeadingTrail,
    ParsedDocument,
    check_text_size,
    document_from_source,
    normalize_newlines,
)
from ingestion.encoding import decode_text
from ingestion.limits import ParseLimits

_LEAF_BLOCKS = frozenset(
    {"paragraph_open", "heading_open", "fence", "code_block", "html_block", "table_open"}
)
# YAML front matter: not CommonMark, and it would parse as a rule plus a setext heading.
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(?:.*\n)*?(?:---|\.\.\.)[ \t]*(?:\n|\Z)")


def parse_markdown(data: bytes, limits: ParseLimits) -> ParsedDocument:
    """Sections are leaf blocks; ATX and setext headings build the heading path."""
    text = normalize_newlines(decode_text(data))
    check_text_size(text, limits)
    tokens = _markdown_parser().parse(_blank_front_matter(text))
    spans = list(_block_spans(tokens, _line_starts(text)))
    title = next((path[0] for _, _, path in spans if path), None)
    return document_from_source("markdown", text, spans, title=title)


def _markdown_parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


def _blank_front_matter(text: str) -> str:
    """Replace front matter by as many empty lines, so line numbers stay the same."""
    match = _FRONT_MATTER.match(text)
    if match is None:
        return text
    return "\n" * match.group().count("\n") + text[match.end() :]


def _line_starts(text: str) -> list[int]:
    """Offset where each line starts, plus len(text) as the end of the last line."""
    starts = list(accumulate((len(line) + 1 for line in text.split("\n")), initial=0))
    starts[-1] = len(text)  # the last line has no newline after it
    return starts


def _block_spans(
    tokens: Sequence[Token], line_starts: list[int]
) -> Iterator[tuple[int, int, HeadingPath]]:
    trail = HeadingTrail()
    last_line = len(line_starts) - 1
    for index, token in enumerate(tokens):
        if token.type not in _LEAF_BLOCKS or token.map is None:
            continue
        first, end = token.map
        path = trail.path
        if token.type == "heading_open":
            path = trail.enter(int(token.tag[1:]), _inline_text(tokens[index + 1]))
        yield line_starts[min(first, last_line)], line_starts[min(end, last_line)], path


def _inline_text(token: Token) -> str:
    """Plain text of a heading's inline token (emphasis and link markup dropped)."""
    children = token.children or []
    text = "".join(child.content for child in children if child.type in ("text", "code_inline"))
    return " ".join((text or token.content).split())
