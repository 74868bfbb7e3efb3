"""Parsing every format into text with sections, and refusing bad files."""

from __future__ import annotations

import time

import pytest

from ingestion import (
    CorruptDocumentError,
    EmptyDocumentError,
    ParsedDocument,
    ParseLimits,
    UnsafeDocumentError,
    detect_format,
    parse_document,
)
from tests.files import make_docx_bomb, make_pdf
from tests.unit.test_ingestion_samples import (
    HTML,
    JSON_TEXT,
    MARKDOWN,
    SAMPLES,
    TEXT,
    make_encrypted_pdf,
    pdf_pages,
)


def parsed(name: str) -> ParsedDocument:
    data, fmt = SAMPLES[name]
    return parse_document(data, fmt)


@pytest.mark.parametrize("name", SAMPLES)
def test_sections_are_exact_ordered_spans_of_the_text(name: str) -> None:
    doc = parsed(name)
    assert doc.sections
    previous_end = 0
    for section in doc.sections:
        assert doc.text[section.start : section.end] == section.text
        assert section.text == section.text.strip() != ""
        assert section.start >= previous_end
        previous_end = section.end


def test_pdf_text_keeps_its_page_numbers() -> None:
    doc = parsed("pdf")
    assert doc.format == "pdf" and doc.page_count == 3
    assert {section.page for section in doc.sections} == {1, 2, 3}
    for section in doc.sections:
        assert f"Page {section.page} is about" in section.text
        assert "Page 2" not in section.text or section.page == 2


def test_docx_headings_become_the_heading_path_and_tables_become_rows() -> None:
    doc = parsed("docx")
    paths = {section.text: section.heading_path for section in doc.sections}
    assert doc.title == "Employee Handbook"
    assert paths["Parents get sixteen weeks, paid in full."] == ("Leave", "Parental leave")
    assert paths["Laptops are replaced every three years."] == ("Equipment",)
    assert paths["Item | Owner"] == ("Equipment",)
    assert paths["Laptop | IT"] == ("Equipment",)
    assert paths["Parental leave"] == ("Leave", "Parental leave")


def test_html_keeps_content_and_headings_and_drops_scripts_nav_and_chrome() -> None:
    doc = parsed("html")
    for hidden in ("SCRIPT-SECRET", "SCRIPT-TWO", "NAV-LINK-TEXT", "FOOTER-TEXT", "HIDDEN-TEXT"):
        assert hidden not in doc.text
    paths = {section.text: section.heading_path for section in doc.sections}
    assert doc.title == "Widget Guide"
    assert paths["Widgets turn gears into motion."] == ("Widget Guide",)
    assert paths["Oil the gears"] == ("Widget Guide", "Installation")
    assert paths["sudo widgetctl   install\n  --force"] == (
        "Widget Guide",
        "Installation",
        "On Linux",
    )
    assert paths["Plan | Price"] == ("Widget Guide", "Pricing")


def test_markdown_text_is_the_source_and_sections_follow_its_blocks() -> None:
    doc = parsed("markdown")
    assert doc.text == MARKDOWN.decode()
    paths = {section.text: section.heading_path for section in doc.sections}
    code = '```python\ndef rollback(tag: str) -> None:\n    run("git", "revert", tag)\n```'
    assert paths[code] == ("Operations Manual", "Deploying", "Rollback")
    assert paths["- Re-run the pipeline"] == ("Operations Manual", "Deploying", "Rollback")
    assert paths["## Monitoring"] == ("Operations Manual", "Monitoring")
    assert doc.title == "Operations Manual"
    assert not any("front matter" in section.text for section in doc.sections)


def test_text_is_decoded_with_newlines_normalized_and_split_into_paragraphs() -> None:
    for name in ("text", "text-bom"):
        doc = parsed(name)
        assert doc.text == TEXT.decode().replace("\r\n", "\n")
        assert [section.text for section in doc.sections] == [
            "Shipping policy",
            "Orders ship within two days.\nReturns are free.",
            "Questions: write to support@example.com.",
        ]


def test_json_is_parsed_as_text() -> None:
    doc = parse_document(JSON_TEXT, detect_format(JSON_TEXT, "faq.json"))
    assert doc.format == "text" and doc.text == JSON_TEXT.decode()


def test_legacy_encodings_are_decoded() -> None:
    data = ("Café crème brûlée à la française, déjà vu. " * 20).encode("cp1252")
    assert parse_document(data, "text").text.startswith("Café crème brûlée")


@pytest.mark.parametrize(
    "data",
    [make_pdf(pdf_pages())[:1200], b"%PDF-1.7\n" + b"\x13\x37garbage" * 100],
    ids=["truncated", "garbage"],
)
def test_a_corrupt_pdf_is_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptDocumentError, match="PDF"):
        parse_document(data, "pdf")


def test_a_password_protected_pdf_is_corrupt_with_a_clear_reason() -> None:
    with pytest.raises(CorruptDocumentError, match="encrypted"):
        parse_document(make_encrypted_pdf(user_password="secret"), "pdf")


def test_a_pdf_encrypted_with_an_empty_user_password_opens() -> None:
    doc = parse_document(make_encrypted_pdf(user_password=""), "pdf")
    assert doc.page_count == 3 and "Page 3 is about comets" in doc.text


def test_a_pdf_over_the_page_limit_is_unsafe() -> None:
    pdf, _ = SAMPLES["pdf"]
    with pytest.raises(UnsafeDocumentError, match="3 pages"):
        parse_document(pdf, "pdf", ParseLimits(max_pages=2))


def test_a_docx_zip_bomb_is_refused_from_its_directory_without_inflating() -> None:
    bomb = make_docx_bomb()
    assert detect_format(bomb, "bomb.docx") == "docx"
    started = time.perf_counter()
    with pytest.raises(UnsafeDocumentError, match="inflate"):
        parse_document(bomb, "docx")
    with pytest.raises(UnsafeDocumentError, match="compression ratio"):
        parse_document(bomb, "docx", ParseLimits(max_zip_uncompressed_bytes=2**40))
    assert time.perf_counter() - started < 0.5


def test_a_docx_with_too_many_entries_is_unsafe() -> None:
    docx_bytes, _ = SAMPLES["docx"]
    with pytest.raises(UnsafeDocumentError, match="entries"):
        parse_document(docx_bytes, "docx", ParseLimits(max_zip_entries=5))


def test_a_damaged_docx_is_corrupt() -> None:
    docx_bytes, _ = SAMPLES["docx"]
    with pytest.raises(CorruptDocumentError):
        parse_document(docx_bytes[: len(docx_bytes) // 2], "docx")


def test_html_nested_5000_levels_deep_is_unsafe() -> None:
    deep = ("<div>" * 5000 + "bottom" + "</div>" * 5000).encode()
    with pytest.raises(UnsafeDocumentError, match="nested"):
        parse_document(deep, detect_format(deep))


def test_html_within_the_depth_limit_is_parsed() -> None:
    nested = ("<div>" * 300 + "bottom" + "</div>" * 300).encode()
    assert parse_document(nested, "html").text == "bottom"


def test_text_over_the_character_limit_is_unsafe() -> None:
    with pytest.raises(UnsafeDocumentError, match="longer"):
        parse_document(b"word " * 1000, "text", ParseLimits(max_text_chars=100))
    with pytest.raises(UnsafeDocumentError, match="longer"):
        parse_document(HTML, "html", ParseLimits(max_text_chars=50))


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"", "text"),
        (b"  \n\n\t \r\n  ", "text"),
        (b"\n\n   \n", "markdown"),
        (b"<html><head><script>x()</script></head><body>  </body></html>", "html"),
        (b"   ", "html"),
        (make_pdf(["", ""]), "pdf"),
    ],
    ids=["zero-bytes", "whitespace-text", "whitespace-markdown", "script-only-html",
         "blank-html", "blank-pdf"],
)  # fmt: skip
def test_documents_without_text_are_empty(data: bytes, fmt: str) -> None:
    with pytest.raises(EmptyDocumentError):
        parse_document(data, fmt)  # type: ignore[arg-type]


def test_binary_bytes_declared_as_text_are_corrupt() -> None:
    with pytest.raises(CorruptDocumentError, match="UTF-8"):
        parse_document(bytes(range(256)) * 4, "text")
