"""HTML: lxml's HTML parser (libxml2), walked block by block; boilerplate dropped."""

from __future__ import annotations

import re
from typing import Any

from lxml import etree  # type: ignore[import-untyped]

from ingestion.document import HeadingTrail, ParsedDocument, SectionBuilder
from ingestion.encoding import decode_text
from ingestion.errors import EmptyDocumentError, UnsafeDocumentError, corrupt_on_error
from ingestion.limits import ParseLimits

# Never content: code, styling, navigation and page chrome, form controls, embeds.
_DROPPED = frozenset(
    {
        "head", "script", "style", "noscript", "template", "nav", "footer", "aside",
        "form", "button", "select", "option", "textarea", "iframe", "object", "embed",
        "svg", "math", "canvas", "audio", "video", "dialog",
    }
)  # fmt: skip
# Tags that end the running block of text (inline tags like <a>, <b>, <span> do not).
_BLOCKS = frozenset(
    {
        "html", "body", "main", "article", "section", "header", "div", "p", "pre",
        "blockquote", "address", "figure", "figcaption", "ul", "ol", "li", "dl", "dt", "dd",
        "table", "caption", "thead", "tbody", "tfoot", "tr", "hr", "br", "details",
        "summary", "center", "h1", "h2", "h3", "h4", "h5", "h6",
    }
)  # fmt: skip
_CELLS = frozenset({"td", "th"})
_HEADING = re.compile(r"h([1-6])")
_WHITESPACE = re.compile(r"\s+")
_FEED_CHARS = 65_536


def parse_html(data: bytes, limits: ParseLimits) -> ParsedDocument:
    """Sections per block element; h1-h6 build the heading path."""
    root = _parse_tree(decode_text(data), limits)
    walker = _BlockWalker(SectionBuilder(limits))
    with corrupt_on_error("HTML"):
        walker.walk(root)
    return walker.builder.build("html", title=_title(root))


def _parse_tree(text: str, limits: ParseLimits) -> Any:
    """Parse with lxml, refusing documents nested deeper than ``limits.max_html_depth``.

    The pull parser reports elements as it builds them, so a deep document is
    refused after the first too-deep element, not after the whole tree is built.
    ``huge_tree`` lifts libxml2's silent flattening at depth 256 (it still stops at
    2048), so that our own limit is the one that applies.
    """
    if not text.strip():
        raise EmptyDocumentError("HTML file has no content")
    parser = etree.HTMLPullParser(
        events=("start", "end"), huge_tree=True, remove_comments=True, remove_pis=True
    )
    depth = 0
    with corrupt_on_error("HTML"):
        for offset in range(0, len(text), _FEED_CHARS):
            parser.feed(text[offset : offset + _FEED_CHARS])
            depth = _track_depth(parser.read_events(), depth, limits.max_html_depth)
        root = parser.close()
        _track_depth(parser.read_events(), depth, limits.max_html_depth)
    if root is None:
        raise EmptyDocumentError("HTML has no content")
    return root


def _track_depth(events: Any, depth: int, max_depth: int) -> int:
    for event, _ in events:
        depth += 1 if event == "start" else -1
        if depth > max_depth:
            raise UnsafeDocumentError(f"HTML is nested deeper than {max_depth} elements")
    return depth


class _BlockWalker:
    """Turns start/end events of the tree into text blocks and heading paths."""

    def __init__(self, builder: SectionBuilder) -> None:
        self.builder = builder
        self._trail = HeadingTrail()
        self._parts: list[str] = []
        self._pre_depth = 0

    def walk(self, root: Any) -> None:
        events = etree.iterwalk(root, events=("start", "end"))
        for event, element in events:
            tag = element.tag if isinstance(element.tag, str) else ""
            if event == "start" and (tag in _DROPPED or _hidden(element)):
                events.skip_subtree()
                self._parts.append(" ")  # its tail is still the parent's text
            elif event == "start":
                self._start(tag, element.text)
            else:
                self._end(tag, element.tail)

    def _start(self, tag: str, text: str | None) -> None:
        if tag in _BLOCKS:
            self._flush()
            if tag == "pre":
                self._pre_depth += 1
        elif tag in _CELLS and "".join(self._parts).strip():
            self._parts.append(" | ")
        self._parts.append(text or "")

    def _end(self, tag: str, tail: str | None) -> None:
        if tag in _BLOCKS:
            heading = _HEADING.fullmatch(tag)
            self._flush(int(heading.group(1)) if heading else None)
            if tag == "pre":
                self._pre_depth -= 1
        elif tag in _CELLS:
            self._parts.append(" ")
        self._parts.append(tail or "")

    def _flush(self, heading_level: int | None = None) -> None:
        """End the running block: add it as a section (a heading also moves the path)."""
        text = "".join(self._parts)
        self._parts = []
        if self._pre_depth == 0:
            text = _WHITESPACE.sub(" ", text).strip()
        if heading_level is not None and text:
            self.builder.add(text, heading_path=self._trail.enter(heading_level, text))
        else:
            self.builder.add(text, heading_path=self._trail.path)


def _hidden(element: Any) -> bool:
    attributes = element.attrib
    return (
        "hidden" in attributes
        or attributes.get("aria-hidden") == "true"
        or attributes.get("role") == "navigation"
    )


def _title(root: Any) -> str | None:
    title = root.findtext(".//title")
    return _WHITESPACE.sub(" ", title).strip() or None if isinstance(title, str) else None
