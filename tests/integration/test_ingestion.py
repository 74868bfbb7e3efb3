"""Document ingestion end to end: upload API -> outbox -> Dramatiq worker threads ->
parse/chunk/embed -> the tenant's vector store -> retrievable, through the real app."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.db.engine import Database, make_engine
from app.domain.knowledge import unsettled
from app.embeddings import Models, check_vector_size
from app.settings import Settings
from ingestion import parse_document
from retrieval.vectorstore import PointFilter
from tests.files import make_docx, make_docx_bomb, make_html, make_pdf
from tests.support import bearer, create_key, create_tenant

Client = AsyncTestClient[Litestar]
DONE = {"ready", "failed"}


class Tenant:
    """A tenant with an admin+ingest key and one knowledge base."""

    def __init__(self, info: dict[str, Any], key: str, kb: dict[str, Any]) -> None:
        self.info, self.key, self.kb = info, key, kb
        self.headers = bearer(key)
        self.id = uuid.UUID(info["id"])
        self.docs_url = f"/v1/knowledge-bases/{kb['id']}/documents"


async def new_tenant(client: Client, admin: dict[str, str], **fields: Any) -> Tenant:
    info = await create_tenant(client, admin, **fields)
    key = (await create_key(client, admin, info["id"], ["admin", "ingest", "chat"]))["key"]
    resp = await client.post("/v1/knowledge-bases", headers=bearer(key),
                             json={"name": "handbook", "description": "HR"})
    assert resp.status_code == 201, resp.text
    return Tenant(info, key, resp.json())


@pytest.fixture(scope="module")
async def acme(client: Client, admin_headers: dict[str, str]) -> Tenant:
    return await new_tenant(client, admin_headers)


async def upload(t: Tenant, client: Client, files: list[tuple[str, bytes]],
                 **form: str) -> Any:
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    return await client.post(t.docs_url, headers=t.headers, files=parts, data=form)


async def wait_done(client: Client, t: Tenant, doc_id: str, within_s: float = 120) -> Any:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        doc = (await client.get(f"{t.docs_url}/{doc_id}", headers=t.headers)).json()
        if doc["status"] in DONE:
            return doc
        assert asyncio.get_running_loop().time() < deadline, doc
        await asyncio.sleep(0.2)


async def search(client: Client, t: Tenant, query: str, **extra: Any) -> list[dict[str, Any]]:
    resp = await client.post("/v1/retrieve", headers=t.headers,
                             json={"query": query, "top_k": 10, **extra})
    assert resp.status_code == 200, resp.text
    hits: list[dict[str, Any]] = resp.json()["data"]
    return hits


async def test_knowledge_base_crud(client: Client, acme: Tenant) -> None:
    h = acme.headers
    made = (await client.post("/v1/knowledge-bases", headers=h, json={"name": "Policies"})).json()
    assert (await client.post("/v1/knowledge-bases", headers=h,
                              json={"name": "Policies"})).status_code == 409
    listed = (await client.get("/v1/knowledge-bases", headers=h)).json()["data"]
    assert {"Policies", "handbook"} <= {kb["name"] for kb in listed}
    renamed = await client.patch(f"/v1/knowledge-bases/{made['id']}", headers=h,
                                 json={"name": "Policies 2026"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "Policies 2026"
    assert (await client.delete(f"/v1/knowledge-bases/{made['id']}", headers=h)).status_code == 204
    assert (await client.get(f"/v1/knowledge-bases/{made['id']}", headers=h)).status_code == 404


async def test_every_format_is_parsed_chunked_and_searchable(
    client: Client, acme: Tenant, app: Litestar
) -> None:
    files = [
        ("guide.pdf", make_pdf(["Page one talks about onboarding laptops.",
                                "Page two: the VPN passphrase rotates every QUOKKA quarter."])),
        ("policy.docx", make_docx("Travel policy", ["Book trains for trips under PANGOLIN km."],
                                  [["Item", "Limit"], ["Hotel", "150 EUR"]])),
        ("page.html", make_html("Expenses", "Submit receipts within AXOLOTL days.")),
        ("notes.md", b"# Security\n\n## Passwords\n\nRotate every NARWHAL months.\n"),
        ("plain.txt", b"The cafeteria serves OKAPI soup on Fridays.\n"),
    ]
    resp = await upload(acme, client, files, metadata=json.dumps({"team": "hr"}))
    assert resp.status_code == 202, resp.text
    docs = resp.json()["data"]
    assert [d["format"] for d in docs] == ["pdf", "docx", "html", "markdown", "text"]
    assert all(d["status"] == "queued" and not d["duplicate"] for d in docs)
    done = [await wait_done(client, acme, d["id"]) for d in docs]
    assert all(d["status"] == "ready" and d["chunk_count"] >= 1 for d in done), done
    assert all(d["metadata"] == {"team": "hr"} for d in done)
    for word, doc in zip(["QUOKKA", "PANGOLIN", "AXOLOTL", "NARWHAL", "OKAPI"], docs, strict=True):
        hits = await search(client, acme, f"{word}")
        assert hits and hits[0]["document_id"] == doc["id"], (word, hits[:2])
    pdf_hit = (await search(client, acme, "VPN passphrase QUOKKA"))[0]
    assert pdf_hit["page"] == 2
    html_text = " ".join(h["text"] for h in await search(client, acme, "receipts AXOLOTL"))
    assert "SCRIPT-NOISE" not in html_text and "NAV-NOISE" not in html_text
    md_hit = (await search(client, acme, "NARWHAL"))[0]
    assert md_hit["heading_path"] == ["Security", "Passwords"]


async def test_chunk_offsets_point_into_the_extracted_text(client: Client, acme: Tenant) -> None:
    body = "\n\n".join(f"Section {i}. The warehouse code for aisle {i} is W{i * 7}X." * 6
                       for i in range(12)).encode()
    resp = await upload(acme, client, [("long.txt", body)])
    doc = await wait_done(client, acme, resp.json()["data"][0]["id"])
    assert doc["status"] == "ready" and doc["chunk_count"] > 1
    text = parse_document(body, "text").text
    for hit in await search(client, acme, "warehouse code aisle W35X"):
        if hit["document_id"] == doc["id"]:
            assert text[hit["char_start"]:hit["char_end"]] == hit["text"]


async def test_json_and_raw_text_uploads(client: Client, acme: Tenant) -> None:
    resp = await client.post(acme.docs_url, headers=acme.headers, json={
        "text": "Parking permits are issued by the CAPYBARA desk.", "filename": "parking.txt",
        "external_id": "kb-parking", "metadata": {"lang": "en"}})
    assert resp.status_code == 202, resp.text
    raw = await client.post(f"{acme.docs_url}?filename=raw.md", headers={
        **acme.headers, "content-type": "text/markdown"}, content=b"# Raw\n\nTAPIR rules.\n")
    assert raw.status_code == 202, raw.text
    for r in (resp, raw):
        assert (await wait_done(client, acme, r.json()["data"][0]["id"]))["status"] == "ready"
    assert (await search(client, acme, "CAPYBARA desk"))[0]["filename"] == "parking.txt"


async def test_same_bytes_again_is_a_duplicate_and_does_no_work(
    client: Client, acme: Tenant
) -> None:
    data = b"Unique content about the IBEX onboarding checklist.\n"
    first = (await upload(acme, client, [("a.txt", data)])).json()["data"][0]
    await wait_done(client, acme, first["id"])
    again = await upload(acme, client, [("renamed.txt", data)])
    assert again.status_code == 200
    dup = again.json()["data"][0]
    assert dup["duplicate"] is True and dup["id"] == first["id"]
    doc = (await client.get(f"{acme.docs_url}/{first['id']}", headers=acme.headers)).json()
    assert (doc["version"], doc["attempts"], doc["filename"]) == (1, 1, "a.txt")


async def test_new_version_swaps_atomically(
    client: Client, acme: Tenant, app: Litestar, settings: Settings
) -> None:
    def text(code: str) -> bytes:
        return "\n\n".join(f"Clause {i}: the VERSIONED handbook code is {code}-{i}."
                           for i in range(40)).encode()

    v1 = (await upload(acme, client, [("hb.txt", text("OLD"))], external_id="handbook")).json()
    doc_id = v1["data"][0]["id"]
    assert (await wait_done(client, acme, doc_id))["status"] == "ready"
    resp = await upload(acme, client, [("hb.txt", text("NEW"))], external_id="handbook")
    assert resp.status_code == 202
    v2 = resp.json()["data"][0]
    assert (v2["id"], v2["version"], v2["live_version"]) == (doc_id, 2, 1)
    seen: set[int] = set()
    while True:  # watch readers during the swap: never empty, never mixed
        hits = [h for h in await search(client, acme, "VERSIONED handbook code")
                if h["document_id"] == doc_id]
        versions = {h["version"] for h in hits}
        assert len(versions) == 1, versions
        seen |= versions
        doc = (await client.get(f"{acme.docs_url}/{doc_id}", headers=acme.headers)).json()
        if doc["status"] == "ready" and doc["live_version"] == 2:
            break
        await asyncio.sleep(0.05)
    hits = await search(client, acme, "VERSIONED handbook code")
    assert {h["version"] for h in hits if h["document_id"] == doc_id} == {2}
    store = app.state.vector_store
    for _ in range(100):  # old points go once the grace period (1 s here) is over
        if await store.count(acme.id, PointFilter(document_id=uuid.UUID(doc_id), version=1)) == 0:
            break
        await asyncio.sleep(0.1)
    assert await store.count(acme.id, PointFilter(document_id=uuid.UUID(doc_id), version=1)) == 0
    assert await store.count(acme.id, PointFilter(document_id=uuid.UUID(doc_id))) == doc[
        "chunk_count"]
    # Only the live version is stored now, so search no longer special-cases it.
    assert await settles(settings, acme, doc_id)


async def settles(settings: Settings, t: Tenant, target_id: str) -> bool:
    """True once the document or knowledge base leaves search's unsettled set."""
    db = Database(make_engine(settings.database.application_url(), settings.database))
    try:
        for _ in range(100):
            async with db.tenant(t.id) as session:
                found = await unsettled.load(session, None)
            target = uuid.UUID(target_id)
            if target not in found.documents and target not in found.kbs:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await db.close()


async def test_delete_document_is_never_retrieved_again(
    client: Client, acme: Tenant, app: Litestar, settings: Settings
) -> None:
    resp = await upload(acme, client, [("gone.txt", b"The SPRINGBOK code is 4471.\n")])
    doc_id = resp.json()["data"][0]["id"]
    await wait_done(client, acme, doc_id)
    assert any(h["document_id"] == doc_id for h in await search(client, acme, "SPRINGBOK"))
    deleted = await client.delete(f"{acme.docs_url}/{doc_id}", headers=acme.headers)
    assert deleted.status_code == 204
    assert not any(h["document_id"] == doc_id for h in await search(client, acme, "SPRINGBOK"))
    assert (await client.get(f"{acme.docs_url}/{doc_id}", headers=acme.headers)).status_code == 404
    flt = PointFilter(document_id=uuid.UUID(doc_id))
    for _ in range(50):
        if await app.state.vector_store.count(acme.id, flt) == 0:
            break
        await asyncio.sleep(0.1)
    assert await app.state.vector_store.count(acme.id, flt) == 0
    assert await settles(settings, acme, doc_id)


async def test_deleted_knowledge_base_is_hidden_at_once_and_purged(
    client: Client, acme: Tenant, app: Litestar, settings: Settings
) -> None:
    kb = (await client.post("/v1/knowledge-bases", json={"name": "short-lived"},
                            headers=acme.headers)).json()
    other = Tenant(acme.info, acme.key, kb)
    resp = await upload(other, client, [("k.txt", b"The KINKAJOU code is 9.\n")])
    doc_id = resp.json()["data"][0]["id"]
    assert (await wait_done(client, other, doc_id))["status"] == "ready"
    assert await settles(settings, acme, doc_id)  # a first version settles when it is published
    assert any(h["document_id"] == doc_id for h in await search(client, acme, "KINKAJOU"))
    deleted = await client.delete(f"/v1/knowledge-bases/{kb['id']}", headers=acme.headers)
    assert deleted.status_code == 204
    assert not any(h["document_id"] == doc_id for h in await search(client, acme, "KINKAJOU"))
    assert await settles(settings, acme, kb["id"])
    assert await app.state.vector_store.count(
        acme.id, PointFilter(kb_ids=[uuid.UUID(kb["id"])])) == 0


async def test_bad_uploads_are_refused_and_nothing_is_stored(
    client: Client, acme: Tenant
) -> None:
    before = (await client.get(acme.docs_url, headers=acme.headers)).json()["total"]
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    cases = [
        ([("pic.png", png)], {}, 415, "unsupported_media_type"),
        ([("empty.txt", b"")], {}, 422, "invalid_input"),
        ([("ok.txt", b"fine"), ("pic.pdf", png)], {}, 415, "unsupported_media_type"),
        ([("a.txt", b"a"), ("b.txt", b"b")], {"external_id": "x"}, 422, "invalid_input"),
        ([("a.txt", b"a")], {"metadata": "{not json"}, 422, "invalid_input"),
        ([("a.txt", b"a")], {"metadata": "[1, 2]"}, 422, "invalid_input"),
        ([], {}, 422, "invalid_input"),
    ]
    for files, form, status, code in cases:
        resp = await upload(acme, client, files, **form)
        assert resp.status_code == status, (files[:1], form, resp.text)
        assert resp.json()["code"] == code
    big = await upload(acme, client, [("big.txt", b"x" * (50 * 2**20 + 1))])
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    after = (await client.get(acme.docs_url, headers=acme.headers)).json()["total"]
    assert after == before


async def test_unparseable_files_fail_with_a_reason_and_the_worker_keeps_serving(
    client: Client, acme: Tenant
) -> None:
    corrupt_pdf = b"%PDF-1.7\n" + b"garbage that is not a pdf body" * 50
    resp = await upload(acme, client, [("broken.pdf", corrupt_pdf),
                                        ("bomb.docx", make_docx_bomb()),
                                        ("fine.txt", b"The LEMUR room is on floor 3.\n")])
    assert resp.status_code == 202, resp.text
    broken, bomb, fine = [await wait_done(client, acme, d["id"]) for d in resp.json()["data"]]
    assert broken["status"] == "failed" and "Corrupt" in broken["error"], broken
    assert bomb["status"] == "failed" and "Unsafe" in bomb["error"], bomb
    assert broken["attempts"] == 1 and bomb["attempts"] == 1  # permanent: not retried
    assert fine["status"] == "ready"


async def test_quotas_are_enforced_with_the_quota_named(
    client: Client, admin_headers: dict[str, str]
) -> None:
    small = await new_tenant(client, admin_headers, max_documents=1, max_storage_bytes=1000)
    assert (await upload(small, client, [("1.txt", b"one")])).status_code == 202
    resp = await upload(small, client, [("2.txt", b"two")])
    assert resp.status_code == 403
    body = resp.json()
    assert body["code"] == "quota_exceeded" and body["quota"] == "max_documents"
    await client.patch(f"/admin/tenants/{small.info['id']}", headers=admin_headers,
                       json={"max_documents": 10})
    resp = await upload(small, client, [("3.txt", b"x" * 1200)])
    assert resp.status_code == 403 and resp.json()["quota"] == "max_storage_bytes"


async def test_other_tenants_cannot_see_or_touch_documents(
    client: Client, acme: Tenant, admin_headers: dict[str, str]
) -> None:
    resp = await upload(acme, client, [("secret.txt", b"Acme secret: the WOMBAT vault.\n")])
    doc_id = resp.json()["data"][0]["id"]
    await wait_done(client, acme, doc_id)
    other = await new_tenant(client, admin_headers)
    kb_url = f"/v1/knowledge-bases/{acme.kb['id']}"
    for method, url in [("GET", kb_url), ("PATCH", kb_url), ("DELETE", kb_url),
                        ("GET", acme.docs_url), ("GET", f"{acme.docs_url}/{doc_id}"),
                        ("DELETE", f"{acme.docs_url}/{doc_id}")]:
        kwargs: dict[str, Any] = {"json": {"name": "x"}} if method == "PATCH" else {}
        r = await client.request(method, url, headers=other.headers, **kwargs)
        assert r.status_code == 404, (method, url, r.text)
    stolen = await upload(other, client, [("x.txt", b"x")])
    assert stolen.status_code == 202  # into its own KB ...
    r = await client.post(acme.docs_url, headers=other.headers, files=[("file", ("x", b"y"))])
    assert r.status_code == 404  # ... never into Acme's
    assert await search(client, other, "Acme secret: the WOMBAT vault.") == []
    r = await client.post("/v1/retrieve", headers=other.headers,
                          json={"query": "WOMBAT", "knowledge_base_ids": [acme.kb["id"]]})
    assert r.status_code == 404
    assert (await search(client, acme, "WOMBAT vault"))[0]["document_id"] == doc_id


def test_a_model_that_does_not_fit_the_store_is_refused_at_start(models: Models) -> None:
    check_vector_size(models, 384)
    with pytest.raises(ValueError, match="QDRANT_DENSE_DIM=384"):
        check_vector_size(models, 768)
