"""Chat requests are billed once and refused cheaply, against real Redis and PostgreSQL
over HTTP, with a fake vLLM server upstream: a replayed ``X-Request-Id`` gets the first
answer (no second generation, nothing refunded), limits come before retrieval and token
counting, the prompt is counted with at most one ``/tokenize``, and message sizes are
bounded however the content is split."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.domain.search.schemas import RetrievedChunk
from app.domain.search.service import SearchService
from app.errors import IdempotencyConflictError, IdempotencyInProgressError
from app.quotas.limiter import Claim, Limits, RateLimiter, period_of
from app.quotas.scripts import BUDGET, IDEMPOTENCY
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.integration.test_quotas import body, chat_tenant
from tests.support import (
    concurrent_client,
    metering_done,
    one_pool,
    owner_rows,
    routed_through,
    served_over_http,
)

Client = AsyncTestClient[Litestar]
MODEL = "smollm2"
WINDOW = 2048  # the fake's max_model_len


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(completion_tokens=6, max_model_len=WINDOW)) as server:
        yield server


@pytest.fixture(scope="module")
async def base_url(app: Litestar, client: Client, settings: Settings,
                   fake: FakeServer) -> AsyncIterator[str]:
    async with routed_through(app, client, one_pool(fake.base_url, max_in_flight=1000),
                              settings), served_over_http(app, client) as url:
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with concurrent_client(base_url) as c:
        yield c


async def budget_used(app: Litestar, tenant_id: str) -> int:
    await metering_done()
    limiter: RateLimiter = app.state.limiter
    key = limiter.keys(uuid.UUID(tenant_id), "", period_of(datetime.now(UTC)))[BUDGET]
    async with aioredis.Redis.from_url(app.state.settings.redis.url) as r:
        return int(await r.hget(key, "used") or 0)


def events(resp: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in resp.text.splitlines() if line.startswith("data: ")]


def streamed_text(resp: httpx.Response) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events(resp)
                   if isinstance(c, dict) and c.get("choices"))


async def test_a_replayed_request_id_gets_the_first_answer_generated_and_billed_once(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, monthly_token_budget=10**6)
    once = {**headers, "X-Request-Id": "order-1"}
    first = await http.post("/v1/chat/completions", headers=once, json=body())
    assert first.status_code == 200, first.text
    generated, used = fake.stats.requests, await budget_used(app, info["id"])
    assert used > 0
    for _ in range(3):
        again = await http.post("/v1/chat/completions", headers=once, json=body())
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
    assert fake.stats.requests == generated  # no second generation
    assert await budget_used(app, info["id"]) == used  # nothing refunded, nothing added
    rows = await owner_rows(settings, "usage_events", info["id"])
    assert [r["request_id"] for r in rows] == ["order-1"]
    assert rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] == used

    # A stream is replayed as the same events.
    streamed = {**headers, "X-Request-Id": "order-2"}
    live = await http.post("/v1/chat/completions", headers=streamed,
                           json=body(stream=True, stream_options={"include_usage": True}))
    replay = await http.post("/v1/chat/completions", headers=streamed,
                             json=body(stream=True, stream_options={"include_usage": True}))
    assert live.status_code == replay.status_code == 200
    assert streamed_text(replay) == streamed_text(live) != ""
    assert events(replay)[-1] == "[DONE]"
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [{k: e["usage"][k] for k in counts} for e in events(replay)
            if isinstance(e, dict) and e.get("usage")] == \
        [{k: e["usage"][k] for k in counts} for e in events(live)
         if isinstance(e, dict) and e.get("usage")]
    assert fake.stats.requests == generated + 1

    # Another body under a seen id is refused; another tenant's ids are its own.
    other = await http.post("/v1/chat/completions", headers=once,
                            json=body(max_tokens=8))
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"
    _, b_headers = await chat_tenant(client, admin_headers)
    theirs = await http.post("/v1/chat/completions", json=body(),
                             headers={**b_headers, "X-Request-Id": "order-1"})
    assert theirs.status_code == 200 and theirs.json()["id"] != first.json()["id"]
    assert fake.stats.requests == generated + 2


async def test_concurrent_requests_with_one_id_generate_once(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, monthly_token_budget=10**6)
    same = {**headers, "X-Request-Id": "dup-1"}
    before = fake.stats.requests
    fake.config.ttft_s = 0.5
    try:
        results = await asyncio.gather(*(
            http.post("/v1/chat/completions", headers=same, json=body())
            for _ in range(8)))
    finally:
        fake.config.ttft_s = 0.0
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [409] * 7
    assert {r.json()["code"] for r in results if r.status_code == 409} \
        == {"idempotency_in_progress"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in results if r.status_code == 409)
    assert fake.stats.requests == before + 1
    answered = next(r for r in results if r.status_code == 200).json()
    later = await http.post("/v1/chat/completions", headers=same, json=body())
    assert later.status_code == 200 and later.json() == answered
    rows = await owner_rows(settings, "usage_events", info["id"])
    assert len(rows) == 1
    assert await budget_used(app, info["id"]) == rows[0]["prompt_tokens"] + \
        rows[0]["completion_tokens"]


async def test_a_request_that_failed_before_generating_may_be_retried_with_its_id(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    info, headers = await chat_tenant(client, admin_headers)
    retry = {**headers, "X-Request-Id": "flaky-1"}
    fake.config.fail_next = 1
    try:
        failed = await http.post("/v1/chat/completions", headers=retry, json=body())
    finally:
        fake.config.fail_next = 0
    assert failed.status_code >= 500
    ok = await http.post("/v1/chat/completions", headers=retry, json=body())
    assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers
    rows = await owner_rows(settings, "usage_events", info["id"])
    billed = [r for r in rows if r["request_id"] == "flaky-1"]
    assert len(billed) == 1 and billed[0]["completion_tokens"] > 0
    assert all(r["request_id"].startswith("flaky-1/") for r in rows if r not in billed)


async def test_a_stream_cut_by_the_server_replays_as_far_as_it_went(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    info, headers = await chat_tenant(client, admin_headers)
    cut = {**headers, "X-Request-Id": "cut-1"}
    fake.config.die_after_tokens = 3
    try:
        live = await http.post("/v1/chat/completions", headers=cut, json=body(stream=True))
    finally:
        fake.config.die_after_tokens = None
    generated = fake.stats.requests
    replay = await http.post("/v1/chat/completions", headers=cut, json=body(stream=True))
    whole = await http.post("/v1/chat/completions", headers=cut, json=body())
    assert fake.stats.requests == generated
    assert streamed_text(replay) == streamed_text(live) != ""
    errors = [e["error"]["code"] for e in events(live) if isinstance(e, dict) and "error" in e]
    assert errors and [e["error"]["code"] for e in events(replay)
                       if isinstance(e, dict) and "error" in e] == errors
    assert whole.status_code == 409  # another body (not a stream) under the same id
    rows = await owner_rows(settings, "usage_events", info["id"])
    assert [r["request_id"] for r in rows] == ["cut-1"] and rows[0]["completion_tokens"] > 0


async def test_a_claim_lives_with_its_lease_then_keeps_the_answer_for_the_window(
    settings: Settings,
) -> None:
    async def no_usage(_: str) -> int:
        return 0

    async with aioredis.Redis.from_url(settings.redis.url or "") as r:
        limiter = RateLimiter(r, namespace=f"test-{uuid.uuid4().hex[:8]}", lease_ttl_s=30,
                              idempotency_window_s=3600)
        tenant, limits, claim = uuid.uuid4(), Limits(rpm=100), Claim("r-1", "hash-a")
        first = await limiter.admit(tenant, "", limits, 10, no_usage, claim)
        record = first.keys[IDEMPOTENCY]
        assert first.claimed and 0 < await r.pttl(record) <= 30_000
        with pytest.raises(IdempotencyInProgressError):
            await limiter.admit(tenant, "", limits, 10, no_usage, claim)
        await r.pexpire(record, 5_000)
        await limiter.renew(first)  # a long stream keeps its claim with its lease
        assert await r.pttl(record) > 25_000
        await limiter.settle(first, 7, '{"answer": 1}')
        assert 3_500_000 < await r.pttl(record) <= 3_600_000
        replay = await limiter.admit(tenant, "", limits, 10, no_usage, claim)
        assert replay.replay == '{"answer": 1}' and replay.settled
        with pytest.raises(IdempotencyConflictError):
            await limiter.admit(tenant, "", limits, 10, no_usage, Claim("r-1", "hash-b"))
        # Nothing generated: the id is free again; another tenant's is its own.
        failed = await limiter.admit(tenant, "", limits, 10, no_usage, Claim("r-2", "h"))
        await limiter.settle(failed, 0)
        retried = await limiter.admit(tenant, "", limits, 10, no_usage, Claim("r-2", "h"))
        assert retried.claimed and retried.replay is None
        other = await limiter.admit(uuid.uuid4(), "", Limits(), 10, no_usage, claim)
        assert other.claimed and other.replay is None


async def test_a_tenant_over_its_rpm_costs_no_retrieval_and_no_tokenize(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    searches: list[uuid.UUID] = []

    async def search(self: SearchService, tenant_id: uuid.UUID, *args: Any,
                     **kwargs: Any) -> list[RetrievedChunk]:
        searches.append(tenant_id)
        return []

    monkeypatch.setattr(SearchService, "search", search)
    _, headers = await chat_tenant(client, admin_headers, rpm_limit=1)
    # Long enough that its byte bound is over the window: the prompt must be counted.
    long = {**body(), "retrieval": {"enabled": True},
            "messages": [{"role": "user", "content": "tell me about leave " * 150}]}
    first = await http.post("/v1/chat/completions", headers=headers, json=long)
    assert first.status_code == 200, first.text
    assert len(searches) == 1 and fake.stats.tokenize_calls > 0
    searched, tokenized = len(searches), fake.stats.tokenize_calls
    for _ in range(3):
        refused = await http.post("/v1/chat/completions", headers=headers, json=long)
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert len(searches) == searched and fake.stats.tokenize_calls == tokenized


async def test_a_long_history_is_trimmed_to_the_window_with_one_tokenize_call(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    fake: FakeServer,
) -> None:
    _, headers = await chat_tenant(client, admin_headers)
    filler = "this earlier message talks about many unrelated things at some length " * 10
    history: list[dict[str, str]] = []
    for i in range(40):  # about 4,800 of the fake's tokens: far over its 2,048
        history += [{"role": "user", "content": f"{i}: {filler}"},
                    {"role": "assistant", "content": filler}]
    before = fake.stats.tokenize_calls
    resp = await http.post("/v1/chat/completions", headers=headers, json={
        **body(max_tokens=64), "messages": [*history, {"role": "user", "content": "and?"}]})
    assert resp.status_code == 200, resp.text
    assert fake.stats.tokenize_calls - before == 1
    prompt = resp.json()["usage"]["prompt_tokens"]
    assert prompt + 64 <= WINDOW
    assert prompt > WINDOW // 2  # trimmed, not emptied: most of the window is used
    sent = fake.stats.bodies[-1]["messages"]
    assert sent[-1]["content"] == "and?" and sent[-2]["content"] == filler  # newest kept


async def test_counting_the_prompt_waits_for_a_generation_slot(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    _, headers = await chat_tenant(client, admin_headers)
    long = {**body(), "messages": [{"role": "user", "content": "tell me about leave " * 150}]}
    async with routed_through(app, client, one_pool(fake.base_url, max_in_flight=1),
                              settings):
        fake.config.ttft_s = 1.0
        try:
            holding = asyncio.ensure_future(
                http.post("/v1/chat/completions", headers=headers, json=body()))
            await asyncio.sleep(0.3)  # it holds the pool's one slot now
            before = fake.stats.tokenize_calls
            counted = asyncio.ensure_future(
                http.post("/v1/chat/completions", headers=headers, json=long))
            await asyncio.sleep(0.4)
            assert fake.stats.tokenize_calls == before  # queued behind the generation
            assert (await holding).status_code == 200
            assert (await counted).status_code == 200
            assert fake.stats.tokenize_calls == before + 1
        finally:
            fake.config.ttft_s = 0.0


async def test_message_text_is_bounded_however_it_is_split(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    fake: FakeServer,
) -> None:
    _, headers = await chat_tenant(client, admin_headers)
    before = fake.stats.requests
    parts = [{"type": "text", "text": "x" * 1000} for _ in range(1000)]  # 1 MB in one
    resp = await http.post("/v1/chat/completions", headers=headers, json={
        **body(), "messages": [{"role": "user", "content": parts}]})
    assert resp.status_code == 400, resp.text
    assert "messages.0.content" in resp.text and "200000 characters" in resp.text
    several = [{"role": "user", "content": "y" * 150_000} for _ in range(3)]
    resp = await http.post("/v1/chat/completions", headers=headers,
                           json={**body(), "messages": several})
    assert resp.status_code == 400, resp.text
    assert "400000 characters in all" in resp.text and "messages" in resp.text
    assert fake.stats.requests == before  # nothing went upstream
    within = [{"type": "text", "text": "tell me more"} for _ in range(10)]
    ok = await http.post("/v1/chat/completions", headers=headers,
                         json={**body(), "messages": [{"role": "user", "content": within}]})
    assert ok.status_code == 200, ok.text


async def test_a_whole_answer_slower_than_its_lease_keeps_its_request_id(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    fake: FakeServer,
) -> None:
    _, headers = await chat_tenant(client, admin_headers)
    once = {**headers, "X-Request-Id": "slow-1"}
    limiter: RateLimiter = app.state.limiter
    lease, limiter.lease_ttl_s = limiter.lease_ttl_s, 0.6
    fake.config.ttft_s = 2.5
    before = fake.stats.requests
    try:
        first = asyncio.ensure_future(http.post("/v1/chat/completions", headers=once,
                                                json=body()))
        for _ in range(500):  # until admitted and being generated (a busy machine
            if fake.stats.requests > before:  # may take a while to get there)
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # past the lease: renewed while the answer is generated
        retry = await http.post("/v1/chat/completions", headers=once, json=body())
        assert retry.status_code == 409, retry.text
        assert retry.json()["code"] == "idempotency_in_progress"
        answered = await first
    finally:
        limiter.lease_ttl_s, fake.config.ttft_s = lease, 0.0
    assert answered.status_code == 200, answered.text
    generated = fake.stats.requests
    replay = await http.post("/v1/chat/completions", headers=once, json=body())
    assert replay.status_code == 200 and replay.json() == answered.json()
    assert fake.stats.requests == generated


async def test_an_answer_whose_tokens_cannot_be_counted_is_billed_at_its_bound(
    app: Litestar, client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    settings: Settings, fake: FakeServer,
) -> None:
    info, headers = await chat_tenant(client, admin_headers, monthly_token_budget=10**6)
    fake.config.omit_usage, fake.config.tokenize_fail_status = True, 500
    try:
        resp = await http.post("/v1/chat/completions", headers=headers, json=body())
    finally:
        fake.config.omit_usage, fake.config.tokenize_fail_status = False, None
    assert resp.status_code == 200, resp.text  # the answer is kept
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    rows = await owner_rows(settings, "usage_events", info["id"])
    assert [r["completion_tokens"] for r in rows] == [usage["completion_tokens"]]
    assert await budget_used(app, info["id"]) == usage["total_tokens"] > 0


async def test_a_stream_the_client_left_replays_as_ended_early(
    client: Client, admin_headers: dict[str, str], http: httpx.AsyncClient,
    fake: FakeServer,
) -> None:
    _, headers = await chat_tenant(client, admin_headers)
    once = {**headers, "X-Request-Id": "left-1"}
    fake.config.itl_s = 0.2
    try:
        async with http.stream("POST", "/v1/chat/completions", headers=once,
                               json=body(stream=True)) as live:
            async for line in live.aiter_lines():
                if '"content":"w' in line:
                    break  # the client leaves after its first words
        for _ in range(50):  # until the abandoned request has settled
            replay = await http.post("/v1/chat/completions", headers=once,
                                     json=body(stream=True))
            if replay.status_code == 200:
                break
            await asyncio.sleep(0.1)
    finally:
        fake.config.itl_s = 0.0
    assert replay.status_code == 200, replay.text
    errors = [e["error"]["code"] for e in events(replay) if isinstance(e, dict) and "error" in e]
    assert errors == ["client_closed"], replay.text  # not shown as a whole answer
    assert streamed_text(replay).startswith("w0")
