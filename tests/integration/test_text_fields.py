"""Control characters are refused where they arrive: every text field that reaches
storage answers a 4xx problem+json naming the field, before any work is done, instead
of a 200 whose usage event cannot be stored (or a 500 from the database). Single-line
fields (end users, names, filenames, ids, metadata keys) refuse every control
character; free text (descriptions, metadata values) keeps tab and newline (real
PostgreSQL and Redis; the fake vLLM server generates)."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.settings import Settings
from tests.fake_openai import FakeServer
from tests.support import (
    UNLIMITED,
    bearer,
    create_key,
    create_tenant,
    owner_rows,
)

Client = AsyncTestClient[Litestar]


def refused(resp: Any, field: str) -> None:
    """A 4xx problem+json that names ``field`` (in its errors, or its detail)."""
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    keys = [e.get("key", "") for e in body.get("errors", [])]
    assert any(k == field or k.startswith(f"{field}.") for k in keys) \
        or field in body["detail"], body
    assert "control character" in resp.text or "surrogate" in resp.text, body


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}], **extra}


@pytest.mark.parametrize("user", ["\u0000", "ann\u0000", "a\tb", "a\nb", "\u0085x", "\u007f"])
async def test_an_end_user_with_a_control_character_is_refused_before_generation(
    client: Client, admin_headers: dict[str, str], settings: Settings, routed: None,
    fake: FakeServer, user: str,
) -> None:
    tenant = await create_tenant(client, admin_headers, **UNLIMITED)
    key = bearer((await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"])
    before = fake.app.stats.requests
    resp = await client.post("/v1/chat/completions", headers=key,
                             json=chat(user=user, store=False))
    refused(resp, "user")
    assert fake.app.stats.requests == before  # nothing generated, so nothing unbilled
    # The same request with a plain end user is answered and metered.
    ok = await client.post("/v1/chat/completions", headers=key,
                           json=chat(user="ann", store=False))
    assert ok.status_code == 200, ok.text
    assert [r["end_user"] for r in await owner_rows(settings, "usage_events", tenant["id"])] \
        == ["ann"]


@pytest.mark.parametrize("content", ["hi\u0000", [{"type": "text", "text": "a\u0001b"}]])
async def test_message_text_with_a_control_character_is_refused_before_generation(
    client: Client, admin_headers: dict[str, str], routed: None, fake: FakeServer,
    content: Any,
) -> None:
    tenant = await create_tenant(client, admin_headers, **UNLIMITED)
    key = bearer((await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"])
    before = fake.app.stats.requests
    resp = await client.post("/v1/chat/completions", headers=key, json=chat(
        messages=[{"role": "user", "content": content}]))
    refused(resp, "messages")
    assert fake.app.stats.requests == before
    # Tab, newline and carriage return are text.
    ok = await client.post("/v1/chat/completions", headers=key, json=chat(
        store=False, messages=[{"role": "user", "content": "a\tb\r\nc"}]))
    assert ok.status_code == 200, ok.text


async def test_an_embed_token_for_an_end_user_with_a_control_character_is_not_minted(
    client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    kb = (await client.post("/v1/knowledge-bases", headers=admin, json={"name": "kb"})).json()
    backend = bearer((await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"])
    resp = await client.post("/v1/embed-tokens", headers=backend,
                             json={"user": "ann\r\nbob", "knowledge_base_ids": [kb["id"]]})
    refused(resp, "user")


async def test_names_of_tenants_keys_and_knowledge_bases_refuse_control_characters(
    client: Client, admin_headers: dict[str, str],
) -> None:
    refused(await client.post("/admin/tenants", headers=admin_headers,
                              json={"slug": "nul-name", "name": "Acme\u0000"}), "name")
    tenant = await create_tenant(client, admin_headers)
    refused(await client.post(f"/admin/tenants/{tenant['id']}/keys", headers=admin_headers,
                              json={"name": "ci\u001b[31m", "scopes": ["chat"]}), "name")
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    refused(await client.post("/v1/knowledge-bases", headers=admin,
                              json={"name": "docs\u0000"}), "name")
    refused(await client.post("/v1/knowledge-bases", headers=admin,
                              json={"name": "docs", "description": "a\u0000b"}), "description")
    # Free text keeps its tabs and newlines.
    kb = await client.post("/v1/knowledge-bases", headers=admin,
                           json={"name": "docs", "description": "line one\n\tline two"})
    assert kb.status_code == 201, kb.text
    assert kb.json()["description"] == "line one\n\tline two"


async def test_document_filenames_ids_and_metadata_refuse_control_characters(
    client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    kb = (await client.post("/v1/knowledge-bases", headers=admin, json={"name": "kb"})).json()
    docs = f"/v1/knowledge-bases/{kb['id']}/documents"
    text = {"text": "hello world"}
    for body, field in (({**text, "metadata": {"team": "ops\u0000"}}, "metadata"),
                        ({**text, "metadata": {"te\nam": "ops"}}, "metadata"),
                        ({**text, "filename": "a\u0007.txt"}, "filename"),
                        ({**text, "external_id": "x\ty"}, "external_id")):
        refused(await client.post(docs, headers=admin, json=body), field)
    # Multipart: metadata as a JSON string (a lone surrogate escaped in it), a text field.
    files = {"file": ("a.txt", b"hello world", "text/plain")}
    refused(await client.post(docs, headers=admin, files=files,
                              data={"metadata": '{"team": "\\ud800"}'}), "metadata")
    refused(await client.post(docs, headers=admin, files=files,
                              data={"external_id": "doc\u0001"}), "external_id")
    refused(await client.post(f"{docs}?filename=a%00.txt", headers={
        **admin, "Content-Type": "text/plain"}, content=b"hello"), "filename")
    listed = await client.get(docs, headers=admin)
    assert listed.status_code == 200 and listed.json()["total"] == 0  # nothing stored


async def test_content_rules_refuse_control_characters_in_terms_patterns_and_disclaimer(
    client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    url = "/v1/tenant/content-rules"
    refused(await client.put(url, headers=admin, json={"blocked_terms": ["sec\u0000ret"]}),
            "blocked_terms")
    refused(await client.put(url, headers=admin, json={"blocked_patterns": ["a\u0000b"]}),
            "blocked_patterns")
    refused(await client.put(url, headers=admin, json={"disclaimer": "note\u0007"}),
            "disclaimer")
    kept = await client.put(url, headers=admin, json={"disclaimer": "line one\nline two"})
    assert kept.status_code == 200, kept.text
    assert kept.json()["disclaimer"] == "line one\nline two"
