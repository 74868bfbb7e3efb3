"""Real sample documents for the ingestion tests, made with the libraries that make them.

The builders live here so the detect, parse and chunk tests share one set of files;
the tests in this module check that each sample is what it claims to be.
"""

from __future__ import annotations

import io
import json
import random
import zipfile

import docx
import pytest
from pypdf import PdfReader, PdfWriter

from ingestion import Format, detect_format
from tests.files import make_docx_bomb, make_pdf

PAGE_TOPICS = ("apples", "bridges", "comets")


def pdf_pages(count: int = 3, sentences: int = 20) -> list[str]:
    """Page texts that each name their page, so a chunk's page can be checked."""
    return [
        " ".join(
            f"Page {number} is about {PAGE_TOPICS[(number - 1) % 3]}, sentence {i}."
            for i in range(sentences)
        )
        for number in range(1, count + 1)
    ]


def make_encrypted_pdf(user_password: str) -> bytes:
    """The 3-page sample, encrypted (RC4: pypdf decrypts it without extra libraries)."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pdf_pages()))))
    writer.encrypt(user_password, owner_password="owner-secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def make_docx() -> bytes:
    """Title, two heading levels, paragraphs and a table (python-docx)."""
    document = docx.Document()
    document.add_heading("Employee Handbook", 0)
    document.add_heading("Leave", 1)
    document.add_paragraph("Everyone gets twenty-five days of paid leave each year.")
    document.add_heading("Parental leave", 2)
    document.add_paragraph("Parents get sixteen weeks, paid in full.")
    document.add_heading("Equipment", 1)
    document.add_paragraph("Laptops are replaced every three years.")
    table = document.add_table(rows=3, cols=2)
    for row, (item, owner) in enumerate([("Item", "Owner"), ("Laptop", "IT"), ("Desk", "Ops")]):
        table.cell(row, 0).text = item
        table.cell(row, 1).text = owner
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


HTML = b"""<!DOCTYPE html>
<html><head><title>Widget Guide</title>
<script>var tracking = "SCRIPT-SECRET";</script><style>.nav { color: red }</style></head>
<body>
<nav><a href="/">Home</a> <a href="/pricing">NAV-LINK-TEXT</a></nav>
<h1>Widget Guide</h1>
<p>Widgets turn <b>gears</b> into motion.</p>
<h2>Installation</h2>
<p>Unpack the widget and bolt it down.</p>
<ul><li>Check the bolts</li><li>Oil the gears</li></ul>
<h3>On Linux</h3>
<pre>sudo widgetctl   install
  --force</pre>
<h2>Pricing</h2>
<table><tr><th>Plan</th><th>Price</th></tr><tr><td>Basic</td><td>10</td></tr></table>
<div hidden>HIDDEN-TEXT</div>
<footer>FOOTER-TEXT</footer>
<script>console.log("SCRIPT-TWO")</script>
</body></html>
"""

MARKDOWN = b"""---
title: front matter is metadata
---
# Operations Manual

Welcome to the manual. See [the wiki](https://wiki.example.com) for more.

## Deploying

Deploys happen on Tuesdays.

### Rollback

- Revert the release tag
- Re-run the pipeline

```python
def rollback(tag: str) -> None:
    run("git", "revert", tag)
```

## Monitoring

| Metric | Alert |
|--------|-------|
| p99    | 2 s   |
"""

TEXT = (
    b"Shipping policy\n\nOrders ship within two days.\r\nReturns are free.\n\n\n"
    b"Questions: write to support@example.com.\n"
)

JSON_TEXT = json.dumps(
    {"faq": [{"q": f"Question {i}?", "a": f"Answer number {i}."} for i in range(40)]},
    indent=2,
).encode()


def long_paragraph(words: int = 1500, seed: int = 7) -> str:
    """Prose with sentence punctuation, long enough to need several chunks."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    vocabulary = [
        "tenant", "index", "vector", "query", "latency", "replica", "shard", "quota",
        "upload", "parser", "chunk", "embedding", "citation", "model", "token", "budget",
        "stream", "retry", "worker", "queue",
    ]  # fmt: skip
    sentences = []
    while words > 0:
        length = rng.randint(6, 18)
        sentences.append(" ".join(rng.choice(vocabulary) for _ in range(length)).capitalize())
        words -= length
    return ". ".join(sentences) + "."


def markdown_with_long_section() -> bytes:
    """A heading with one paragraph far over any chunk budget, then a short section."""
    return (
        f"# Guide\n\n## Details\n\n{long_paragraph()}\n\n## Summary\n\nShort summary.\n"
    ).encode()


def make_zip(names: list[str]) -> bytes:
    """A small ZIP archive with the given member names."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, "content")
    return buffer.getvalue()


SAMPLES: dict[str, tuple[bytes, Format]] = {
    "pdf": (make_pdf(pdf_pages()), "pdf"),
    "docx": (make_docx(), "docx"),
    "html": (HTML, "html"),
    "markdown": (MARKDOWN, "markdown"),
    "text": (TEXT, "text"),
    "text-bom": (b"\xef\xbb\xbf" + TEXT, "text"),
    "json": (JSON_TEXT, "text"),
    "long-markdown": (markdown_with_long_section(), "markdown"),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_each_sample_is_detected_as_its_format_without_a_name(name: str) -> None:
    data, expected = SAMPLES[name]
    assert detect_format(data) == expected


def test_the_zip_bomb_is_small_on_disk_but_declares_300_mib() -> None:
    bomb = make_docx_bomb()
    assert len(bomb) < 2 * 2**20
    with zipfile.ZipFile(io.BytesIO(bomb)) as archive:
        assert archive.getinfo("word/document.xml").file_size == 300 * 2**20
