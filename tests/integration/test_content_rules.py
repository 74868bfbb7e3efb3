"""A tenant's content rules: a blocklist (terms and regular expressions) checked on the
user's message before any work and on the answer as it streams (a hit ends the answer
with a refusal notice and is recorded), and a disclaimer added to every answer. Real
PostgreSQL and Redis; the fake vLLM server writes the answer "w0 w1 w2 ..."."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.domain.chat.content import INPUT_REFUSAL, OUTPUT_REFUSAL
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import (
    UNLIMITED,
    bearer,
    concurrent_client,
    create_key,
    create_tenant,
    one_pool,
    owner_rows,
    routed_through,
    served_over_http,
)

Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=8, itl_s=0.01)) as server:
        yield server


@pytest.fixture(scope="module")
async def base_url(app: Litestar, client: Client, settings: Settings,
                   fake: FakeServer) -> AsyncIterator[str]:
    async with (routed_through(app, client, one_pool(fake.base_url), settings),
                served_over_http(app, client) as url):
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with concurrent_client(base_url) as c:
        yield c


class Tenant:
    def __init__(self, info: dict[str, Any], chat: dict[str, str], admin: dict[str, str]):
        self.info, self.chat, self.admin = info, chat, admin


async def tenant_with_rules(client: Client, admin_headers: dict[str, str],
                            http: httpx.AsyncClient, **rules: Any) -> Tenant:
    info = await create_tenant(client, admin_headers, **UNLIMITED)
    chat = bearer((await create_key(client, admin_headers, info["id"], ["chat"]))["key"])
    admin = bearer((await create_key(client, admin_headers, info["id"], ["admin"]))["key"])
    resp = await http.put("/v1/tenant/content-rules", headers=admin, json=rules)
    assert resp.status_code == 200, resp.text
    return Tenant(info, chat, admin)


def body(content: str = "where do visitors sign in?", **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "max_tokens": 16, "retrieval": {"enabled": False},
            "user": "ann", "messages": [{"role": "user", "content": content}], **extra}


async def streamed(http: httpx.AsyncClient, headers: dict[str, str],
                   **extra: Any) -> tuple[str, list[str | None]]:
    """The streamed answer's text and the finish reasons seen."""
    text, reasons = [], []
    async with http.stream("POST", "/v1/chat/completions", headers=headers,
                           json=body(stream=True, **extra)) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    text.append(choice["delta"].get("content") or "")
                    reasons.append(choice.get("finish_reason"))
    return "".join(text), [r for r in reasons if r]


async def test_a_blocked_message_is_refused_before_any_work_and_recorded(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    t = await tenant_with_rules(client, admin_headers, http, blocked_terms=["Project Falcon"])
    sent = fake.stats.requests
    resp = await http.post("/v1/chat/completions", headers=t.chat,
                           json=body("When does project falcon launch?"))
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == INPUT_REFUSAL
    assert choice["finish_reason"] == "content_filter"
    text, reasons = await streamed(http, t.chat, messages=[
        {"role": "user", "content": "PROJECT FALCON details please"}])
    assert text == INPUT_REFUSAL and reasons == ["content_filter"]
    assert fake.stats.requests == sent  # nothing was generated
    # A blocked message earlier in the same request is caught too.
    earlier = await http.post("/v1/chat/completions", headers=t.chat, json=body(messages=[
        {"role": "user", "content": "Tell me about Project Falcon."},
        {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Go on"}]))
    assert earlier.json()["choices"][0]["finish_reason"] == "content_filter"
    # A word that merely contains the term is not a hit.
    ok = await http.post("/v1/chat/completions", headers=t.chat,
                         json=body("Is project falconry a hobby?"))
    assert ok.json()["choices"][0]["finish_reason"] != "content_filter"
    hits = (await http.get("/v1/tenant/content-rules/hits", headers=t.admin)).json()
    assert [(h["direction"], h["rule"], h["end_user"]) for h in hits["data"]] == [
        ("input", "term:Project Falcon", "ann")] * 3
    statuses = [r["status"] for r in await owner_rows(settings, "usage_events", t.info["id"])]
    assert statuses.count("content_blocked") == 3


async def test_refused_messages_still_count_against_the_rate_limit(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    t = await tenant_with_rules(client, admin_headers, http, blocked_terms=["falcon"])
    blocked = body("falcon?")
    assert (await http.post("/v1/chat/completions", headers=t.chat, json=blocked)).status_code \
        == 200
    limited = await tenant_with_rules(client, admin_headers, http, blocked_terms=["falcon"])
    await client.patch(f"/admin/tenants/{limited.info['id']}", headers=admin_headers,
                       json={"rpm_limit": 1})
    first = await http.post("/v1/chat/completions", headers=limited.chat, json=blocked)
    second = await http.post("/v1/chat/completions", headers=limited.chat, json=blocked)
    assert first.status_code == 200 and second.status_code == 429


async def test_a_blocked_answer_stops_mid_stream_and_never_shows_the_term(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings,
) -> None:
    # The fake writes "w0 w1 w2 w3 ..." one word per chunk: the pattern spans two
    # chunks, so the first half must be held back until the second decides.
    t = await tenant_with_rules(client, admin_headers, http, blocked_patterns=[r"w4\s+w5"])
    text, reasons = await streamed(http, t.chat)
    assert text.startswith("w0 w1 w2 w3") and "w4" not in text and "w5" not in text
    assert text.endswith(OUTPUT_REFUSAL) and reasons == ["content_filter"]
    whole = (await http.post("/v1/chat/completions", headers=t.chat, json=body())).json()
    assert whole["choices"][0]["message"]["content"] == OUTPUT_REFUSAL
    assert whole["choices"][0]["finish_reason"] == "content_filter"
    hits = (await http.get("/v1/tenant/content-rules/hits", headers=t.admin)).json()["data"]
    assert [(h["direction"], h["rule"]) for h in hits] == [("output", r"pattern:w4\s+w5")] * 2
    usage = await owner_rows(settings, "usage_events", t.info["id"])
    assert [r["status"] for r in usage] == ["content_blocked"] * 2
    assert usage[0]["completion_tokens"] >= 5  # what was generated is still metered
    # The stored conversation holds what the user saw, not the withheld words.
    stored = await owner_rows(settings, "conversation_messages", t.info["id"])
    answers = [m["content"] for m in stored if m["role"] == "assistant"]
    assert answers and all("w5" not in a for a in answers)


async def test_the_disclaimer_ends_every_answer_and_rules_are_per_tenant(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    note = "Answers may be wrong; check the handbook."
    t = await tenant_with_rules(client, admin_headers, http, disclaimer=note,
                                blocked_terms=["w2"])
    other = await tenant_with_rules(client, admin_headers, http)
    text, reasons = await streamed(http, other.chat)
    assert "w2" in text and reasons != ["content_filter"] and note not in text
    clean = await tenant_with_rules(client, admin_headers, http, disclaimer=note)
    text, _ = await streamed(http, clean.chat)
    assert text.endswith(f"\n\n{note}")
    whole = (await http.post("/v1/chat/completions", headers=clean.chat, json=body())).json()
    assert whole["choices"][0]["message"]["content"].endswith(f"\n\n{note}")
    blocked = (await http.post("/v1/chat/completions", headers=t.chat, json=body())).json()
    assert blocked["choices"][0]["message"]["content"] == OUTPUT_REFUSAL


async def test_rules_are_validated_and_only_admins_change_them(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    t = await tenant_with_rules(client, admin_headers, http, blocked_terms=["alpha"])
    bad = await http.put("/v1/tenant/content-rules", headers=t.admin,
                         json={"blocked_patterns": ["(unclosed"]})
    assert bad.status_code == 400 and "(unclosed" in bad.text
    assert (await http.get("/v1/tenant/content-rules", headers=t.admin)).json() == {
        "blocked_terms": ["alpha"], "blocked_patterns": [], "disclaimer": None}
    assert (await http.put("/v1/tenant/content-rules", headers=t.chat,
                           json={"blocked_terms": []})).status_code == 403
    # Each change is audited with what changed; setting the same rules again is no change.
    again = await http.put("/v1/tenant/content-rules", headers=t.admin,
                           json={"blocked_terms": ["alpha"]})
    assert again.status_code == 200
    audit = (await http.get("/v1/audit?action=content_rules.changed",
                            headers=t.admin)).json()["data"]
    assert [e["details"]["changes"]["blocked_terms"] for e in audit] == [
        {"from": [], "to": ["alpha"]}]
