"""The rate limiter's pipelined Redis connection, on real Redis. It answers as
redis-py's client does, gives each concurrent command its own reply, and fails the
way the limiter expects: unreachable, too slow, dropped, or overloaded. It comes back
on its own."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import ServiceUnavailableError
from app.quotas.limiter import Limits, RateLimiter
from app.quotas.pipe import PipeOverloaded, RedisPipe
from app.quotas.scripts import BUDGET
from app.settings import Settings
from tests.fake_openai import free_port
from tests.faults import TcpProxy


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    async with aioredis.Redis.from_url(settings.redis.url or "") as r:
        yield r


@pytest.fixture
async def pipe(settings: Settings) -> AsyncIterator[RedisPipe]:
    p = RedisPipe(settings.redis.url or "", timeout_s=2)
    yield p
    await p.aclose()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts connections and never answers."""
    async def swallow(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _no_usage(_: str) -> int:
    return 0


async def test_replies_are_the_same_as_redis_py(redis: aioredis.Redis, pipe: RedisPipe) -> None:
    key = f"pipe-test:{uuid.uuid4().hex}"
    script = "return {1, 'two', {3, false}, redis.call('GET', KEYS[1])}"
    await redis.set(key, "v", ex=60)
    for command in [("GET", key), ("GET", key + ":missing"),
                    ("EVAL", script, 1, key), ("HINCRBY", key + ":h", "f", 5),
                    ("EVAL", "return tonumber(ARGV[1]) * 2", 0, 21)]:
        ours = await pipe.execute_command(*command)
        theirs = await redis.execute_command(*command)  # type: ignore[no-untyped-call]
        if command[0] == "HINCRBY":
            theirs -= 5  # the second increment
        assert ours == theirs, command
    await redis.delete(key, key + ":h")
    for bad, error in [(("EVALSHA", "0" * 40, 0), NoScriptError),
                       (("HGET", "x"), ResponseError),
                       (("EVAL", "return redis.call('INCR', KEYS[1])", 1, key), ResponseError)]:
        if bad[0] == "EVAL":
            await redis.set(key, "not a number", ex=60)
        with pytest.raises(error) as ours_exc:
            await pipe.execute_command(*bad)
        with pytest.raises(error) as theirs_exc:
            await redis.execute_command(*bad)  # type: ignore[no-untyped-call]
        assert type(ours_exc.value) is type(theirs_exc.value)
        assert str(ours_exc.value) == str(theirs_exc.value)
    await redis.delete(key)


async def test_concurrent_commands_each_get_their_own_reply(pipe: RedisPipe) -> None:
    async def echo(i: int) -> Any:
        return await pipe.execute_command("EVAL", "return ARGV[1]", 0, f"n{i}")

    replies = await asyncio.gather(*(echo(i) for i in range(300)))
    assert replies == [f"n{i}".encode() for i in range(300)]
    # ...over one connection, and a caller that gives up leaves the others in step.
    waiting = asyncio.ensure_future(echo(-1))
    await asyncio.sleep(0)
    waiting.cancel()
    assert await echo(7) == b"n7"
    assert pipe._wire is not None and not pipe._wire.waiting


async def test_it_runs_on_uvloop_as_the_server_does(settings: Settings) -> None:
    async def on_uvloop() -> list[Any]:
        p = RedisPipe(settings.redis.url or "")
        try:
            return list(await asyncio.gather(*(
                p.execute_command("EVAL", "return ARGV[1]", 0, i) for i in range(50))))
        finally:
            await p.aclose()

    replies = await asyncio.to_thread(uvloop.run, on_uvloop())
    assert replies == [str(i).encode() for i in range(50)]


async def test_database_number_and_password_are_used(settings: Settings,
                                                     redis: aioredis.Redis) -> None:
    url = settings.redis.url or ""
    user, secret = f"pipe-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis.execute_command("ACL", "SETUSER", user, "on", f">{secret}", "~*", "+@all")  # type: ignore[no-untyped-call]
    tcp = TcpProxy.for_redis(url)
    await tcp.start()  # a TCP address whatever the suite's Redis listens on
    other = tcp.redis_url(url).rsplit("/", 1)[0].replace("redis://", f"redis://{user}:{secret}@")
    key = f"pipe-test:{uuid.uuid4().hex}"
    p = RedisPipe(other + "/5")
    try:
        await p.execute_command("SET", key, "in five", "EX", 60)
        assert await p.execute_command("ACL", "WHOAMI") == user.encode()
        async with aioredis.Redis.from_url(other + "/5") as five:
            assert await five.get(key) == b"in five"
            await five.delete(key)
        wrong = RedisPipe(other.replace(secret, "wrong") + "/5")
        with pytest.raises(RedisConnectionError, match=r"WRONGPASS|invalid"):
            await wrong.execute_command("PING")
    finally:
        await p.aclose()
        await tcp.cut()
        await redis.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]


async def test_unreachable_redis_is_a_503(settings: Settings) -> None:
    p = RedisPipe(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await p.execute_command("PING")
    async with aioredis.Redis.from_url(settings.redis.url or "") as r:
        limiter = RateLimiter(r, scripts=p)
        with pytest.raises(ServiceUnavailableError, match="unavailable"):
            await limiter.admit(uuid.uuid4(), "", Limits(rpm=5), 1, _no_usage)


async def test_a_silent_redis_times_out_and_an_overloaded_process_says_so(
    settings: Settings,
) -> None:
    async with silent_server() as port:
        p = RedisPipe(f"redis://127.0.0.1:{port}/0", timeout_s=0.3, max_in_flight=2)
        started = asyncio.get_running_loop().time()
        first = asyncio.ensure_future(p.execute_command("PING"))
        second = asyncio.ensure_future(p.execute_command("PING"))
        await asyncio.sleep(0.05)
        with pytest.raises(PipeOverloaded):  # two already wait: the third is refused
            await p.execute_command("PING")
        async with aioredis.Redis.from_url(settings.redis.url or "") as r:
            limiter = RateLimiter(r, scripts=p, fail_open=True)
            with pytest.raises(ServiceUnavailableError, match="overloaded"):  # not admitted
                await limiter.admit(uuid.uuid4(), "", Limits(rpm=5), 1, _no_usage)
        for waiting in (first, second):
            with pytest.raises(RedisTimeoutError):
                await waiting
        assert 0.25 < asyncio.get_running_loop().time() - started < 1.5
        await p.aclose()


async def test_a_dropped_connection_comes_back(settings: Settings) -> None:
    url = settings.redis.url or ""
    proxy = TcpProxy.for_redis(url)
    await proxy.start()
    p = RedisPipe(proxy.redis_url(url), timeout_s=1)
    try:
        assert await p.execute_command("PING") == b"PONG"
        await proxy.cut()  # a Redis restart, as the client sees it
        with pytest.raises(RedisConnectionError):
            await p.execute_command("PING")
        await proxy.start()
        assert await p.execute_command("PING") == b"PONG"
    finally:
        await p.aclose()
        await proxy.cut()


async def test_admissions_through_the_pipe_survive_a_script_flush(
    redis: aioredis.Redis, pipe: RedisPipe,
) -> None:
    limiter = RateLimiter(redis, namespace=f"test-{uuid.uuid4().hex[:8]}", scripts=pipe)
    tenant, limits = uuid.uuid4(), Limits(rpm=2, concurrency=5, budget=1000)
    first = await limiter.admit(tenant, "", limits, 10, _no_usage)
    await redis.script_flush()  # as after a Redis restart: the scripts are gone
    second = await limiter.admit(tenant, "", limits, 10, _no_usage)
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    await limiter.settle(first, 4)
    await limiter.settle(second, 4)
    assert await redis.hget(second.keys[BUDGET], "used") == b"8"
    assert await redis.hget(second.keys[BUDGET], "reserved") == b"0"
