"""Hostile uploads through the real API and worker threads: each ends ``failed`` with a
reason an admin can read, at its first attempt, while another tenant's document uploaded
at the same time ends ``ready``, and the API answers other requests meanwhile."""

from __future__ import annotations

import asyncio
import io
import zipfile

from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.files import make_docx_bomb, make_pdf, make_pdf_bomb, make_spinning_pdf
from tests.integration.test_ingestion import new_tenant, search, upload, wait_done
from tests.support import concurrent_client, served_over_http

Client = AsyncTestClient[Litestar]


async def test_hostile_files_fail_with_a_reason_and_other_tenants_are_served(
    client: Client, admin_headers: dict[str, str], settings: Settings
) -> None:
    attacker = await new_tenant(client, admin_headers)
    neighbour = await new_tenant(client, admin_headers)
    timeout = settings.ingest.parse_timeout_s
    hostile = {  # file name: what its admin reads in the document's error
        "bomb.pdf": f"parsing needed more than {settings.ingest.parse_memory_mb} MiB of memory",
        "spin.pdf": f"parsing took longer than {timeout:g} s",
        "deep.html": "HTML is nested deeper than 400 elements",
        "bomb.docx": "DOCX would inflate to 314,572,808 bytes",
        "broken.pdf": "unreadable PDF",
    }
    files = {"bomb.pdf": make_pdf_bomb(), "spin.pdf": make_spinning_pdf(),
             "deep.html": ("<div>" * 100_000 + "deep" + "</div>" * 100_000).encode(),
             "bomb.docx": make_docx_bomb(),
             "broken.pdf": make_pdf(["A page that is cut short."])[:600]}
    sent = await upload(attacker, client, list(files.items()))
    assert sent.status_code == 202, sent.text
    fine = await upload(neighbour, client, [("parking.md", b"# Parking\n\n"
                                             b"The QUOLL garage opens at 7.\n")])
    assert fine.status_code == 202, fine.text

    started = asyncio.get_running_loop().time()
    ready = await wait_done(client, neighbour, fine.json()["data"][0]["id"], within_s=60)
    assert ready["status"] == "ready" and ready["chunk_count"] == 1, ready
    assert (await search(client, neighbour, "QUOLL garage"))[0]["filename"] == "parking.md"
    docs = [await wait_done(client, attacker, d["id"], within_s=timeout + 60)
            for d in sent.json()["data"]]
    for doc in docs:
        assert doc["status"] == "failed", doc
        assert doc["error"].startswith("UnsafeDocumentError" if "broken" not in doc["filename"]
                                       else "CorruptDocumentError"), doc
        assert hostile[doc["filename"]] in doc["error"], doc
        assert doc["attempts"] == 1, doc  # permanent: not retried
    assert asyncio.get_running_loop().time() - started < timeout + 30
    # the worker threads are all still there for the next file
    again = await upload(attacker, client, [("after.txt", b"The WALLABY desk is on floor 2.\n")])
    assert (await wait_done(client, attacker, again.json()["data"][0]["id"]))["status"] == "ready"


def many_entry_docx(entries: int = 400_000) -> bytes:
    """A ZIP with a Word document entry and ``entries`` empty files (about 35 MB): slow to
    even list, and over the DOCX entry limit."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("word/document.xml", "<w:document/>")
        for i in range(entries):
            archive.writestr(str(i), b"")
    return buffer.getvalue()


async def test_the_api_keeps_answering_while_a_hostile_upload_is_checked(
    app: Litestar, client: Client, admin_headers: dict[str, str]
) -> None:
    t = await new_tenant(client, admin_headers)
    data = await asyncio.to_thread(many_entry_docx)
    async with served_over_http(app, client) as url, concurrent_client(url) as http:
        sending = asyncio.ensure_future(http.post(
            t.docs_url, headers=t.headers, files=[("file", ("big.docx", data, "x"))]))
        slowest = 0.0
        while not sending.done():
            started = asyncio.get_running_loop().time()
            assert (await http.get("/healthz")).status_code == 200
            slowest = max(slowest, asyncio.get_running_loop().time() - started)
            await asyncio.sleep(0.05)
        sent = await sending
    # Refused at upload from the ZIP's central directory count, before zipfile lists it
    # (it once was accepted and failed in the worker after seconds of listing).
    assert sent.status_code == 422, sent.text
    assert "400,001 entries" in sent.json()["detail"], sent.text
    assert slowest < 1.0  # checking the file did not hold the event loop
    listed = await client.get(t.docs_url, headers=t.headers)
    assert listed.json()["total"] == 0  # nothing stored
