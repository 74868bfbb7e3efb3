"""Property-based tests of the whole API against its own OpenAPI schema (schemathesis):
for every operation in ``/docs/openapi.json``, generated requests (valid and invalid)
never get a 5xx, and every answer is one the schema documents (status code, content
type and body).

The app runs in-process (schemathesis's ASGI transport) as an instance of its own, on
the suite's database and Redis, with a vector store folder of its own and generation
pointed at the fast fake vLLM server, so chat calls are cheap. Tenant routes are called
with a real key holding every scope; ``/admin`` routes with the operator's key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, cast

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.python import asgi
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from app.embeddings import Models
from app.server.factory import create_app
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import PLATFORM_KEY, unique_slug

# Examples per operation: ~35 operations stay well under three minutes on two cores.
MAX_EXAMPLES = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
OPERATOR = {"Authorization": f"Bearer {PLATFORM_KEY}"}


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=4)) as server:
        yield server


@pytest.fixture(scope="module")
def schema_app(settings: Settings, models: Models, fake_llm: FakeServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Litestar]:
    """An app of its own (schemathesis runs its lifespan on its own event loop)."""
    own = settings.model_copy(update={
        "llm": settings.llm.model_copy(update={"base_url": fake_llm.base_url}),
        # (the suite's price table has only the embedding model: chat here is unpriced)
        "dispatch": settings.dispatch.model_copy(update={"prices": None}),
        "qdrant": settings.qdrant.model_copy(
            update={"path": tmp_path_factory.mktemp("schema-qdrant")}),
    })
    app = create_app(own, models=models)
    yield app
    asgi.shutdown_lifespans()  # close its pools before the scratch database goes


@pytest.fixture(scope="module")
def tenant_headers(schema_app: Litestar) -> dict[str, str]:
    """A tenant with a knowledge base, a document and a conversation, and a key with
    every scope (so responses carry real rows, not only empty lists)."""
    with asgi.get_client(cast(asgi.ASGIApp, schema_app)) as http:
        tenant = _ok(http.post("/admin/tenants", headers=OPERATOR, json={
            "slug": unique_slug("schema"), "name": "Schema", "tier": "pro"}))
        key = _ok(http.post(f"/admin/tenants/{tenant['id']}/keys", headers=OPERATOR, json={
            "name": "all", "scopes": ["admin", "chat", "ingest"]}))["key"]
        headers = {"Authorization": f"Bearer {key}"}
        kb = _ok(http.post("/v1/knowledge-bases", headers=headers, json={"name": "kb"}))
        _ok(http.post(f"/v1/knowledge-bases/{kb['id']}/documents", headers=headers,
                      json={"text": "Holidays: 25 days a year.", "filename": "h.txt"}))
        _ok(http.post("/v1/chat/completions", headers=headers, json={
            "model": "smollm2", "user": "", "retrieval": {"enabled": False},
            "messages": [{"role": "user", "content": "how many holidays?"}]}))
    return headers


def _ok(resp: Any) -> dict[str, Any]:
    assert resp.status_code < 300, resp.text
    result: dict[str, Any] = resp.json()
    return result


@pytest.fixture(scope="module")
def api_schema(schema_app: Litestar, tenant_headers: dict[str, str]) -> OpenApiSchema:
    return schemathesis.openapi.from_asgi("/docs/openapi.json", schema_app)


def test_every_operation_answers_as_documented_and_never_5xx(
    api_schema: OpenApiSchema, tenant_headers: dict[str, str], subtests: pytest.Subtests,
) -> None:
    for operation in operations(api_schema):
        headers = OPERATOR if operation.path.startswith("/admin") else tenant_headers
        with subtests.test(msg=f"{operation.method.upper()} {operation.path}"):
            _fuzz(operation, headers)


Operation = APIOperation[Any, Any, Any, Any]


def operations(api_schema: OpenApiSchema) -> list[Operation]:
    """Every operation of the schema (one it cannot read fails the test)."""
    found = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        found.append(result.ok())
    return found


def _fuzz(operation: Operation, headers: dict[str, str]) -> None:
    """Valid and invalid requests to one operation, each answer validated."""
    cases = st.one_of(*(operation.as_strategy(mode) for mode in GenerationMode))

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case[Operation]) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


def test_the_schema_lists_every_route(schema_app: Litestar,
                                      api_schema: OpenApiSchema) -> None:
    """Nothing the app serves (but the docs pages and /metrics) escapes the run above."""
    served = {(m, re.sub(r"{(\w+):\w+}", r"{\1}", r.path)) for r in schema_app.routes
              for m in getattr(r, "methods", ()) if m not in ("OPTIONS", "HEAD")
              and not r.path.startswith("/docs")}
    documented = {(op.method.upper(), op.path) for op in operations(api_schema)}
    assert served - documented == {("GET", "/metrics")}


def test_text_with_nul_characters_is_refused_not_a_500(
    schema_app: Litestar, tenant_headers: dict[str, str],
) -> None:
    """PostgreSQL stores no U+0000: wherever it is sent, a clear 400 (422 from uploads)."""
    nul = "a\u0000b"
    with asgi.get_client(cast(asgi.ASGIApp, schema_app)) as http:
        kb = _ok(http.post("/v1/knowledge-bases", headers=tenant_headers, json={"name": "nul"}))
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/v1/knowledge-bases", {"json": {"name": nul}}),
            ("PUT", "/v1/tenant/system-prompt", {"json": {"text": nul}}),
            ("POST", f"/v1/knowledge-bases/{kb['id']}/documents",
             {"json": {"text": "fine", "filename": f"{nul}.txt"}}),
            ("POST", "/v1/chat/completions", {"json": {
                "model": "smollm2", "retrieval": {"enabled": False},
                "messages": [{"role": "user", "content": nul}]}}),
            ("GET", "/v1/conversations", {"params": {"user": nul}}),
        ]
        for method, path, kwargs in calls:
            resp = http.request(method, path, headers=tenant_headers, **kwargs)
            assert resp.status_code in (400, 422), f"{method} {path}: {resp.text}"
            # Refused at validation (naming the field and U+0000), or by the database.
            assert "U+0000" in resp.text or "NUL" in resp.json()["detail"], resp.text
