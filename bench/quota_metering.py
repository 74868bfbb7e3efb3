"""Cost of one admission check, and the usage write path's sustained events/s, side by
side with their floors in one run.

    .venv/bin/python bench/quota_metering.py [--admissions 5000] [--events 20000]

Admission (Redis from REDIS_URL, else the embedded stack):
  * floor: a Redis ``PING`` round trip, sequentially, through redis-py and through the
    limiter's pipelined connection (``RedisPipe``);
  * admit: ``RateLimiter.admit`` with every limit on (tenant and end-user RPM, TPM,
    concurrency, monthly budget and calls), sequentially, then settled outside the
    timing; over the pipe, as the API runs it, and over redis-py, side by side;
  * Redis round trips per admission (commands the client sends): the target is one;
  * admit + settle throughput with 64 concurrent callers.
Write path (PostgreSQL from DATABASE_URL, else embedded; a scratch database):
  * one transaction per event (what each request did before the batched writer), 256
    at a time (more would only wait for the pool's connections);
  * the batched ``UsageWriter`` the API uses, every event queued at once (as requests
    do: they do not wait for their event before the next one); ``--events`` events over
    20 tenants, both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from ingest_throughput import backing_services, scratch_db

from app.db.engine import Database, make_engine
from app.db.migrate import migrate
from app.db.models import Tenant, Tier, UsageEvent
from app.quotas.limiter import Limits, RateLimiter
from app.quotas.pipe import RedisPipe
from app.quotas.usage_writer import UsageWriter, write_events
from app.settings import DatabaseSettings, as_asyncpg_url

LIMITS = Limits(rpm=10**9, tpm=10**12, concurrency=10**6, user_rpm=10**9, user_tpm=10**12,
                user_concurrency=10**6, budget=10**15, monthly_calls=10**12)


class RoundTrips:
    """Counts the commands a client sends (each one a round trip: no pipelining here).
    Redis's own counters would also count the calls a script makes inside the server."""

    def __init__(self, r: aioredis.Redis | RedisPipe) -> None:
        self.count = 0
        self._send = r.execute_command
        r.execute_command = self  # type: ignore[method-assign]

    async def __call__(self, *args: object, **options: object) -> object:
        self.count += 1
        return await self._send(*args, **options)


async def bench_admission(redis_url: str, n: int) -> None:
    r = aioredis.Redis.from_url(redis_url)
    pipe = RedisPipe(redis_url)
    limiter = RateLimiter(r, namespace=f"bench-{uuid.uuid4().hex[:6]}", scripts=pipe)
    plain = RateLimiter(r, namespace=f"bench-{uuid.uuid4().hex[:6]}")  # over redis-py
    tenant = uuid.uuid4()

    async def no_usage(_: str) -> int:
        return 0

    for _ in range(200):  # warm: script cached, connections open
        await r.ping()
        await pipe.execute_command("PING")
        for lim in (limiter, plain):
            await lim.settle(await lim.admit(tenant, "u", LIMITS, 10, no_usage), 10)

    async def timed(call: Callable[[], Awaitable[object]]) -> list[float]:
        took = []
        for _ in range(n):
            t = time.perf_counter()
            await call()
            took.append(time.perf_counter() - t)
        return took

    pings = await timed(r.ping)
    pipe_pings = await timed(lambda: pipe.execute_command("PING"))
    plain_admits = await timed(lambda: plain.admit(tenant, "u", LIMITS, 100, no_usage))
    admits, tickets = [], []
    trips, plain_trips = RoundTrips(pipe), RoundTrips(r)
    for i in range(n):
        t = time.perf_counter()
        tickets.append(await limiter.admit(tenant, f"user{i % 50}", LIMITS, 100, no_usage))
        admits.append(time.perf_counter() - t)
    per_admission = (trips.count + plain_trips.count) / n
    for ticket in tickets:
        await limiter.settle(ticket, 90)

    async def caller(until: float) -> int:
        done = 0
        while time.perf_counter() < until:
            ticket = await limiter.admit(tenant, "u", LIMITS, 100, no_usage)
            await limiter.settle(ticket, 90)
            done += 1
        return done

    started = time.perf_counter()
    total = sum(await asyncio.gather(*(caller(started + 5) for _ in range(64))))
    rate = total / (time.perf_counter() - started)
    await r.aclose()
    await pipe.aclose()
    ping_us, admit_us = statistics.median(pings) * 1e6, statistics.median(admits) * 1e6
    pipe_us, plain_us = statistics.median(pipe_pings) * 1e6, statistics.median(plain_admits) * 1e6
    print(f"redis PING, redis-py       p50 {ping_us:7.1f} us  p99 {pct(pings, .99):7.1f} us")
    print(f"redis PING, RedisPipe      p50 {pipe_us:7.1f} us  p99 {pct(pipe_pings, .99):7.1f} us")
    print(f"admission over the pipe    p50 {admit_us:7.1f} us  p99 {pct(admits, .99):7.1f} us"
          f"  = {admit_us / ping_us:.2f}x a redis-py PING")
    print(f"admission over redis-py    p50 {plain_us:7.1f} us  p99 {pct(plain_admits, .99):7.1f} us"
          f"  (the pipe: {plain_us / admit_us:.2f}x faster)")
    print(f"redis round trips per admission: {per_admission:.3f}")
    print(f"admit + settle, 64 concurrent callers: {rate:,.0f} requests/s")


def pct(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] * 1e6


async def bench_writes(db_url: str, n: int) -> None:
    settings = DatabaseSettings(url=db_url, pool_size=20)
    await migrate(settings)
    db = Database(make_engine(settings.application_url(), settings))
    tenants = [Tenant(slug=f"bench-{i}", name="Bench", tier=Tier.pro) for i in range(20)]
    async with db.platform() as s:
        s.add_all(tenants)
    ids = [t.id for t in tenants]

    def events(tag: str) -> list[UsageEvent]:
        return [UsageEvent(tenant_id=ids[i % len(ids)], request_id=f"{tag}-{i}", kind="chat",
                           model="m", prompt_tokens=120, completion_tokens=40,
                           latency_ms=12.5, status="ok") for i in range(n)]

    gate = asyncio.Semaphore(256)

    async def one_by_one(event: UsageEvent) -> bool:
        async with gate:
            return (await write_events(db, [event]))[0]

    single_events, batched_events = events("single"), events("batched")  # made untimed
    started = time.perf_counter()
    assert all(await asyncio.gather(*(one_by_one(e) for e in single_events)))
    single = n / (time.perf_counter() - started)
    writer = UsageWriter(db)
    writer.start()

    started = time.perf_counter()
    assert all(await asyncio.gather(*(writer.record(e) for e in batched_events)))
    rate = n / (time.perf_counter() - started)
    await writer.close()
    await db.close()
    print(f"usage events, one transaction each : {single:8,.0f} events/s")
    print(f"usage events, batched writer       : {rate:8,.0f} events/s "
          f"({writer.batches} transactions, {n / writer.batches:.0f} events each) "
          f"= {rate / single:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admissions", type=int, default=5000)
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    with backing_services("bench-quota-") as (_, db_url, redis_url):
        asyncio.run(bench_admission(redis_url, args.admissions))
        asyncio.run(bench_writes(asyncio.run(scratch_db(as_asyncpg_url(db_url))), args.events))


if __name__ == "__main__":
    main()
