"""Hostile input against every route, generated from the app's route table: each route
gets one request per payload class that applies to it (deeply nested JSON, invalid
UTF-8, escaped lone surrogates, control characters, huge numbers, wrong JSON types,
oversize bodies, wrong content types, multipart fields that are not text, out-of-range
date-times, huge integers, repeated and non-UTF-8 values in its query parameters,
hostile headers), with a credential of the right scope and path ids that exist. Bodies
are generated from the route's schema, valid but for the payload, so they reach past
validation where they can. No answer may be a 5xx, every refusal is problem+json, and
afterwards the server is still healthy.

Beside the schema fuzz (``test_api_schema.py``), which generates requests the schema
describes; these are the ones a parser chokes on. The app is an instance of its own,
with a small body limit (so "oversize" is cheap) and generation pointed at the fake vLLM
server (the few chat requests that are valid cost nothing).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from app.db.engine import Database, make_engine
from app.domain.knowledge.kb_service import KnowledgeBaseService
from app.embeddings import Models
from app.server.factory import create_app
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import bearer, create_key, create_tenant

Client = AsyncTestClient[Litestar]
MAX_BODY = 256 * 1024
HOSTILE = "HOSTILE-TEXT"  # stands for each class's bytes in a generated body
HUGE_INT = 10**30  # past int64 (and past any field's maximum)
ALL_SCOPES = ["admin", "chat", "ingest"]
# Routes that publish no JSON schema for their body (the upload reads it itself).
UNDOCUMENTED_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/knowledge-bases/{kb_id}/documents"): {
        "text": HOSTILE, "filename": f"{HOSTILE}.txt", "external_id": HOSTILE,
        "metadata": {HOSTILE: HOSTILE}},
}
# Fields whose value must be real for a request to go further (the model served).
FIELD_SAMPLES = {"model": "smollm2", "role": "user"}
OMITTED = {"conversation_id"}  # (another end user's conversation: a 404 before the rest)
# Sample values for patterned strings (a pattern no sample matches fails the run).
PATTERN_SAMPLES = ("a" + uuid.uuid4().hex[:10], "json", "key.revoked")


@dataclass(frozen=True)
class Route:
    """One method of one path, as the app serves it and its schema describes it."""

    method: str
    path: str  # with {name} placeholders
    operation: dict[str, Any]

    @property
    def has_body(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH")

    def query_params(self, *types: str) -> list[str]:
        """Names of the query parameters whose schema is one of ``types``."""
        return [p["name"] for p in self.operation.get("parameters", [])
                if p["in"] == "query" and _kind(p.get("schema", {})) in types]


@dataclass(frozen=True)
class Attack:
    """One request: extra query string, body and headers (None: the class does not
    apply to the route)."""

    query: str = ""
    body: bytes | None = None
    content_type: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _kind(schema: dict[str, Any]) -> str:
    """``integer``, ``date-time``, ``string`` or ``other`` for a parameter's schema."""
    for option in [schema, *schema.get("oneOf", [])]:
        if option.get("format") == "date-time":
            return "date-time"
        if option.get("type") in ("integer", "string"):
            return str(option["type"])
    return "other"


def example(schema: dict[str, Any], components: dict[str, Any], ids: dict[str, str],
            huge: bool = False) -> Any:
    """A valid-looking instance of ``schema``, every free text being ``HOSTILE`` (and
    with ``huge``, every number that has no maximum past int64)."""
    if "$ref" in schema:
        return example(components[schema["$ref"].rsplit("/", 1)[1]], components, ids, huge)
    options = [o for o in schema.get("oneOf", schema.get("anyOf", [])) if o.get("type") != "null"]
    if options:
        return example({**schema, **options[0], "oneOf": []}, components, ids, huge)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {name: FIELD_SAMPLES.get(name) or example(sub, components, ids, huge)
                for name, sub in schema.get("properties", {}).items() if name not in OMITTED}
    if kind == "array":
        return [example(schema.get("items", {}), components, ids, huge)]
    if kind in ("integer", "number") and huge and "maximum" not in schema:
        return HUGE_INT if kind == "integer" else 1e308
    if kind == "integer":
        return min(int(schema.get("minimum", 1)), int(schema.get("maximum", 2**31)))
    if kind == "number":
        return 0.5
    if kind == "boolean":
        return False
    if schema.get("format") == "uuid":
        return ids["kb_id"]
    if "pattern" in schema:
        return next(s for s in PATTERN_SAMPLES if re.fullmatch(schema["pattern"], s))
    return HOSTILE


def multipart(fields: list[tuple[str, bytes, str | None]]) -> Attack:
    """A multipart/form-data body of text fields (name, bytes, part content type) and
    one file."""
    boundary = "hostile" + uuid.uuid4().hex
    text = f"The OTTER room, {boundary}.".encode()  # not a duplicate: stored anew
    parts = [b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="file"; '
             b'filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n' + text + b"\r\n"]
    for name, value, ctype in fields:
        head = f'Content-Disposition: form-data; name="{name}"\r\n'
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        parts.append(b"--" + boundary.encode() + b"\r\n" + head.encode() + b"\r\n" + value
                     + b"\r\n")
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return Attack(body=body, content_type=f"multipart/form-data; boundary={boundary}")


def with_text(body: bytes, raw: bytes) -> Attack:
    """The route's generated JSON body with ``raw`` bytes in every free text."""
    return Attack(body=body.replace(HOSTILE.encode(), raw), content_type="application/json")


def dates(route: Route, values: tuple[str, ...]) -> str:
    """A query string setting the route's date-time parameters to ``values``."""
    return "&".join(f"{p}={v}" for p, v in zip(route.query_params("date-time"), values,
                                                 strict=False))


@dataclass(frozen=True)
class Bodies:
    """A route's generated JSON bodies: ``HOSTILE`` in every free text; huge numbers."""

    text: bytes
    huge: bytes


Payload = Callable[[Route, Bodies], Attack | None]
HUGE = "9" * 400
# Out of range once in UTC (year 0, year 10000); each a day within its pair's.
EARLY = ("0001-01-01T00:00:00%2B14:00", "0001-01-02T00:00:00%2B14:00")
LATE = ("9999-12-30T12:00:00-14:00", "9999-12-31T12:00:00-14:00")
PAYLOADS: dict[str, Payload] = {
    "deep nesting": lambda r, b: Attack(body=b"[" * 100_000, content_type="application/json")
    if r.has_body else None,
    "deep object nesting": lambda r, b: Attack(body=b'{"a":' * 50_000,
                                               content_type="application/json")
    if r.has_body else None,
    "invalid UTF-8": lambda r, b: with_text(b.text, b"\xff\xfe\xc3(") if r.has_body else None,
    "lone surrogate": lambda r, b: with_text(b.text, b"\\ud800") if r.has_body else None,
    "lone low surrogate": lambda r, b: with_text(b.text, b"x\\udfff") if r.has_body else None,
    "control characters": lambda r, b: with_text(b.text, b"\\u0000\\u0007\\u001b[2J\\u007f")
    if r.has_body else None,
    "raw control characters": lambda r, b: with_text(b.text, b"\x01\x1b") if r.has_body else None,
    "huge numbers": lambda r, b: Attack(body=b.huge, content_type="application/json")
    if r.has_body else None,
    "a JSON array for an object": lambda r, b: Attack(body=b"[]", content_type="application/json")
    if r.has_body else None,
    "JSON null": lambda r, b: Attack(body=b"null", content_type="application/json")
    if r.has_body else None,
    "oversize": lambda r, b: Attack(body=b'{"a":"' + b"x" * MAX_BODY + b'"}',
                                    content_type="application/json") if r.has_body else None,
    "wrong content type": lambda r, b: Attack(body=b"<a>&#0;</a>", content_type="application/xml")
    if r.has_body else None,
    "form-encoded": lambda r, b: Attack(body=b"a=%FF%00&b", content_type=(
        "application/x-www-form-urlencoded")) if r.has_body else None,
    "multipart, invalid UTF-8": lambda r, b: multipart([
        ("metadata", b'{"k": "\xff"}', None), ("external_id", b"\xc3(", None)])
    if r.has_body else None,
    "multipart, unknown charset": lambda r, b: multipart([
        ("external_id", b"x", "text/plain; charset=x-no-such-charset")]) if r.has_body else None,
    "multipart, UTF-16 charset": lambda r, b: multipart([
        ("external_id", b"\x00\xd8", "text/plain; charset=utf-16-le")]) if r.has_body else None,
    "multipart, lone surrogate": lambda r, b: multipart([
        ("metadata", b'{"k": "\\ud800", "\\udfff": 1}', None)]) if r.has_body else None,
    "multipart, charset decoding to a surrogate": lambda r, b: multipart([
        ("external_id", b"x\\ud800", "text/plain; charset=unicode_escape")])
    if r.has_body else None,
    "multipart, deep metadata": lambda r, b: multipart([
        ("metadata", b"[" * 100_000, None)]) if r.has_body else None,
    "date-times too early": lambda r, b: Attack(query=dates(r, EARLY)),
    "date-times too late": lambda r, b: Attack(query=dates(r, LATE)),
    "huge integers": lambda r, b: Attack(query="&".join(
        f"{p}={HUGE}" for p in r.query_params("integer"))),
    "huge negative integers": lambda r, b: Attack(query="&".join(
        f"{p}=-{HUGE}" for p in r.query_params("integer"))),
    "query text not UTF-8": lambda r, b: Attack(query="&".join(
        f"{p}=%FF%ED%A0%80%00%1B" for p in r.query_params("string", "date-time"))),
    "repeated parameters": lambda r, b: Attack(query="&".join(
        f"{p}=1&{p}=2" for p in r.query_params("integer", "string", "date-time"))),
    "hostile headers": lambda r, b: Attack(query="hostile=1", headers=(
        (b"origin", b"https://\xff\x7f.example"), (b"x-request-id", b"\xff" * 300),
        (b"accept", b"*/*;q=NaN"), (b"content-length", b"-1"))) if not r.has_body else None,
}


def _attack(make: Payload, route: Route, bodies: Bodies) -> Attack | None:
    attack = make(route, bodies)
    if attack is not None and attack.body is None and not attack.query:
        return None
    return attack


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=4)) as server:
        yield server


@pytest.fixture(scope="module")
async def hostile_client(settings: Settings, models: Models, fake_llm: FakeServer,
                         tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """An app of its own: a small body limit, generation on the fake server."""
    own = settings.model_copy(update={
        "server": settings.server.model_copy(update={"max_request_bytes": MAX_BODY}),
        "llm": settings.llm.model_copy(update={"base_url": fake_llm.base_url}),
        "dispatch": settings.dispatch.model_copy(update={"prices": None}),
        "qdrant": settings.qdrant.model_copy(
            update={"path": tmp_path_factory.mktemp("hostile-qdrant")}),
    })
    app: Litestar = create_app(own, models=models)
    async with AsyncTestClient(app=app) as client:
        yield client


@dataclass(frozen=True)
class Actors:
    """Who calls what, and the ids that fill path parameters."""

    tenant: dict[str, str]
    operator: dict[str, str]
    ids: dict[str, str]
    spare_ids: dict[str, str]  # what DELETE routes may delete (the others keep theirs)
    victim_key_id: str  # the second tenant's

    def ids_for(self, route: Route) -> dict[str, str]:
        """Path parameters for ``route``: ids that exist and belong together."""
        ids = self.spare_ids if route.method == "DELETE" else self.ids
        return {**ids, "key_id": self.victim_key_id} if route.path.startswith("/admin") else ids

    def headers_for(self, path: str) -> dict[str, str]:
        return self.operator if path.startswith("/admin") else self.tenant


@pytest.fixture(scope="module")
async def actors(hostile_client: Client, admin_headers: dict[str, str]) -> Actors:
    """A tenant with a key of every scope, and twice a knowledge base, a document and a
    conversation (one set for DELETE routes); a second tenant and a key that the routes
    which suspend, rotate or revoke may act on."""
    http = hostile_client
    tenant = await create_tenant(http, admin_headers)
    headers = bearer((await create_key(http, admin_headers, tenant["id"], ALL_SCOPES))["key"])
    spare_key = await create_key(http, admin_headers, tenant["id"], ["chat"])
    victim = await create_tenant(http, admin_headers)
    victim_key = await create_key(http, admin_headers, victim["id"], ["chat"])
    ids, spare = [{"tenant_id": victim["id"], "key_id": spare_key["id"],
                   **await _knowledge(http, headers)} for _ in range(2)]
    return Actors(headers, admin_headers, ids, spare, victim_key["id"])


async def _knowledge(http: Client, headers: dict[str, str]) -> dict[str, str]:
    """A knowledge base, a document in it and a conversation: their ids."""
    kb = await _created(http.post("/v1/knowledge-bases", headers=headers,
                                  json={"name": f"kb {uuid.uuid4().hex}"}))
    doc = (await _created(http.post(f"/v1/knowledge-bases/{kb['id']}/documents", headers=headers,
                                    json={"text": f"The OTTER room {kb['id']}.",
                                          "filename": "o.txt"})))
    chat = await _created(http.post("/v1/chat/completions", headers=headers, json={
        "model": "smollm2", "retrieval": {"enabled": False},
        "messages": [{"role": "user", "content": "where is the otter room?"}]}))
    return {"kb_id": kb["id"], "doc_id": doc["data"][0]["id"],
            "conversation_id": chat["conversation_id"]}


async def _created(sent: Any) -> dict[str, Any]:
    resp = await sent
    assert resp.status_code < 300, resp.text
    result: dict[str, Any] = resp.json()
    return result


def routes(app: Litestar) -> list[Route]:
    """Every method of every route the app serves (but its docs), with its operation."""
    schema = app.openapi_schema.to_schema()
    found = []
    for route in app.routes:
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)
        if path.startswith("/docs"):
            continue
        for method in sorted(getattr(route, "methods", ())):
            if method not in ("OPTIONS", "HEAD"):
                operation = schema["paths"].get(path, {}).get(method.lower(), {})
                found.append(Route(method, path, operation))
    return found


def generated_bodies(route: Route, components: dict[str, Any], ids: dict[str, str]) -> Bodies:
    """The route's JSON body, valid-looking, with ``HOSTILE`` in its free texts; and
    with huge numbers."""
    if (route.method, route.path) in UNDOCUMENTED_BODIES:
        body = json.dumps(UNDOCUMENTED_BODIES[route.method, route.path]).encode()
        return Bodies(body, body)
    content = route.operation.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema", {"type": "object"})
    return Bodies(json.dumps(example(schema, components, ids)).encode(),
                  json.dumps(example(schema, components, ids, huge=True)).encode())


async def test_no_route_answers_hostile_input_with_a_5xx(
    hostile_client: Client, actors: Actors,
) -> None:
    http = hostile_client
    app = http.app
    components = app.openapi_schema.to_schema()["components"]["schemas"]
    failures, not_problems, sent = [], [], 0
    attacked: set[tuple[str, str]] = set()
    for route in routes(app):
        ids = actors.ids_for(route)
        bodies = generated_bodies(route, components, ids)
        url = route.path.format(**ids)
        for name, make in PAYLOADS.items():
            attack = _attack(make, route, bodies)
            if attack is None:
                continue
            headers = {k.lower().encode(): v.encode()
                       for k, v in actors.headers_for(route.path).items()}
            headers.update(attack.headers)
            if attack.content_type:
                headers[b"content-type"] = attack.content_type.encode()
            resp = await http.request(route.method, f"{url}?{attack.query}" if attack.query
                                      else url, content=attack.body, headers=headers)
            sent += 1
            attacked.add((route.method, route.path))
            where = f"{name}: {route.method} {route.path} -> {resp.status_code} {resp.text[:300]}"
            if resp.status_code >= 500:
                failures.append(where)
            elif resp.status_code >= 400 and not resp.headers.get(
                    "content-type", "").startswith("application/problem+json"):
                not_problems.append(where)
    assert not failures, "\n".join(failures)
    assert not not_problems, "\n".join(not_problems)
    # every route that takes a body or query parameters was attacked
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/retrieve"), ("GET", "/v1/usage"),
            ("POST", "/v1/knowledge-bases/{kb_id}/documents")} <= attacked
    assert sent > 250
    await _still_healthy(http, actors)


async def _still_healthy(http: Client, actors: Actors) -> None:
    """The server answers readiness and normal requests, chat included."""
    assert (await http.get("/readyz")).status_code == 200
    kbs = await http.get("/v1/knowledge-bases", headers=actors.tenant)
    assert kbs.status_code == 200 and kbs.json()["data"], kbs.text
    chat = await http.post("/v1/chat/completions", headers=actors.tenant, json={
        "model": "smollm2", "retrieval": {"enabled": False},
        "messages": [{"role": "user", "content": "still there?"}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]


def _refusal(resp: Any, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = resp.json()
    return problem


async def test_json_nested_too_deeply_is_a_400_on_chat_and_retrieve(
    hostile_client: Client, actors: Actors,
) -> None:
    for path in ("/v1/chat/completions", "/v1/retrieve"):  # the fast chat path; Litestar's
        for body in (b"[" * 100_000, b'{"messages":' * 20_000):
            resp = await hostile_client.post(path, content=body, headers={
                **actors.tenant, "Content-Type": "application/json"})
            problem = _refusal(resp)
            assert problem["detail"] == ("the request body is not valid JSON: it is nested "
                                         "too deeply"), problem


async def test_multipart_fields_that_are_not_text_are_a_400_naming_the_field(
    hostile_client: Client, actors: Actors,
) -> None:
    url = f"/v1/knowledge-bases/{actors.ids['kb_id']}/documents"
    cases: dict[tuple[str, bytes, str | None], str] = {  # field sent: what the client reads
        ("metadata", b'{"k": "\xff"}', None): "byte 7 is not valid utf-8",
        ("external_id", b"\x00\xd8", "text/plain; charset=utf-16-le"):
            "byte 0 is not valid utf-16-le",
        **{("external_id", value, f"text/plain; charset={charset}"):
           f"its charset {charset!r} is not one this API reads (UTF-8, UTF-16, UTF-32, "
           "ISO-8859-n, Windows-125n, the common CJK ones)"
           for value, charset in ((b"x", "x-no-such-charset"), (b"x", "zlib_codec"),
                                  (b"x\\ud800", "unicode_escape"), (b"+2AA-", "utf-7"),
                                  (b"a-" + b"9" * 20_000, "punycode"))},
    }
    for field, why in cases.items():
        attack = multipart([field])
        resp = await hostile_client.post(url, content=attack.body, headers={
            **actors.tenant, "Content-Type": str(attack.content_type)})
        problem = _refusal(resp)
        assert problem["errors"] == [{"key": field[0], "message": why, "source": "body"}], problem
        assert f"multipart field '{field[0]}'" in problem["detail"]
    for metadata, why in ((b'{"k": "\\ud800"}', "JSON"), (b"[" * 100_000, "too deeply")):
        attack = multipart([("metadata", metadata, None)])
        resp = await hostile_client.post(url, content=attack.body, headers={
            **actors.tenant, "Content-Type": str(attack.content_type)})
        problem = _refusal(resp, 422)
        assert problem["detail"].startswith("'metadata' is not valid JSON") and why in \
            problem["detail"], problem
    # text in a charset that is one: read as sent, nothing lost
    attack = multipart([("external_id", "café-1".encode("latin-1"), "text/plain; charset=latin1"),
                        ("metadata", '{"owner": "zoë"}'.encode(), None)])
    resp = await hostile_client.post(url, content=attack.body, headers={
        **actors.tenant, "Content-Type": str(attack.content_type)})
    assert resp.status_code == 202, resp.text
    doc = resp.json()["data"][0]
    assert doc["external_id"] == "café-1" and doc["metadata"] == {"owner": "zoë"}, doc


async def test_date_times_out_of_range_are_a_400_naming_the_parameter(
    hostile_client: Client, actors: Actors,
) -> None:
    early, late = "0001-01-01T00:00:00+14:00", "9999-12-31T12:00:00-14:00"
    for path in ("/v1/usage", "/admin/usage", "/v1/audit", "/admin/audit"):
        headers = actors.headers_for(path)
        for name, value, why in (("from", early, "is out of range once converted to UTC"),
                                 ("to", late, "is out of range once converted to UTC"),
                                 ("to", "2026-11-01T00:00:00",
                                  "needs a time zone (e.g. 2026-11-01T00:00:00Z)"),
                                 ("from", "yesterday", "Invalid isoformat string: 'yesterday'")):
            resp = await hostile_client.get(path, params={name: value}, headers=headers)
            problem = _refusal(resp)
            assert problem["errors"] == [{"key": name, "message": why, "source": "query"}], \
                (path, problem)
    # in range: held in UTC; a "to" near the earliest time there is still has a window
    resp = await hostile_client.get("/v1/usage", headers=actors.tenant, params={
        "from": "2026-11-01T00:00:00+14:00", "to": "2026-11-02T00:00:00-02:00"})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["start"], resp.json()["end"]) == ("2026-10-31T10:00:00Z",
                                                          "2026-11-02T02:00:00Z")
    resp = await hostile_client.get("/v1/usage", headers=actors.tenant,
                                    params={"to": "0001-01-05T00:00:00Z"})
    assert resp.status_code == 200 and resp.json()["start"] == "0001-01-01T00:00:00Z", resp.text


# Statements whose values PostgreSQL or its driver refuses: the driver cannot send an
# integer past int64 or a time past year 9999 in UTC; the server has no int4 that large.
REFUSED = {
    "driver, integer": (text("SELECT CAST(:v AS bigint)"), {"v": 2**70}),
    "driver, date-time": (text("SELECT CAST(:v AS timestamptz)"), {"v": datetime(
        9999, 12, 31, 12, tzinfo=timezone(timedelta(hours=-14)))}),
    "server, integer": (text("SELECT CAST(:v AS text)::int4"), {"v": "99999999999"}),
}


async def test_values_the_database_refuses_are_a_400_and_an_unreachable_one_a_503(
    hostile_client: Client, actors: Actors, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listing that sends the database what it refuses (a gap in validation: logged)
    is the client's 400, never "database unavailable"; a database that cannot be reached
    still is (503, retry)."""
    statement: list[Any] = []

    async def listing(self: KnowledgeBaseService, tenant_id: uuid.UUID) -> list[Any]:
        async with self.db.tenant(tenant_id) as session:
            await session.execute(*statement)
        return []

    monkeypatch.setattr(KnowledgeBaseService, "list", listing)
    for name, sent in REFUSED.items():
        statement[:] = sent
        problem = _refusal(await hostile_client.get("/v1/knowledge-bases", headers=actors.tenant))
        assert problem["code"] == "invalid_request", (name, problem)
        assert problem["detail"].startswith("the request holds a value the database cannot "
                                            "store"), (name, problem)
    nowhere = Database(make_engine("postgresql+asyncpg://app@127.0.0.1:1/none", settings.database))
    monkeypatch.setattr(KnowledgeBaseService, "__init__",
                        lambda self, db: setattr(self, "db", nowhere))
    try:
        statement[:] = (text("SELECT 1"),)
        problem = _refusal(await hostile_client.get("/v1/knowledge-bases", headers=actors.tenant),
                           503)
        assert problem["code"] == "service_unavailable", problem
    finally:
        await nowhere.close()
