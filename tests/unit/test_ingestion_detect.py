"""Format detection: content decides, names and declared types only break ties."""

from __future__ import annotations

import io
import time
import tracemalloc
import zipfile
from collections.abc import Callable

import pytest

from ingestion import EmptyDocumentError, UnsafeDocumentError, UnsupportedFormatError, detect_format
from ingestion.zipdir import entry_count
from tests.files import make_zip_directory
from tests.unit.test_ingestion_samples import HTML, MARKDOWN, SAMPLES, TEXT, make_zip

PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06"
ELF_HEADER = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00\x01\x00\x00\x00" + bytes(40)


def test_a_pdf_named_txt_is_a_pdf() -> None:
    pdf, _ = SAMPLES["pdf"]
    assert detect_format(pdf, "notes.txt", "text/plain") == "pdf"


def test_text_named_pdf_is_not_trusted_to_be_a_pdf() -> None:
    assert detect_format(TEXT, "report.pdf", "application/pdf") == "text"


def test_a_docx_is_detected_by_its_word_document_entry() -> None:
    docx_bytes, _ = SAMPLES["docx"]
    assert detect_format(docx_bytes, "upload.bin", "application/octet-stream") == "docx"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (PNG_HEADER, "image/png"),
        (ELF_HEADER, "executable"),
        (make_zip(["readme.txt", "src/main.c"]), "ZIP archive"),
        (make_zip(["[Content_Types].xml", "xl/workbook.xml"]), "Excel"),
        (bytes(range(256)) * 4, "binary"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(1024), "legacy Microsoft Office"),
        (b"{\\rtf1\\ansi Hello}", "RTF"),
    ],
    ids=["png", "elf", "plain-zip", "xlsx", "random-binary", "ole2-doc", "rtf"],
)
def test_other_files_are_unsupported_and_the_message_names_them(data: bytes, named: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=named):
        detect_format(data, "document.docx")


def test_a_damaged_zip_named_docx_goes_to_the_parser_to_be_failed_as_corrupt() -> None:
    docx_bytes, _ = SAMPLES["docx"]
    truncated = docx_bytes[: len(docx_bytes) // 2]
    assert detect_format(truncated, "contract.docx") == "docx"
    with pytest.raises(UnsupportedFormatError, match="ZIP"):
        detect_format(truncated)


def test_zero_bytes_is_empty() -> None:
    with pytest.raises(EmptyDocumentError):
        detect_format(b"", "empty.txt")


def test_html_is_sniffed_from_content() -> None:
    assert detect_format(HTML) == "html"
    assert detect_format(b"  <p>Just a fragment</p>", "fragment.txt") == "html"
    assert detect_format(b"<?xml version='1.0'?>\n<html><body>x</body></html>") == "html"


def test_markdown_is_recognised_by_its_signals_or_its_extension() -> None:
    assert detect_format(MARKDOWN) == "markdown"
    assert detect_format(b"Plain words only.", "notes.md") == "markdown"
    assert detect_format(b"Plain words only.", None, "text/markdown; charset=utf-8") == "markdown"
    assert detect_format(b"Plain words only.\n\nNothing marked up.") == "text"


def test_markdown_opening_with_inline_html_stays_markdown() -> None:
    readme = b'<div align="center"><img src="logo.png"></div>\n\n# Project\n\nText.\n'
    assert detect_format(readme, "README.md") == "markdown"


def test_an_explicit_txt_extension_keeps_markdown_signals_as_text() -> None:
    assert detect_format(b"# not a heading, a comment\nvalue = 1\n", "config.txt") == "text"


def test_json_counts_as_text_even_when_it_contains_markdown() -> None:
    data = b'{"readme": "# Title\\n\\nSee [docs](https://example.com)"}'
    assert detect_format(data) == "text"


@pytest.mark.parametrize(
    "data",
    [
        "Café crème, naïve façade.".encode("utf-16"),
        b"\xef\xbb\xbf" + "Café crème".encode(),
        ("Café crème brûlée à la française, déjà vu. " * 20).encode("cp1252"),
    ],
    ids=["utf-16-bom", "utf-8-bom", "cp1252"],
)
def test_text_in_other_encodings_is_still_text(data: bytes) -> None:
    assert detect_format(data) == "text"


@pytest.mark.parametrize("data", [
    b"<!-- -->" * 5000 + b"x",  # comments, then no tag: backtracking was exponential
    b"<!--" * 12_000,
    b"[" * 100_000 + b"]" * 100_000,  # nested beyond what json decodes; quadratic link scan
    b"[a" * 20_000,  # link texts that never close: each scanned to the end of the line
], ids=["closed-comments", "open-comments", "nested-brackets", "open-links"])  # fmt: skip
def test_text_built_to_make_detection_slow_is_detected_at_once(data: bytes) -> None:
    started = time.perf_counter()
    assert detect_format(data) == "text"
    assert time.perf_counter() - started < 0.5  # detection runs in the upload request


def test_a_large_file_that_is_not_utf8_is_judged_from_a_sample() -> None:
    binary = bytes(range(256)) * (50 * 2**20 // 256)  # 50 MiB, the upload limit
    legacy = ("Café crème brûlée à la française, déjà vu. " * 200_000).encode("cp1252")
    started = time.perf_counter()
    with pytest.raises(UnsupportedFormatError, match="binary"):
        detect_format(binary)
    assert detect_format(legacy) == "text"
    assert time.perf_counter() - started < 2  # a guess over all of it took 6 s


def measured(work: Callable[[], object]) -> tuple[object, int]:
    """What ``work`` returned or raised, and the most memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        try:
            outcome = work()
        except Exception as exc:  # the caller asserts on it
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("records", "claimed"), [(1000, 10_000_000), (100_000, 1)],
                         ids=["claims-ten-million", "claims-one-holds-100k"])
def test_a_zip_directory_over_the_entry_bound_is_refused_before_it_is_listed(
    records: int, claimed: int
) -> None:
    data = make_zip_directory(records, claimed)
    refusal, peak = measured(lambda: detect_format(data, "many.docx"))
    assert isinstance(refusal, UnsafeDocumentError), refusal
    assert f"{max(records, claimed):,} entries" in str(refusal)
    assert "the limit is 10,000" in str(refusal)
    # zipfile listing 100k records allocated ~35 MB (a ZipInfo each) and took seconds.
    assert peak < 2**20
    assert entry_count(data) == max(records, claimed)


def test_a_real_docx_counts_its_own_entries() -> None:
    docx_bytes, _ = SAMPLES["docx"]
    assert entry_count(docx_bytes) == len(zipfile.ZipFile(io.BytesIO(docx_bytes)).namelist())
    assert entry_count(b"PK\x03\x04 not really a zip") is None


def test_json_is_sniffed_from_a_prefix_not_decoded_whole() -> None:
    data = ("[" + ",".join(f'{{"n": {i}, "see": "[docs](https://x.y)"}}'
                           for i in range(200_000)) + "]").encode()
    detected, peak = measured(lambda: detect_format(data, "dump.bin"))
    assert detected == "text"  # JSON, despite its markdown links
    # Decoding all of it built 200k dicts, ten times the file; now the text alone.
    assert peak < 2 * len(data)


@pytest.mark.parametrize("data", [
    b'[{"a": "[x](y)"}, {"a": 2} oops, ' + b'{"a": 3}, ' * 20_000 + b"]",
    b'{"k": "[x](y)"} trailing text ' + b"# Heading [x](y) " * 10_000 + b"}",
], ids=["broken-early", "json-then-prose"])  # fmt: skip
def test_long_text_that_only_looks_like_json_is_judged_by_its_prefix(data: bytes) -> None:
    assert detect_format(data) == "markdown"
