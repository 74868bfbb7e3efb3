"""Rate limits, concurrency leases and token budgets in Redis, one atomic script per
admission (so they hold across any number of API processes).

Admission checks, in one ``EVALSHA``, the tenant's and the end user's requests and
tokens in the last minute (sliding window of one-second buckets), their concurrent
requests (leases that expire, so a crashed process cannot leak a slot), and the tenant's
token budget for the period (``used + reserved + cost <= budget``). Only if all pass does
it count the request, take the leases and reserve ``cost`` tokens (prompt + max_tokens).
Settling replaces the reservation by the engine's actual tokens; a failure settles with
what was generated (often nothing). Reservations carry the lease's expiry, so one left
by a crashed process is reclaimed by the next admission. The budget is therefore never
overshot by more than the reservations in flight (admission comes before any work, so
``cost`` is an estimate: see docs/quotas.md).

Idempotency: a request carrying the client's ``X-Request-Id`` is looked up in the same
script first. A replay (same id and body hash) gets the first request's stored result
and counts nothing; another body, or a first request still running, is refused; a new id
is claimed with the admission and, when the request settles, keeps its result for
``idempotency_window_s`` (or is freed, if nothing was generated, for a retry).

All keys of a tenant share the hash tag ``{tenant id}``, so a Redis Cluster keeps them
in one slot and the script stays atomic there too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from app.errors import (
    IdempotencyConflictError,
    IdempotencyInProgressError,
    RateLimitedError,
    ServiceUnavailableError,
)
from app.ids import new_id
from app.quotas.pipe import PipeOverloaded

log = logging.getLogger(__name__)
WINDOW_S = 60
SETTLE_WAIT_S = 2.0  # a refusal waits this long at most for the tenant's settlements
UNLIMITED = -1

# KEYS: 1 tenant requests, 2 tenant tokens, 3 tenant leases, 4 user requests,
#       5 user tokens, 6 user leases, 7 budget, 8 reservation expiries, 9 reservation costs,
#       10 (only with a client request id) its idempotency record
# ARGV: 1 now_ms, 2 window_s, 3 rpm, 4 tpm, 5 concurrency, 6 user rpm, 7 user tpm,
#       8 user concurrency, 9 cost, 10 lease id, 11 lease ttl ms, 12 budget, 13 budget ttl s,
#       14 (with KEYS[10]) the request body's hash
# Returns {0, remaining requests, remaining tokens, reset requests s, reset tokens s}
#      or {code, retry after s, limit name}: 1 rate_limited, 2 concurrency_limited,
#         3 budget_exhausted, 9 budget counter missing (load it, then retry),
#         4 the request id was used with another body, 5 its first request still runs,
#      or {6, the first request's stored result}.
ADMIT = """
local idem = KEYS[10]
if idem then  -- a seen request id is answered before any limit: it generates nothing
  local seen = redis.call('HMGET', idem, 'h', 'r')
  if seen[1] then
    if seen[1] ~= ARGV[14] then return {4, 0, 'idempotency'} end
    if not seen[2] then
      return {5, math.max(1, math.ceil(redis.call('PTTL', idem) / 1000)), 'idempotency'}
    end
    return {6, seen[2]}
  end
end
local now_ms = tonumber(ARGV[1])
local now = math.floor(now_ms / 1000)
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[9])
local lease = ARGV[10]
local expiry = now_ms + tonumber(ARGV[11])
local budget = tonumber(ARGV[12])

-- A window is a hash of one-second buckets plus three fields: 't' their total, 'o' the
-- oldest bucket held, 'n' the newest. Buckets leave as 'o' passes the window's start,
-- each second visited once in the window's life: no call sums the whole minute.
-- Returns the total, seconds until the oldest bucket leaves, and 'o' and 'n' after
-- trimming (nil for an empty window), which window_add then starts from.
local function window_sum(key)
  local h = redis.call('HMGET', key, 't', 'o', 'n')
  local total, o, n = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if not total then return 0, window, nil, nil end
  local cutoff = now - window
  if n <= cutoff then
    redis.call('DEL', key)
    return 0, window, nil, nil
  end
  if o <= cutoff then
    while o <= cutoff do  -- o is held: drop it, then find the next second held
      total = total - tonumber(redis.call('HGET', key, o) or '0')
      redis.call('HDEL', key, o)
      repeat o = o + 1 until redis.call('HEXISTS', key, o) == 1
    end
    redis.call('HSET', key, 't', total, 'o', o)
  end
  return total, o + window - now, o, n
end

-- o and n: what window_sum left for this key in this same call.
local function window_add(key, amount, o, n)
  redis.call('HINCRBY', key, now, amount)
  redis.call('HINCRBY', key, 't', amount)
  -- Another process's clock may be a little behind: its bucket can be the oldest.
  if not o or now < o then redis.call('HSET', key, 'o', now) end
  if not n or now > n then redis.call('HSET', key, 'n', now) end
  redis.call('EXPIRE', key, window + 5)
end

-- Reservations and leases of crashed processes expire here.
local expired = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now_ms)
for _, l in ipairs(expired) do
  local c = tonumber(redis.call('HGET', KEYS[9], l) or '0')
  if redis.call('EXISTS', KEYS[7]) == 1 then redis.call('HINCRBY', KEYS[7], 'reserved', -c) end
  redis.call('HDEL', KEYS[9], l)
  redis.call('ZREM', KEYS[8], l)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now_ms)

local limits = {
  {KEYS[1], tonumber(ARGV[3]), 1, 'requests'},
  {KEYS[2], tonumber(ARGV[4]), cost, 'tokens'},
  {KEYS[4], tonumber(ARGV[6]), 1, 'user_requests'},
  {KEYS[5], tonumber(ARGV[7]), cost, 'user_tokens'},
}
local used = {}
local resets = {}
local spans = {}
for i, l in ipairs(limits) do
  if l[2] >= 0 then
    local total, reset, o, n = window_sum(l[1])
    if total + l[3] > l[2] then return {1, math.max(1, reset), l[4]} end
    used[i] = total
    resets[i] = reset
    spans[i] = {o, n}
  end
end
local conc, uconc = tonumber(ARGV[5]), tonumber(ARGV[8])
if conc >= 0 and redis.call('ZCARD', KEYS[3]) >= conc then return {2, 1, 'concurrency'} end
if uconc >= 0 and redis.call('ZCARD', KEYS[6]) >= uconc then return {2, 1, 'user_concurrency'} end
if budget >= 0 then
  if redis.call('EXISTS', KEYS[7]) == 0 then return {9, 0, 'budget'} end
  local spent = tonumber(redis.call('HGET', KEYS[7], 'used') or '0')
  local held = tonumber(redis.call('HGET', KEYS[7], 'reserved') or '0')
  if spent + held + cost > budget then return {3, 0, 'budget'} end
end

for i, l in ipairs(limits) do
  if l[2] >= 0 then
    window_add(l[1], l[3], spans[i][1], spans[i][2])
  end
end
if conc >= 0 then redis.call('ZADD', KEYS[3], expiry, lease) end
if uconc >= 0 then redis.call('ZADD', KEYS[6], expiry, lease) end
if budget >= 0 then
  redis.call('HINCRBY', KEYS[7], 'reserved', cost)
  redis.call('EXPIRE', KEYS[7], tonumber(ARGV[13]))
  redis.call('ZADD', KEYS[8], expiry, lease)
  redis.call('HSET', KEYS[9], lease, cost)
  redis.call('EXPIRE', KEYS[8], tonumber(ARGV[13]))
  redis.call('EXPIRE', KEYS[9], tonumber(ARGV[13]))
end
if idem then  -- claimed until settled (or the lease of a crashed process expires)
  redis.call('HSET', idem, 'h', ARGV[14], 'l', lease)
  redis.call('PEXPIRE', idem, tonumber(ARGV[11]))
end
local rem_req = limits[1][2] >= 0 and (limits[1][2] - used[1] - 1) or -1
local rem_tok = limits[2][2] >= 0 and (limits[2][2] - used[2] - cost) or -1
return {0, rem_req, rem_tok, resets[1] or window, resets[2] or window}
"""

# KEYS as ADMIT. ARGV: 1 lease, 2 bucket second, 3 cost, 4 actual tokens,
#                5 (with KEYS[10]) the result to replay ('' frees the request id),
#                6 seconds to keep it
SETTLE = """
-- Only this request's own claim (one that expired may have been claimed again since).
if KEYS[10] and redis.call('HGET', KEYS[10], 'l') == ARGV[1] then
  if ARGV[5] == '' then
    redis.call('DEL', KEYS[10])
  else
    redis.call('HSET', KEYS[10], 'r', ARGV[5])
    redis.call('EXPIRE', KEYS[10], tonumber(ARGV[6]))
  end
end
local lease, bucket = ARGV[1], ARGV[2]
local delta = tonumber(ARGV[4]) - tonumber(ARGV[3])
redis.call('ZREM', KEYS[3], lease)
redis.call('ZREM', KEYS[6], lease)
for _, k in ipairs({KEYS[2], KEYS[5]}) do
  if redis.call('HEXISTS', k, bucket) == 1 then
    redis.call('HINCRBY', k, bucket, delta)
    redis.call('HINCRBY', k, 't', delta)
  end
end
local c = redis.call('HGET', KEYS[9], lease)
local live = redis.call('EXISTS', KEYS[7]) == 1
if c then
  if live then redis.call('HINCRBY', KEYS[7], 'reserved', -tonumber(c)) end
  redis.call('HDEL', KEYS[9], lease)
  redis.call('ZREM', KEYS[8], lease)
end
if live then redis.call('HINCRBY', KEYS[7], 'used', tonumber(ARGV[4])) end
return 1
"""

# KEYS as ADMIT. ARGV: 1 lease, 2 new expiry ms, 3 lease ttl ms
RENEW = """
redis.call('ZADD', KEYS[3], 'XX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[6], 'XX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[8], 'XX', ARGV[2], ARGV[1])
if KEYS[10] then redis.call('PEXPIRE', KEYS[10], tonumber(ARGV[3])) end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """One tenant's limits for a request (None = unlimited)."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    user_rpm: int | None = None
    user_tpm: int | None = None
    user_concurrency: int | None = None
    budget: int | None = None  # tokens per period


@dataclass(frozen=True)
class Claim:
    """A client's request id, to be claimed for its body (idempotency)."""

    request_id: str
    body_hash: str


@dataclass
class Ticket:
    """An admitted request: what to settle, and the headers to send. ``replay`` is the
    stored result of an earlier request with the same id and body (nothing to do)."""

    tenant_id: uuid.UUID
    user: str
    lease: str
    bucket: int
    cost: int
    period: str
    keys: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    claimed: bool = False  # holds its request id until settled
    replay: str | None = None


def period_of(now: datetime) -> str:
    """The budget period (calendar month, UTC) a moment falls in."""
    return f"{now.year:04d}-{now.month:02d}"  # strftime costs ten times as much


def seconds_to_next_period(now: datetime) -> int:
    """Seconds until the next calendar month (UTC)."""
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return max(1, int((datetime(year, month, 1, tzinfo=UTC) - now).total_seconds()))


class Commands(Protocol):
    """What runs the scripts: redis-py's client, or the limiter's own ``RedisPipe``."""

    async def execute_command(self, *args: Any) -> Any: ...


class LuaScript:
    """A Lua script, run by its SHA and loaded again if Redis has lost it (a restart).
    redis-py's own Script does the same, plus a typing-Protocol ``isinstance`` check per
    call that costs a tenth of the call."""

    def __init__(self, redis: Commands, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324  # Redis's name

    async def __call__(self, *, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        """Run it on ``keys`` with ``args``; its reply."""
        try:
            return await self.redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.execute_command("SCRIPT", "LOAD", self.source)
            return await self.redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


class RateLimiter:
    """Admission, settlement and lease renewal against Redis. The scripts run over
    ``scripts`` (the API's ``RedisPipe``) if given, else over ``redis``, which also
    rebuilds a lost budget counter."""

    def __init__(self, redis: aioredis.Redis, *, namespace: str = "q", lease_ttl_s: float = 120,
                 fail_open: bool = False, scripts: Commands | None = None,
                 idempotency_window_s: int = 86_400) -> None:
        self.redis = redis
        self.namespace = namespace
        self.lease_ttl_s = lease_ttl_s
        self.idempotency_window_s = idempotency_window_s  # a result is replayed this long
        self.fail_open = fail_open
        self.clock: Callable[[], float] = time.time  # seconds; the windows' clock
        # Requests being settled behind their answers, by tenant: a refusal waits for
        # them (once) and asks again, so a client's next request never finds its own
        # finished one still holding a slot or tokens.
        self._settling: dict[uuid.UUID, set[asyncio.Future[Any]]] = {}
        runner: Commands = scripts or redis
        self._admit = LuaScript(runner, ADMIT)
        self._settle = LuaScript(runner, SETTLE)
        self._renew = LuaScript(runner, RENEW)

    def keys(self, tenant_id: uuid.UUID, user: str, period: str) -> list[str]:
        """The nine keys of a tenant (and end user), all in one cluster slot."""
        t = f"{self.namespace}:{{{tenant_id}}}"
        u = f"{t}:u:{user}"
        # The windows' names changed with their layout (running totals): a process of
        # the earlier layout, still running during a rolling upgrade, keeps its own.
        return [f"{t}:rpm", f"{t}:tpm", f"{t}:conc", f"{u}:rpm", f"{u}:tpm", f"{u}:conc",
                f"{t}:budget:{period}", f"{t}:res:exp", f"{t}:res:cost"]

    async def admit(self, tenant_id: uuid.UUID, user: str, limits: Limits, cost: int,
                    load_budget_used: Callable[[str], Awaitable[int]],
                    claim: Claim | None = None) -> Ticket:
        """Admit a request costing ``cost`` tokens or raise 429 (``rate_limited``,
        ``concurrency_limited``, ``budget_exhausted``); 503 if Redis is unreachable
        (unless fail-open). ``load_budget_used`` gives the period's metered tokens when
        Redis lost the budget counter (restart), so it never starts from zero.
        With a ``claim``, the same script first looks its request id up: a replay gets
        the stored result (``Ticket.replay``, no limit counted), another body or a first
        request still running 409; else the id is claimed with the admission."""
        wall = self.clock()
        now = datetime.fromtimestamp(wall, UTC)
        period = period_of(now)
        keys = self.keys(tenant_id, user, period)
        if claim is not None:  # the tenant's hash tag: the same cluster slot
            keys.append(f"{self.namespace}:{{{tenant_id}}}:idem:{claim.request_id}")
        lease = new_id()
        with_user = bool(user)
        now_ms = int(wall * 1000)
        budget_ttl = seconds_to_next_period(now) + 7 * 86400
        argv: list[int | str] = [
            now_ms, WINDOW_S, _n(limits.rpm), _n(limits.tpm),
            _n(limits.concurrency),
            _n(limits.user_rpm if with_user else None), _n(limits.user_tpm if with_user else None),
            _n(limits.user_concurrency if with_user else None),
            cost, lease, int(self.lease_ttl_s * 1000), _n(limits.budget), budget_ttl,
        ]
        if claim is not None:
            argv.append(claim.body_hash)
        ticket = Ticket(tenant_id, user, lease, now_ms // 1000, cost, period, keys)
        try:
            result = await self._admit(keys=keys, args=argv)
            if int(result[0]) == 9:  # the budget counter is gone: rebuild it, once
                used = await load_budget_used(period)
                await self.redis.hsetnx(keys[6], "used", used)
                await self.redis.hsetnx(keys[6], "reserved", 0)
                await self.redis.expire(keys[6], budget_ttl)
                result = await self._admit(keys=keys, args=argv)
            settling = self._settling.get(tenant_id)
            if settling and _settling_may_change(result):  # nothing was reserved: again
                await asyncio.wait(list(settling), timeout=SETTLE_WAIT_S)
                result = await self._admit(keys=keys, args=argv)
        except RedisError as exc:
            if pool_exhausted(exc):  # overload, not an outage: never admitted unchecked
                raise ServiceUnavailableError(
                    "this API process is overloaded (every Redis connection is busy); "
                    "retry shortly", retry_after_s=1) from exc
            if self.fail_open:
                log.warning("rate limiter unavailable, admitting (fail open): %s", exc)
                ticket.settled = True  # nothing to settle
                return ticket
            raise ServiceUnavailableError(
                "the rate limiter (Redis) is unavailable; retry shortly",
                retry_after_s=2) from exc
        code = int(result[0])
        if code == 0:
            ticket.headers = _headers(limits, result)
            ticket.claimed = claim is not None
            return ticket
        if code in (4, 5, 6):
            return _idempotent(ticket, code, result)
        which = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
        if code == 1:
            raise RateLimitedError(f"rate limit reached: {_LIMIT_NAMES[which]}",
                                   code="rate_limited", limit=which,
                                   retry_after_s=int(result[1]))
        if code == 2:
            raise RateLimitedError(f"too many requests at once: {_LIMIT_NAMES[which]}",
                                   code="concurrency_limited", limit=which, retry_after_s=1)
        raise RateLimitedError(
            f"the token budget for {period} is used up ({limits.budget} tokens)",
            code="budget_exhausted", limit="budget",
            retry_after_s=seconds_to_next_period(now))

    def settling(self, ticket: Ticket, done: asyncio.Future[Any]) -> None:
        """``ticket`` is being settled behind its answer, until ``done``: until then, a
        refused admission of its tenant waits for it and asks again."""
        pending = self._settling.setdefault(ticket.tenant_id, set())
        pending.add(done)

        def finished(future: asyncio.Future[Any]) -> None:
            pending.discard(future)
            if not pending and self._settling.get(ticket.tenant_id) is pending:
                del self._settling[ticket.tenant_id]
        done.add_done_callback(finished)

    async def settle(self, ticket: Ticket, actual_tokens: int, result: str | None = None,
                     ) -> None:
        """Replace the reservation by ``actual_tokens`` and release the leases (once);
        a claimed request id keeps ``result`` for replays, or is freed if it is None.
        Never raises: a lost settlement expires with the lease."""
        if ticket.settled:
            return
        ticket.settled = True
        args: list[int | str] = [ticket.lease, ticket.bucket, ticket.cost, actual_tokens]
        if ticket.claimed:
            args += [result or "", self.idempotency_window_s]
        try:
            await self._settle(keys=ticket.keys, args=args)
        except RedisError as exc:
            log.warning("could not settle %s (its lease expires on its own): %s",
                        ticket.lease, exc)

    async def renew(self, ticket: Ticket) -> None:
        """Extend a long request's leases and reservation."""
        if ticket.settled:
            return
        try:
            ttl_ms = int(self.lease_ttl_s * 1000)
            expiry = int(self.clock() * 1000) + ttl_ms
            await self._renew(keys=ticket.keys, args=[ticket.lease, expiry, ttl_ms])
        except RedisError as exc:
            log.warning("could not renew lease %s: %s", ticket.lease, exc)


class LeaseKeeper:
    """Renews a ticket's leases (its concurrency slots, reservation and claimed request
    id) every third of their lifetime while a whole answer is generated; a stream renews
    as it relays. A timer, not a task: an answer quicker than that costs one timer."""

    def __init__(self, limiter: RateLimiter, ticket: Ticket) -> None:
        self._limiter, self._ticket = limiter, ticket
        self._renewing: asyncio.Task[None] | None = None  # kept alive while it runs
        self._timer = self._schedule()

    def _schedule(self) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(self._limiter.lease_ttl_s / 3,
                                                     self._renew)

    def _renew(self) -> None:
        self._renewing = asyncio.ensure_future(self._limiter.renew(self._ticket))
        self._timer = self._schedule()

    def stop(self) -> None:
        """No more renewals (the request is done; settling releases the leases)."""
        self._timer.cancel()


_LIMIT_NAMES = {
    "requests": "requests per minute", "tokens": "tokens per minute",
    "user_requests": "this end user's requests per minute",
    "user_tokens": "this end user's tokens per minute",
    "concurrency": "concurrent requests", "user_concurrency": "this end user's concurrent requests",
}


def pool_exhausted(exc: RedisError) -> bool:
    """This process has more commands for Redis than it lets wait (the pipe's
    ``max_in_flight``), or redis-py's blocking pool gave up waiting for a free
    connection: overload, as opposed to Redis being unreachable."""
    return isinstance(exc, PipeOverloaded) or (
        isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, TimeoutError)
        and "No connection available" in str(exc))


def _idempotent(ticket: Ticket, code: int, result: list[Any]) -> Ticket:
    """The answer for a request id seen before: its stored result, or 409."""
    if code == 4:
        raise IdempotencyConflictError(
            "this X-Request-Id was used with another request body; use a new id")
    if code == 5:
        raise IdempotencyInProgressError(
            "the first request with this X-Request-Id is still being answered; retry "
            "when it has finished", retry_after_s=int(result[1]))
    stored = result[1]
    ticket.replay = stored.decode() if isinstance(stored, bytes) else str(stored)
    ticket.settled = True  # nothing was admitted
    return ticket


def _settling_may_change(result: list[Any]) -> bool:
    """A refusal that a settlement under way could turn around: concurrency (it frees a
    slot), tokens per minute or the budget (it replaces a reservation by what was used),
    a request id still claimed (it stores the answer to replay). Requests per minute
    count requests, which settling does not change."""
    code = int(result[0])
    if code == 5:
        return True
    if code not in (1, 2, 3):
        return False
    which = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
    return code in (2, 3) or (code == 1 and which in ("tokens", "user_tokens"))


def _n(value: int | None) -> int:
    return UNLIMITED if value is None else int(value)


def _headers(limits: Limits, result: list[int]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the tenant's per-minute limits."""
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, int(result[1])))
        headers["x-ratelimit-reset-requests"] = f"{int(result[3])}s"
    if limits.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, int(result[2])))
        headers["x-ratelimit-reset-tokens"] = f"{int(result[4])}s"
    return headers
