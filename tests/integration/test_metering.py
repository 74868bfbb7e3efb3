"""What a request costs and what the operator can scrape: cost under each pool's rule,
GPU-seconds shared among concurrent requests, cached prompt tokens from real vLLM,
ingestion's embedding tokens, and Prometheus ``/metrics`` (real PostgreSQL and Redis; a
fake vLLM server where timing must be controlled, the real one for cached tokens)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app.db.engine import Database, make_engine
from app.inference.pools import PoolConfig, PoolsConfig
from app.quotas.costs import CostRule, ModelPrice
from app.quotas.usage import UsageService
from app.settings import Settings
from ingestion import ChunkingConfig, chunk_document, parse_document
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import (
    EMBEDDING_MODEL,
    EMBEDDING_PRICE_PER_MTOK,
    UNLIMITED,
    bearer,
    concurrent_client,
    create_key,
    create_tenant,
    install_dispatcher,
    metering_done,
    owner_rows,
    remove_dispatcher,
    served_over_http,
)

Client = AsyncTestClient[Litestar]
MODEL = "smollm2"
PRICE = ModelPrice(prompt_per_mtok=Decimal(1), completion_per_mtok=Decimal(2),
                   cached_prompt_per_mtok=Decimal("0.5"))
TOKENS_PER_REQUEST = 10
SECONDS_PER_TOKEN = 0.06  # long enough that start-up jitter under load stays small


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=TOKENS_PER_REQUEST,
                               itl_s=SECONDS_PER_TOKEN)) as server:
        yield server


def pools(*urls: str, rule: CostRule = CostRule.max, gpus: float = 2) -> PoolsConfig:
    # 3600 USD per GPU-hour = 1 USD per GPU-second: GPU time dominates any token cost.
    return PoolsConfig(pools=[PoolConfig(
        name="gpu", models=[MODEL], endpoints=list(urls), max_in_flight=100,
        gpus_per_replica=gpus, cost_rule=rule,
        gpu_hour_usd=Decimal(3600) if rule is not CostRule.tokens else None)],
        prices={MODEL: PRICE})


@pytest.fixture
async def use_pools(app: Litestar, client: Client, settings: Settings,
                    ) -> AsyncIterator[Any]:
    before, installed = app.state.dispatcher, []

    async def install(config: PoolsConfig) -> None:
        installed.append(await install_dispatcher(app, client, config, settings))

    yield install
    for d in installed:
        await remove_dispatcher(app, client, d)
    app.state.dispatcher = before


@pytest.fixture(scope="module")
async def base_url(app: Litestar, client: Client) -> AsyncIterator[str]:
    async with served_over_http(app, client) as url:
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with concurrent_client(base_url) as c:
        yield c


async def chat_tenant(client: Client, admin: dict[str, str], scopes: list[str] | None = None,
                      **fields: Any) -> tuple[dict[str, Any], dict[str, str]]:
    info = await create_tenant(client, admin, **{**UNLIMITED, **fields})
    key = (await create_key(client, admin, info["id"], scopes or ["chat"]))["key"]
    return info, bearer(key)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 16, "store": False,
            "retrieval": {"enabled": False},
            "messages": [{"role": "user", "content": "what does the handbook say?"}], **extra}


async def usage_rows(settings: Settings, tenant_id: str) -> list[asyncpg.Record]:
    return await owner_rows(settings, "usage_events", tenant_id)


def token_price(row: asyncpg.Record) -> Decimal:
    """The row's tokens at PRICE, computed by hand."""
    prompt, cached, completion = (int(row[k]) for k in (
        "prompt_tokens", "cached_tokens", "completion_tokens"))
    return ((prompt - cached) * PRICE.prompt_per_mtok + cached * Decimal("0.5")
            + completion * PRICE.completion_per_mtok) / Decimal(10**6)


async def test_gpu_seconds_are_shared_among_concurrent_requests_and_priced_by_the_pool_rule(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer, use_pools: Any,
) -> None:
    await use_pools(pools(fake.base_url, rule=CostRule.max, gpus=2))
    info, headers = await chat_tenant(client, admin_headers)
    solo = await http.post("/v1/chat/completions", headers={**headers, "X-Request-Id": "solo"},
                           json=chat())
    assert solo.status_code == 200, solo.text
    started = asyncio.get_running_loop().time()
    burst = await asyncio.gather(*(
        http.post("/v1/chat/completions", headers={**headers, "X-Request-Id": f"b{i}"},
                  json=chat()) for i in range(4)))
    burst_wall = asyncio.get_running_loop().time() - started
    assert [r.status_code for r in burst] == [200] * 4
    rows = {r["request_id"]: r for r in await usage_rows(settings, info["id"])}
    generation_s = TOKENS_PER_REQUEST * SECONDS_PER_TOKEN * 0.9
    alone = rows["solo"]
    # Alone on a 2-GPU replica: its whole time there, twice.
    assert 2 * generation_s <= alone["gpu_seconds"] <= 2 * alone["latency_ms"] / 1000
    shared = [rows[f"b{i}"] for i in range(4)]
    # Four at once share the replica: each is charged about a quarter of its time, and
    # together no more than the replica was busy.
    assert all(r["gpu_seconds"] < 0.5 * alone["gpu_seconds"] for r in shared)
    total = sum(r["gpu_seconds"] for r in shared)
    assert 2 * generation_s <= total <= 2 * burst_wall
    for row in [alone, *shared]:
        assert row["pool"] == "gpu" and row["replica"] == fake.base_url
        by_gpu = (Decimal(repr(row["gpu_seconds"]))).quantize(Decimal("0.00000001"))
        assert row["cost_usd"] == max(by_gpu, token_price(row)) == by_gpu
    # The tenant's report adds them up.
    admin = bearer((await create_key(client, admin_headers, info["id"], ["admin"]))["key"])
    report = (await http.get("/v1/usage?group_by=model", headers=admin)).json()["data"]
    assert len(report) == 1
    assert Decimal(report[0]["cost_usd"]) == sum(r["cost_usd"] for r in rows.values())
    assert report[0]["gpu_seconds"] == pytest.approx(sum(r["gpu_seconds"] for r in rows.values()))


async def test_token_priced_pools_charge_the_price_table(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer, use_pools: Any,
) -> None:
    await use_pools(pools(fake.base_url, rule=CostRule.tokens))
    info, headers = await chat_tenant(client, admin_headers)
    for stream in (False, True):
        resp = await http.post("/v1/chat/completions", headers=headers,
                               json=chat(stream=stream))
        assert resp.status_code == 200, resp.text
    rows = await usage_rows(settings, info["id"])
    assert len(rows) == 2
    for row in rows:
        assert row["completion_tokens"] == TOKENS_PER_REQUEST
        assert row["cost_usd"] == token_price(row) > 0
        assert row["gpu_seconds"] > 0  # measured even when not charged


async def test_cached_prompt_tokens_from_vllm_are_metered_at_the_cached_price(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, llm_base_url: str, use_pools: Any,
) -> None:
    """Real vLLM serves a repeated long system prompt from its prefix cache (per
    tenant's cache_salt); the usage row says how much, and prices it so."""
    await use_pools(pools(llm_base_url, rule=CostRule.tokens))
    handbook = " ".join(f"Rule {i}: badges are checked at gate {i % 7}." for i in range(70))
    info, headers = await chat_tenant(client, admin_headers, system_prompt=handbook)
    for _ in range(2):
        resp = await http.post("/v1/chat/completions", headers=headers,
                               json=chat(max_tokens=2))
        assert resp.status_code == 200, resp.text
    first, again = await usage_rows(settings, info["id"])
    assert first["cached_tokens"] == 0
    assert 0 < again["cached_tokens"] < again["prompt_tokens"]
    assert again["cost_usd"] == token_price(again) < token_price(first) + Decimal("1e-8")
    # Another tenant with the same prompt finds nothing of the first one's cache.
    other, other_headers = await chat_tenant(client, admin_headers, system_prompt=handbook)
    assert (await http.post("/v1/chat/completions", headers=other_headers,
                            json=chat(max_tokens=2))).status_code == 200
    (cold,) = await usage_rows(settings, other["id"])
    assert cold["cached_tokens"] == 0


async def test_ingestion_embedding_tokens_are_metered_once_per_version_outside_the_budget(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, app: Litestar,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, scopes=["admin", "ingest"])
    kb = (await http.post("/v1/knowledge-bases", headers=headers,
                          json={"name": "kb"})).json()
    text = "\n\n".join(f"Section {i}. Visitors sign in at desk {i} before " + "noon " * 40
                       for i in range(12))
    docs_url = f"/v1/knowledge-bases/{kb['id']}/documents"
    for version in (1, 2):
        body = text + ("\n\nRevised." if version == 2 else "")
        resp = await http.post(docs_url, headers=headers,
                               json={"text": body, "filename": "visitors.txt",
                                     "external_id": "visitors"})
        assert resp.status_code == 202, resp.text
        doc_id = resp.json()["data"][0]["id"]
        for _ in range(600):
            doc = (await http.get(f"{docs_url}/{doc_id}", headers=headers)).json()
            if doc["status"] == "ready" and doc["version"] == version:
                break
            assert doc["status"] != "failed", doc
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"version {version} did not become ready: {doc}")
    rows = await usage_rows(settings, info["id"])
    assert [(r["kind"], r["request_id"]) for r in rows] == [
        ("embedding", f"ingest:{doc_id}:1"), ("embedding", f"ingest:{doc_id}:2")]
    models = app.state.models
    parsed = parse_document((text + "\n\nRevised.").encode(), "text")
    chunks = chunk_document(parsed, models.counter, ChunkingConfig(
        max_tokens=settings.ingest.chunk_max_tokens,
        overlap_tokens=settings.ingest.chunk_overlap_tokens))
    latest = rows[-1]
    assert latest["model"] == EMBEDDING_MODEL and latest["completion_tokens"] == 0
    assert latest["prompt_tokens"] == sum(models.counter(c.text) for c in chunks) > 0
    assert latest["cost_usd"] == (latest["prompt_tokens"] * Decimal(EMBEDDING_PRICE_PER_MTOK)
                                  / Decimal(10**6)).quantize(Decimal("0.00000001"))
    # Reported as embedding usage; not spent from the tenant's token budget.
    report = (await http.get("/v1/usage?group_by=model&kind=embedding",
                             headers=headers)).json()["data"]
    assert report[0]["key"] == EMBEDDING_MODEL and report[0]["requests"] == 2
    chat_only = (await http.get("/v1/usage?kind=chat", headers=headers)).json()["data"]
    assert chat_only == []
    month = rows[0]["created_at"].strftime("%Y-%m")
    db = Database(make_engine(settings.database.application_url(), settings.database))
    try:
        assert await UsageService(db).tokens_in_period(uuid.UUID(info["id"]), month) == 0
    finally:
        await db.close()


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_metrics_show_requests_tokens_latency_rejections_and_queues(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer, use_pools: Any,
) -> None:
    await use_pools(pools(fake.base_url))
    info, headers = await chat_tenant(client, admin_headers, rpm_limit=1)
    assert (await http.post("/v1/chat/completions", headers=headers,
                            json=chat())).status_code == 200
    refused = await http.post("/v1/chat/completions", headers=headers, json=chat())
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    await metering_done()
    page = await http.get("/metrics", headers=admin_headers)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    m = scrape(page.text)
    slug = info["slug"]
    assert m["tenantrag_chat_requests_total"][
        (("model", MODEL), ("status", "ok"), ("tenant", slug))] == 1
    assert m["tenantrag_rejections_total"][(("reason", "rate_limited"), ("tenant", slug))] == 1
    assert m["tenantrag_tokens_total"][
        (("model", MODEL), ("tenant", slug), ("type", "completion"))] == TOKENS_PER_REQUEST
    assert m["tenantrag_chat_duration_seconds_count"][
        (("model", MODEL), ("tenant", slug))] == 1
    assert m["tenantrag_gpu_seconds_total"][(("model", MODEL), ("tenant", slug))] > 0
    assert m["tenantrag_cost_usd_total"][(("model", MODEL), ("tenant", slug))] > 0
    assert m["tenantrag_queue_depth"] == {(("pool", "gpu"),): 0}
    assert m["tenantrag_replica_usable"] == {(("pool", "gpu"), ("replica", fake.base_url)): 1}
    # Tenant labels name tenants: the page is the operator's (or the scraper's token).
    assert (await http.get("/metrics")).status_code == 401
    assert (await http.get("/metrics", headers=headers)).status_code == 401
    settings.metrics.token = SecretStr("scrape-token-0123456789")
    try:
        assert (await http.get("/metrics", headers=bearer("scrape-token-0123456789"))
                ).status_code == 200
    finally:
        settings.metrics.token = None
