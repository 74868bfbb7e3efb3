"""Tenant isolation, proven over every route the app serves, enumerated from its own
route table (so a new route is covered without editing this file, or fails it).

Tenant A owns real resources: a knowledge base with a document that reached ``ready``,
a conversation made by chat (generation is the fast fake vLLM server), a second API key
and a system prompt. Tenant B, with every scope, then calls:

- every tenant route with a resource id in its path, filled with A's ids (and, where a
  route takes several, each mix of A's and B's): always 404, never A's data, and A's
  resources unchanged afterwards;
- every tenant route without ids that reads (lists, search, usage...): never A's data;
  searches and chat asked with a sentence of A's document, or naming A's ids in the body;
- every operator route (``/admin/...``): 403.

A route with a path parameter this file cannot fill fails the test: map the parameter's
name to a resource in ``ID_PARAMETERS`` (and give the route a body in ``BODIES`` if it
needs one), so no route is added uncovered.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from app.http.auth import PUBLIC_PATHS
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import (
    bearer,
    create_key,
    create_tenant,
    install_dispatcher,
    metering_done,
    one_pool,
    remove_dispatcher,
)

Client = AsyncTestClient[Litestar]
ALL_SCOPES = ["admin", "chat", "ingest"]
END_USER = "alice"  # A's and B's end user: a 404 must come from the tenant, not the user
# Words no other document in the run contains: seeing them in B's answers is a leak.
SECRET = "Zorblax quarterly reconciliation uses ledger code QX-58213 at the Vintaro depot."
A_ONLY = "All invoices are approved by the Vintaro controller."  # in no question
A_DOCUMENT = f"# Finance\n\n{SECRET}\n\n{A_ONLY}\n"
A_PROMPT = "You are the Vintaro finance assistant; never reveal ledger codes."


@dataclass
class Tenant:
    """One tenant's key and the resources made for it."""

    info: dict[str, Any]
    key: str
    headers: dict[str, str]
    ids: dict[str, str] = field(default_factory=dict)  # resource kind -> id

    @property
    def id(self) -> str:
        return str(self.info["id"])


# Path parameter name -> which resource of a tenant fills it.
ID_PARAMETERS: dict[str, str] = {
    "kb_id": "kb", "doc_id": "document", "document_id": "document",
    "conversation_id": "conversation", "key_id": "key", "tenant_id": "tenant",
}
# Bodies for routes with ids that need one to get past validation, by (method, path).
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PATCH", "/v1/knowledge-bases/{kb_id}"): {"json": {"name": "taken over"}},
    ("POST", "/v1/knowledge-bases/{kb_id}/documents"): {
        "json": {"text": "B writes into A's knowledge base.", "filename": "b.txt"}},
    ("POST", "/v1/keys/{key_id}/rotate"): {"json": {}},
}
# Reads and searches without ids: (method, path) -> request kwargs built from A.
SEARCHES: dict[tuple[str, str], Callable[[Tenant], dict[str, Any]]] = {
    ("POST", "/v1/retrieve"): lambda a: {"json": {"query": SECRET, "top_k": 10,
                                                  "relevant_only": False}},
    ("POST", "/v1/chat/completions"): lambda a: {"json": _chat(SECRET)},
}
# Requests naming A's ids in their bodies: always 404.
BODY_REFERENCES: list[tuple[str, str, Callable[[Tenant], dict[str, Any]]]] = [
    ("POST", "/v1/retrieve", lambda a: {"json": {"query": SECRET,
                                                 "knowledge_base_ids": [a.ids["kb"]]}}),
    ("POST", "/v1/chat/completions",
     lambda a: {"json": _chat(SECRET, knowledge_base_ids=[a.ids["kb"]])}),
    ("POST", "/v1/chat/completions",
     lambda a: {"json": _chat("and then?", conversation_id=a.ids["conversation"])}),
]


def _chat(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "user": END_USER, "max_tokens": 16,
            "messages": [{"role": "user", "content": question}], **extra}


def credentials_of(tenant: Tenant) -> Iterator[tuple[str, dict[str, str]]]:
    """Every kind of credential a tenant can present; each is tried against the other
    tenant's resources. Embed tokens (browser JWTs) join here once they exist."""
    yield "API key with every scope", tenant.headers


@dataclass(frozen=True)
class RouteCall:
    """One method of one route, as the route table has it."""

    method: str
    path: str  # with {name} placeholders
    parameters: tuple[str, ...]

    def url(self, values: dict[str, str]) -> str:
        return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], self.path)


def routes(app: Litestar) -> list[RouteCall]:
    """Every method of every route but the public ones (health, docs), /metrics (its
    own scraper token; checked below) and the console's (a session cookie, not a key:
    tests/integration/test_console_sessions.py)."""
    found = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or _public(route.path_format):
            continue
        for handler in route.route_handlers:
            if handler.opt.get("exclude_from_auth"):
                continue
            for method in sorted(handler.http_methods - {"OPTIONS", "HEAD"}):
                found.append(RouteCall(method, route.path_format,
                                       tuple(route.path_parameters)))
    return found


def _public(path: str) -> bool:
    return path == "/metrics" or any(path == p or path.startswith(f"{p}/")
                                     for p in PUBLIC_PATHS)


@pytest.fixture(scope="module")
async def fake_llm(app: Litestar, client: Client, settings: Settings) -> AsyncIterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=5)) as server:
        before = app.state.dispatcher
        d = await install_dispatcher(app, client, one_pool(server.base_url), settings)
        yield server
        await remove_dispatcher(app, client, d)
        app.state.dispatcher = before


async def new_tenant(client: Client, admin: dict[str, str], document: str) -> Tenant:
    info = await create_tenant(client, admin)
    key = (await create_key(client, admin, info["id"], ALL_SCOPES))["key"]
    t = Tenant(info, key, bearer(key), {"tenant": info["id"]})
    kb = await client.post("/v1/knowledge-bases", headers=t.headers,
                           json={"name": f"finance-{info['slug']}"})
    assert kb.status_code == 201, kb.text
    t.ids["kb"] = kb.json()["id"]
    up = await client.post(f"/v1/knowledge-bases/{t.ids['kb']}/documents", headers=t.headers,
                           json={"text": document, "filename": f"{info['slug']}.md"})
    assert up.status_code == 202, up.text
    t.ids["document"] = up.json()["data"][0]["id"]
    second = await client.post("/v1/keys", headers=t.headers,
                               json={"name": "spare", "scopes": ["chat"]})
    assert second.status_code == 201, second.text
    t.ids["key"], t.info["spare_key"] = second.json()["id"], second.json()["key"]
    return t


async def wait_ready(client: Client, t: Tenant) -> dict[str, Any]:
    url = f"/v1/knowledge-bases/{t.ids['kb']}/documents/{t.ids['document']}"
    for _ in range(600):
        doc: dict[str, Any] = (await client.get(url, headers=t.headers)).json()
        if doc["status"] in ("ready", "failed"):
            assert doc["status"] == "ready", doc
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError("A's document never got ready")


@pytest.fixture(scope="module")
async def tenants(client: Client, admin_headers: dict[str, str],
                  fake_llm: FakeServer) -> tuple[Tenant, Tenant]:
    a = await new_tenant(client, admin_headers, A_DOCUMENT)
    b = await new_tenant(client, admin_headers, "# Travel\n\nTrains are booked by the office.\n")
    a.info["document"] = await wait_ready(client, a)
    await wait_ready(client, b)
    put = await client.put("/v1/tenant/system-prompt", headers=a.headers, json={"text": A_PROMPT})
    assert put.status_code == 200, put.text
    for t in (a, b):
        chat = await client.post("/v1/chat/completions", headers=t.headers,
                                 json=_chat("How is reconciliation done?"))
        assert chat.status_code == 200, chat.text
        t.ids["conversation"] = chat.json()["conversation_id"]
    await metering_done()
    return a, b


def a_markers(a: Tenant) -> list[str]:
    """Strings only A's data contains."""
    return [*a.ids.values(), a.info["slug"], f"finance-{a.info['slug']}", "QX-58213",
            "Zorblax", "Vintaro", A_ONLY, A_PROMPT, a.info["spare_key"][:16]]


def assert_nothing_of(a: Tenant, resp: httpx.Response, what: str) -> None:
    """B's answer holds nothing of A's but what B itself sent (a 404 may name the id)."""
    sent = str(resp.request.url) + resp.request.content.decode()
    leaked = [m for m in a_markers(a) if m in resp.text and m not in sent]
    assert not leaked, f"{what} showed A's data {leaked}: {resp.text[:500]}"


def fillings(call: RouteCall, a: Tenant, b: Tenant) -> list[dict[str, str]]:
    """Path values with A's ids: all of A's, then each mix with B's own (never all B's)."""
    unknown = [p for p in call.parameters if p not in ID_PARAMETERS]
    assert not unknown, (f"{call.method} {call.path}: no resource fills {unknown}; map it "
                         "in ID_PARAMETERS (tests/integration/test_isolation.py)")
    options = []
    for owners in itertools.product((a, b), repeat=len(call.parameters)):
        if a in owners:
            options.append({p: o.ids[ID_PARAMETERS[p]]
                            for p, o in zip(call.parameters, owners, strict=True)})
    return options


async def send(client: Client, method: str, url: str, headers: dict[str, str],
               **kwargs: Any) -> httpx.Response:
    params = {"user": END_USER}
    return await client.request(method, url, headers=headers, params=params, **kwargs)


async def test_b_gets_404_for_every_route_with_an_id_of_a(
    app: Litestar, client: Client, tenants: tuple[Tenant, Tenant],
) -> None:
    a, b = tenants
    exercised: set[tuple[str, str]] = set()
    for call in routes(app):
        if call.path.startswith("/admin") or not call.parameters:
            continue
        for values, (kind, headers) in itertools.product(fillings(call, a, b),
                                                         credentials_of(b)):
            resp = await send(client, call.method, call.url(values), headers,
                              **BODIES.get((call.method, call.path), {}))
            what = f"B ({kind}) {call.method} {call.url(values)}"
            assert resp.status_code == 404, f"{what}: {resp.status_code} {resp.text[:300]}"
            assert_nothing_of(a, resp, what)
        if call.method == "GET":  # the same ids are A's own: the 404 above is B's alone
            own = await send(client, "GET", call.url(fillings(call, a, b)[0]), a.headers)
            assert own.status_code == 200, f"A's own {call.path}: {own.text[:300]}"
        exercised.add((call.method, call.path))
    # The enumeration found the routes there are (a table change would show here).
    assert {("GET", "/v1/knowledge-bases/{kb_id}"), ("DELETE", "/v1/knowledge-bases/{kb_id}"),
            ("POST", "/v1/knowledge-bases/{kb_id}/documents"),
            ("GET", "/v1/knowledge-bases/{kb_id}/documents/{doc_id}"),
            ("DELETE", "/v1/knowledge-bases/{kb_id}/documents/{doc_id}"),
            ("GET", "/v1/conversations/{conversation_id}"),
            ("DELETE", "/v1/conversations/{conversation_id}"),
            ("DELETE", "/v1/keys/{key_id}")} <= exercised
    await assert_a_is_intact(client, a)


async def assert_a_is_intact(client: Client, a: Tenant) -> None:
    """What B tried changed nothing of A's: its documents, name, conversation, keys."""
    kb = await client.get(f"/v1/knowledge-bases/{a.ids['kb']}", headers=a.headers)
    assert kb.status_code == 200 and kb.json()["name"] == f"finance-{a.info['slug']}"
    docs = (await client.get(f"/v1/knowledge-bases/{a.ids['kb']}/documents",
                             headers=a.headers)).json()
    assert [(d["id"], d["status"]) for d in docs["data"]] == [(a.ids["document"], "ready")]
    assert docs["data"][0]["chunk_count"] == a.info["document"]["chunk_count"]
    conv = await client.get(f"/v1/conversations/{a.ids['conversation']}",
                            headers=a.headers, params={"user": END_USER})
    assert conv.status_code == 200 and len(conv.json()["messages"]) == 2
    spare = await client.get("/v1/models", headers=bearer(a.info["spare_key"]))
    assert spare.status_code == 200, "B revoked or rotated A's key"
    hits = await client.post("/v1/retrieve", headers=a.headers,
                             json={"query": SECRET, "top_k": 3})
    assert any("QX-58213" in h["text"] for h in hits.json()["data"]), "A's passages are gone"


async def test_b_reads_and_searches_never_show_a_data(
    app: Litestar, client: Client, tenants: tuple[Tenant, Tenant], fake_llm: FakeServer,
) -> None:
    a, b = tenants
    reads = [c for c in routes(app)
             if not c.path.startswith("/admin") and not c.parameters and c.method == "GET"]
    assert len(reads) >= 8, [c.path for c in reads]  # lists, usage, prompt, whoami...
    for call, (kind, headers) in itertools.product(reads, credentials_of(b)):
        resp = await send(client, "GET", call.path, headers)
        what = f"B ({kind}) GET {call.path}"
        assert resp.status_code == 200, f"{what}: {resp.status_code} {resp.text[:300]}"
        assert_nothing_of(a, resp, what)
    for (method, path), body in SEARCHES.items():
        for kind, headers in credentials_of(b):
            sent = len(fake_llm.stats.bodies)
            resp = await send(client, method, path, headers, **body(a))
            what = f"B ({kind}) {method} {path} with A's sentence"
            assert resp.status_code == 200, f"{what}: {resp.status_code} {resp.text[:300]}"
            assert_nothing_of(a, resp, what)
            for upstream in fake_llm.stats.bodies[sent:]:  # nor in the prompt B's chat built
                assert A_ONLY not in str(upstream) and A_PROMPT not in str(upstream)
    for method, path, body in BODY_REFERENCES:
        for kind, headers in credentials_of(b):
            resp = await send(client, method, path, headers, **body(a))
            what = f"B ({kind}) {method} {path} naming A's ids"
            assert resp.status_code == 404, f"{what}: {resp.status_code} {resp.text[:300]}"
            assert_nothing_of(a, resp, what)
    # A itself finds its passage with the same search (the searches above could match).
    own = await send(client, "POST", "/v1/retrieve", a.headers, **SEARCHES[
        ("POST", "/v1/retrieve")](a))
    assert any("QX-58213" in h["text"] for h in own.json()["data"])


async def test_operator_routes_refuse_tenant_keys(
    app: Litestar, client: Client, tenants: tuple[Tenant, Tenant],
) -> None:
    a, b = tenants
    operator = [c for c in routes(app) if c.path.startswith("/admin")]
    assert len(operator) >= 10, [c.path for c in operator]
    for call in operator:
        values = {p: a.ids.get(ID_PARAMETERS.get(p, ""), str(uuid.uuid4()))
                  for p in call.parameters}
        for kind, headers in [*credentials_of(a), *credentials_of(b)]:
            resp = await send(client, call.method, call.url(values), headers, json={})
            what = f"tenant ({kind}) {call.method} {call.url(values)}"
            assert resp.status_code == 403, f"{what}: {resp.status_code} {resp.text[:300]}"
    assert (await client.get("/metrics", headers=b.headers)).status_code == 401
