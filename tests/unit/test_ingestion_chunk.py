"""Chunking: exact offsets, token budgets, structure boundaries, overlap, speed."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from ingestion import (
    Chunk,
    ChunkingConfig,
    ParsedDocument,
    TokenizerCounter,
    chunk_document,
    load_token_counter,
    parse_document,
)
from tests.unit.test_ingestion_samples import SAMPLES, long_paragraph


@pytest.fixture(scope="module")
def counter() -> TokenizerCounter:
    return load_token_counter()


def parsed(name: str) -> ParsedDocument:
    data, fmt = SAMPLES[name]
    return parse_document(data, fmt)


def assert_chunk_invariants(
    doc: ParsedDocument, chunks: list[Chunk], counter: TokenizerCounter, max_tokens: int
) -> None:
    """What every consumer relies on, whatever the input."""
    assert chunks, "a document with text yields at least one chunk"
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert doc.text[chunk.start : chunk.end] == chunk.text
        assert chunk.text.strip() == chunk.text != ""
        assert chunk.token_count == counter(chunk.text) <= max_tokens
        for section in doc.sections:
            if section.start < chunk.end and chunk.start < section.end:
                assert (section.page, section.heading_path) == (chunk.page, chunk.heading_path)
    starts = [chunk.start for chunk in chunks]
    assert starts == sorted(starts)


@pytest.mark.parametrize("max_tokens", [64, 200])
@pytest.mark.parametrize("name", SAMPLES)
def test_chunks_of_every_format_keep_the_invariants(
    name: str, max_tokens: int, counter: TokenizerCounter
) -> None:
    doc = parsed(name)
    chunks = chunk_document(doc, counter, ChunkingConfig(max_tokens, overlap_tokens=16))
    assert_chunk_invariants(doc, chunks, counter, max_tokens)


@pytest.mark.parametrize("name", SAMPLES)
def test_no_text_of_any_section_is_lost(name: str, counter: TokenizerCounter) -> None:
    doc = parsed(name)
    covered = bytearray(len(doc.text))
    for chunk in chunk_document(doc, counter, ChunkingConfig(max_tokens=64, overlap_tokens=8)):
        covered[chunk.start : chunk.end] = b"\x01" * (chunk.end - chunk.start)
    for section in doc.sections:
        for offset in range(section.start, section.end):
            assert covered[offset] or doc.text[offset].isspace()


def test_pdf_chunks_carry_the_page_their_text_is_on(counter: TokenizerCounter) -> None:
    chunks = chunk_document(parsed("pdf"), counter, ChunkingConfig(max_tokens=64))
    assert {chunk.page for chunk in chunks} == {1, 2, 3}
    for chunk in chunks:
        other_pages = {1, 2, 3} - {chunk.page}
        assert not any(f"Page {page} " in chunk.text for page in other_pages)


def test_small_sections_under_one_heading_are_packed_together(
    counter: TokenizerCounter,
) -> None:
    chunks = chunk_document(parsed("markdown"), counter)
    rollback = [chunk for chunk in chunks if chunk.heading_path[-1:] == ("Rollback",)]
    assert len(rollback) == 1
    assert rollback[0].text.startswith("### Rollback\n\n- Revert the release tag")
    assert rollback[0].text.endswith("```")


def test_a_long_section_is_split_into_overlapping_pieces(counter: TokenizerCounter) -> None:
    doc = parsed("long-markdown")
    config = ChunkingConfig(max_tokens=128, overlap_tokens=24)
    chunks = chunk_document(doc, counter, config)
    pieces = [chunk for chunk in chunks if chunk.heading_path == ("Guide", "Details")]
    assert len(pieces) >= 5
    for before, after in itertools.pairwise(pieces):
        assert after.start < before.end, "consecutive pieces share text"
        assert 0 < counter(doc.text[after.start : before.end]) <= config.overlap_tokens
    assert_chunk_invariants(doc, chunks, counter, config.max_tokens)


def test_without_overlap_pieces_do_not_overlap(counter: TokenizerCounter) -> None:
    doc = parsed("long-markdown")
    chunks = chunk_document(doc, counter, ChunkingConfig(max_tokens=128, overlap_tokens=0))
    for before, after in itertools.pairwise(chunks):
        assert before.end <= after.start


def test_a_smaller_budget_gives_more_smaller_chunks(counter: TokenizerCounter) -> None:
    doc = parsed("long-markdown")
    small = chunk_document(doc, counter, ChunkingConfig(max_tokens=64, overlap_tokens=8))
    large = chunk_document(doc, counter, ChunkingConfig(max_tokens=200, overlap_tokens=8))
    assert len(small) > 2 * len(large)
    assert max(chunk.token_count for chunk in small) <= 64
    assert max(chunk.token_count for chunk in large) > 64


def varied_text(seed: int) -> str:
    """Text with awkward content: long words, CJK, emoji, URLs, code, odd spacing."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    pieces = [
        long_paragraph(rng.randint(20, 400), seed),
        "x" * rng.randint(50, 3000),
        "数据检索增强生成系统" * rng.randint(1, 80),
        "🙂 emoji  spacing\t\ttabs " * rng.randint(1, 30),
        "https://example.com/" + "/".join(str(i) for i in range(rng.randint(5, 400))),
        "def f(x):\n    return [i ** 2 for i in range(x)]\n" * rng.randint(1, 40),
        "",
        " \n ",
    ]
    rng.shuffle(pieces)
    return "\n\n".join(pieces)


@pytest.mark.parametrize("seed", range(6))
def test_invariants_hold_on_awkward_text(seed: int, counter: TokenizerCounter) -> None:
    data = varied_text(seed).encode()
    for config in (ChunkingConfig(64, 16), ChunkingConfig(200, 30), ChunkingConfig(16, 4)):
        for fmt in ("text", "markdown"):
            doc = parse_document(data, fmt)
            chunks = chunk_document(doc, counter, config)
            assert_chunk_invariants(doc, chunks, counter, config.max_tokens)


def test_any_plain_callable_works_as_a_counter() -> None:
    def count_words(text: str) -> int:
        return len(text.split())

    doc = parsed("long-markdown")
    chunks = chunk_document(doc, count_words, ChunkingConfig(max_tokens=50, overlap_tokens=10))
    assert len(chunks) > 10
    assert all(count_words(chunk.text) == chunk.token_count <= 50 for chunk in chunks)
    assert all(doc.text[chunk.start : chunk.end] == chunk.text for chunk in chunks)


def test_token_counts_exclude_special_tokens(counter: TokenizerCounter) -> None:
    assert counter("") == 0
    assert counter("hello world") == 2


@pytest.mark.parametrize(("max_tokens", "overlap"), [(4, 0), (64, 64), (64, -1)])
def test_nonsense_configs_are_refused(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="tokens"):
        ChunkingConfig(max_tokens, overlap)


def test_chunking_a_megabyte_takes_seconds_not_minutes(counter: TokenizerCounter) -> None:
    text = "\n\n".join(long_paragraph(words=180, seed=seed) for seed in range(900))
    text += "\n\n" + long_paragraph(words=20_000, seed=1)  # one section far over budget
    doc = parse_document(text.encode(), "text")
    assert len(doc.text) > 1_000_000
    started = time.perf_counter()
    chunks = chunk_document(doc, counter)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"chunking 1 MB took {elapsed:.1f} s"
    assert all(chunk.token_count <= 200 for chunk in chunks)
