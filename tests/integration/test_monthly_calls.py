"""The monthly call quota (``monthly_call_limit``), against real Redis and PostgreSQL
over HTTP with a fake vLLM server upstream: the call after the month's last is refused
with its own 429 until the next month while other tenants go on, the tier's default
holds for a tenant without its own number and the tenant's own wins, the operator sets
and clears it, replays and refusals do not count; and ``ADMIT``'s table takes a new
window limit as data alone."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.errors import RateLimitedError
from app.quotas.limiter import Limits, RateLimiter, period_of, seconds_to_next_period
from app.quotas.scripts import PERIOD, Window
from app.settings import Settings
from tests.integration import test_chat_admission
from tests.integration.test_quotas import body, chat_tenant

Client = AsyncTestClient[Litestar]

# The chat admission suite's fake upstream (6 completion tokens) and app over HTTP.
fake = test_chat_admission.fake
base_url = test_chat_admission.base_url
http = test_chat_admission.http
CHAT = "/v1/chat/completions"


def calls_key(app: Litestar, tenant_id: str) -> str:
    """The tenant's monthly call counter in Redis."""
    limiter: RateLimiter = app.state.limiter
    row, = limiter.applied(uuid.UUID(tenant_id), "", period_of(datetime.now(UTC)),
                           Limits(monthly_calls=1))
    return row.key


async def calls_counted(app: Litestar, tenant_id: str) -> int:
    async with aioredis.Redis.from_url(app.state.settings.redis.url) as r:
        return int(await r.get(calls_key(app, tenant_id)) or 0)


def assert_monthly_refusal(resp: httpx.Response, limit: int) -> None:
    """The 429 of the monthly call quota: its own code, and Retry-After to next month."""
    assert resp.status_code == 429, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["code"] == problem["error"]["type"] == "monthly_calls_exhausted"
    assert problem["limit"] == "monthly_calls"
    assert f"({limit})" in problem["detail"] and period_of(datetime.now(UTC)) in problem["detail"]
    to_next_month = seconds_to_next_period(datetime.now(UTC))
    assert to_next_month - 5 <= int(resp.headers["retry-after"]) <= to_next_month + 1


async def test_the_call_after_the_months_last_is_refused_until_next_month(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, monthly_call_limit=3)
    _, other = await chat_tenant(client, admin_headers, monthly_call_limit=3)
    replayed = {**headers, "X-Request-Id": "month-1"}
    assert (await http.post(CHAT, headers=replayed, json=body())).status_code == 200
    again = await http.post(CHAT, headers=replayed, json=body())  # a replay: not a call
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    for _ in range(2):
        assert (await http.post(CHAT, headers=headers, json=body())).status_code == 200
    assert await calls_counted(app, info["id"]) == 3
    refused = await http.post(CHAT, headers=headers, json=body(stream=True))
    assert_monthly_refusal(refused, 3)
    assert await calls_counted(app, info["id"]) == 3  # a refusal counts nothing
    # The replay is still answered: it generates nothing, so no quota stands in its way.
    assert (await http.post(CHAT, headers=replayed, json=body())).status_code == 200
    # Another tenant's month is its own.
    assert (await http.post(CHAT, headers=other, json=body())).status_code == 200


async def test_a_request_refused_by_another_limit_is_not_a_call(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    # One script checks every limit and counts only if all pass: a request over its
    # budget (or any other limit) leaves the month's calls as they were, as it does rpm.
    info, headers = await chat_tenant(client, admin_headers, monthly_call_limit=1,
                                      monthly_token_budget=1)
    for _ in range(3):
        resp = await http.post(CHAT, headers=headers, json=body())
        assert resp.status_code == 429 and resp.json()["code"] == "budget_exhausted"
    assert await calls_counted(app, info["id"]) == 0
    patched = await client.patch(f"/admin/tenants/{info['id']}", headers=admin_headers,
                                 json={"monthly_token_budget": 10**9})
    assert patched.status_code == 200
    assert (await http.post(CHAT, headers=headers, json=body())).status_code == 200
    assert_monthly_refusal(await http.post(CHAT, headers=headers, json=body()), 1)


async def test_the_tier_default_holds_until_the_tenant_has_its_own_number(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, tier="free")
    assert info["monthly_call_limit"] is None  # the free tier's 10,000
    async with aioredis.Redis.from_url(app.state.settings.redis.url) as r:
        await r.set(calls_key(app, info["id"]), 9_999, ex=3600)  # a month's calls made
    assert (await http.post(CHAT, headers=headers, json=body())).status_code == 200
    assert_monthly_refusal(await http.post(CHAT, headers=headers, json=body()), 10_000)
    raised = await client.patch(f"/admin/tenants/{info['id']}", headers=admin_headers,
                                json={"monthly_call_limit": 10_002})
    assert raised.status_code == 200 and raised.json()["monthly_call_limit"] == 10_002
    for _ in range(2):
        assert (await http.post(CHAT, headers=headers, json=body())).status_code == 200
    assert_monthly_refusal(await http.post(CHAT, headers=headers, json=body()), 10_002)
    # An enterprise tenant has no monthly call quota by default.
    big, big_headers = await chat_tenant(client, admin_headers, tier="enterprise")
    async with aioredis.Redis.from_url(app.state.settings.redis.url) as r:
        await r.set(calls_key(app, big["id"]), 10**9, ex=3600)
    assert (await http.post(CHAT, headers=big_headers, json=body())).status_code == 200


async def test_the_operator_sets_and_clears_a_tenants_monthly_calls(
    client: Client, admin_headers: dict[str, str],
) -> None:
    info, _ = await chat_tenant(client, admin_headers, monthly_call_limit=5)
    url = f"/admin/tenants/{info['id']}"
    assert (await client.get(url, headers=admin_headers)).json()["monthly_call_limit"] == 5
    for value in (42, None):
        resp = await client.patch(url, headers=admin_headers, json={"monthly_call_limit": value})
        assert resp.status_code == 200 and resp.json()["monthly_call_limit"] == value
        assert (await client.get(url, headers=admin_headers)).json()["monthly_call_limit"] == value
    for bad in (-1, 10**16, "many"):
        resp = await client.patch(url, headers=admin_headers, json={"monthly_call_limit": bad})
        assert resp.status_code == 400, resp.text
        assert "monthly_call_limit" in resp.text


@dataclass(frozen=True)
class WithNewLimits(Limits):
    """Two window limits ADMIT has never seen, declared as data only."""

    hourly: Annotated[int | None, Window("hourly_requests", "rph", "requests per hour",
                                         span_s=3600, refusal="hourly_exhausted")] = None
    user_monthly_tokens: Annotated[int | None, Window(
        "user_monthly_tokens", "mtok", "this end user's tokens this month", tokens=True,
        per_user=True, span_s=PERIOD, refusal="user_tokens_exhausted")] = None


async def test_the_admission_table_takes_a_new_window_limit_as_data_alone(
    settings: Settings,
) -> None:
    async def no_usage(_: str) -> int:
        return 0

    async with aioredis.Redis.from_url(settings.redis.url or "") as r:
        limiter = RateLimiter(r, namespace=f"test-{uuid.uuid4().hex[:8]}")
        tenant, limits = uuid.uuid4(), WithNewLimits(rpm=100, hourly=2)
        for _ in range(2):
            await limiter.admit(tenant, "", limits, 10, no_usage)
        with pytest.raises(RateLimitedError) as refused:
            await limiter.admit(tenant, "", limits, 10, no_usage)
        assert refused.value.code == "hourly_exhausted"
        assert refused.value.extra["limit"] == "hourly_requests"
        assert 3590 <= refused.value.extra["retry_after_s"] <= 3600
        # A token-counting monthly window per end user: reserved, then settled to the actual.
        monthly = WithNewLimits(user_monthly_tokens=100)
        first = await limiter.admit(tenant, "ann", monthly, 60, no_usage)
        await limiter.settle(first, 15)
        await limiter.admit(tenant, "ann", monthly, 80, no_usage)  # 15 + 80 <= 100
        with pytest.raises(RateLimitedError) as over:
            await limiter.admit(tenant, "ann", monthly, 10, no_usage)
        assert over.value.code == "user_tokens_exhausted"
        assert over.value.extra["retry_after_s"] == pytest.approx(
            seconds_to_next_period(datetime.now(UTC)), abs=5)
        await limiter.admit(tenant, "bob", monthly, 80, no_usage)  # bob's month is his own
        await limiter.admit(tenant, "", monthly, 500, no_usage)  # no end user: not counted
