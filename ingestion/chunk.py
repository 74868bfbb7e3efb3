"""Token-aware chunks that follow the document's structure and keep source offsets."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from semchunk.semchunk import chunkerify

from ingestion.document import HeadingPath, ParsedDocument, Section, strip_span
from ingestion.tokens import TokenCounter, WordSumCounter, count_all, load_token_counter

__all__ = [
    "DEFAULT_CHUNKING",
    "Chunk",
    "ChunkingConfig",
    "TokenCounter",
    "chunk_document",
    "load_token_counter",
]

# Below this a single character may not fit (byte-level tokenizers use up to 4 per char).
_MIN_MAX_TOKENS = 8


@dataclass(frozen=True)
class Chunk:
    """A piece of a document to embed: ``text == parsed.text[start:end]``."""

    index: int
    text: str
    start: int
    end: int
    page: int | None
    heading_path: HeadingPath
    token_count: int


@dataclass(frozen=True)
class ChunkingConfig:
    """Chunk size and the overlap between consecutive pieces of one long section."""

    max_tokens: int = 200
    overlap_tokens: int = 30

    def __post_init__(self) -> None:
        if self.max_tokens < _MIN_MAX_TOKENS:
            raise ValueError(f"max_tokens must be at least {_MIN_MAX_TOKENS}")
        if not 0 <= self.overlap_tokens < self.max_tokens:
            raise ValueError("overlap_tokens must be in [0, max_tokens)")


DEFAULT_CHUNKING = ChunkingConfig()


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    page: int | None
    heading_path: HeadingPath


def chunk_document(
    doc: ParsedDocument, counter: TokenCounter, config: ChunkingConfig = DEFAULT_CHUNKING
) -> list[Chunk]:
    """Split ``doc`` into chunks of at most ``config.max_tokens`` tokens.

    Consecutive small sections with the same page and heading path are packed into one
    chunk; a chunk never crosses a page or heading-path change. A section over the
    budget is split with semchunk, its pieces overlapping by ``config.overlap_tokens``.
    Chunks are trimmed of surrounding whitespace by moving their offsets, never by
    editing their text.
    """
    estimate = WordSumCounter(counter)
    estimate.learn(section.text for section in doc.sections)
    splitter = _SpanSplitter(doc.text, counter, estimate, config)
    counts = [estimate(section.text) for section in doc.sections]
    spans: list[_Span] = []
    for group in _same_place_runs(doc.sections, counts):
        spans.extend(_pack(group, config.max_tokens, splitter))
    fitted = splitter.fit(spans)
    return [
        Chunk(
            index,
            doc.text[span.start : span.end],
            span.start,
            span.end,
            span.page,
            span.heading_path,
            tokens,
        )
        for index, (span, tokens) in enumerate(fitted)
    ]


def _same_place_runs(
    sections: Sequence[Section], counts: Sequence[int]
) -> Iterator[list[tuple[Section, int]]]:
    """Runs of consecutive sections that share a page and a heading path."""
    pairs = zip(sections, counts, strict=True)
    for _, run in itertools.groupby(pairs, key=lambda pair: (pair[0].page, pair[0].heading_path)):
        yield list(run)


def _pack(
    run: Iterable[tuple[Section, int]], max_tokens: int, splitter: _SpanSplitter
) -> Iterator[_Span]:
    """Greedily pack small sections; split the ones that are over budget on their own.

    An over-budget section is split together with the small sections pending before
    it, so a heading stays with the text it introduces. Section counts are estimates
    and packing ignores the blank lines between sections; `_SpanSplitter.fit` counts
    every final chunk exactly, so an estimate that is off is caught there.
    """
    packed: list[Section] = []
    packed_tokens = 0
    for section, tokens in run:
        if tokens > max_tokens:
            yield from splitter.split(_span_of([*packed[:1], section]), overlap=True)
            packed, packed_tokens = [], 0
            continue
        if packed and packed_tokens + tokens > max_tokens:
            yield _span_of(packed)
            packed, packed_tokens = [], 0
        packed.append(section)
        packed_tokens += tokens
    if packed:
        yield _span_of(packed)


def _span_of(sections: Sequence[Section]) -> _Span:
    first, last = sections[0], sections[-1]
    return _Span(first.start, last.end, first.page, first.heading_path)


class _SpanSplitter:
    """semchunk over spans of one document's text, plus the final budget check."""

    def __init__(
        self, text: str, counter: TokenCounter, estimate: TokenCounter, config: ChunkingConfig
    ) -> None:
        self._text = text
        self._counter = counter
        self._max_tokens = config.max_tokens
        self._overlap = config.overlap_tokens or None
        # memoize=False: semchunk's own cache is global and unbounded.
        self._chunker = chunkerify(estimate, config.max_tokens, memoize=False)

    def split(self, span: _Span, *, overlap: bool) -> list[_Span]:
        """Pieces of ``span`` within the budget (per semchunk), trimmed, non-empty."""
        piece = self._text[span.start : span.end]
        _, offsets = cast(
            "tuple[list[str], list[tuple[int, int]]]",
            self._chunker(piece, offsets=True, overlap=self._overlap if overlap else None),
        )
        return self._trimmed(span, ((span.start + s, span.start + e) for s, e in offsets))

    def fit(self, spans: Sequence[_Span]) -> list[tuple[_Span, int]]:
        """Each span with its token count; spans over budget are split again."""
        counts = count_all(self._counter, [self._text[s.start : s.end] for s in spans])
        fitted: list[tuple[_Span, int]] = []
        for span, tokens in zip(spans, counts, strict=True):
            if tokens <= self._max_tokens or span.end - span.start <= 1:
                fitted.append((span, tokens))
            else:
                fitted.extend(self.fit(self._smaller(span)))
        # Re-split overlapping pieces could otherwise come out of start order.
        return sorted(fitted, key=lambda item: (item[0].start, item[0].end))

    def _smaller(self, span: _Span) -> list[_Span]:
        """Split without overlap; halve if semchunk cannot make progress."""
        pieces = self.split(span, overlap=False)
        if pieces and (len(pieces) > 1 or pieces[0] != span):
            return pieces
        middle = (span.start + span.end) // 2
        return self._trimmed(span, [(span.start, middle), (middle, span.end)])

    def _trimmed(self, parent: _Span, bounds: Iterable[tuple[int, int]]) -> list[_Span]:
        spans = []
        for raw_start, raw_end in bounds:
            start, end = strip_span(self._text, raw_start, raw_end)
            if start < end:
                spans.append(_Span(start, end, parent.page, parent.heading_path))
        return spans
