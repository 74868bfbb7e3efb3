"""Rate limits, concurrency leases and token budgets in Redis, one atomic script per
admission (so they hold across any number of API processes).

Admission checks, in one ``EVALSHA``, the tenant's and the end user's requests and
tokens in the last minute (sliding window of one-second buckets), the tenant's calls
this calendar month, their concurrent
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

Which limits apply is data: each window limit is a ``Limits`` field annotated with its
``Window`` (``scripts.py`` holds the scripts and the key layout), so a new one needs no
new code here. All keys of a tenant share the hash tag ``{tenant id}``, so a Redis
Cluster keeps them in one slot and the script stays atomic there too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.errors import (
    IdempotencyConflictError,
    IdempotencyInProgressError,
    RateLimitedError,
    ServiceUnavailableError,
)
from app.ids import new_id
from app.quotas.pipe import PipeOverloaded
from app.quotas.scripts import (
    ADMIT,
    BUDGET,
    PERIOD,
    RENEW,
    SETTLE,
    Commands,
    LuaScript,
    Window,
    WindowRow,
    fixed_keys,
    tenant_prefix,
    window_key,
    windows_of,
)

log = logging.getLogger(__name__)
SETTLE_WAIT_S = 2.0  # a refusal waits this long at most for the tenant's settlements
UNLIMITED = -1


@dataclass(frozen=True)
class Limits:
    """One tenant's limits for a request (None = unlimited). A field annotated with a
    ``Window`` is a window limit, counted by ``ADMIT``'s table; concurrency and the
    budget have fixed slots. ``app/quotas/policy.py`` fills each from the tenant."""

    rpm: Annotated[int | None, Window(
        "requests", "rpm", "requests per minute", header="requests")] = None
    tpm: Annotated[int | None, Window(
        "tokens", "tpm", "tokens per minute", tokens=True, header="tokens")] = None
    concurrency: int | None = None
    user_rpm: Annotated[int | None, Window(
        "user_requests", "rpm", "this end user's requests per minute", per_user=True)] = None
    user_tpm: Annotated[int | None, Window(
        "user_tokens", "tpm", "this end user's tokens per minute", tokens=True,
        per_user=True)] = None
    user_concurrency: int | None = None
    budget: int | None = None  # tokens per period
    monthly_calls: Annotated[int | None, Window(
        "monthly_calls", "calls", "monthly call quota", span_s=PERIOD,
        refusal="monthly_calls_exhausted")] = None


@dataclass(frozen=True)
class Claim:
    """A client's request id, to be claimed for its body (idempotency)."""

    request_id: str
    body_hash: str


@dataclass
class Ticket:
    """An admitted request: what to settle, and the headers to send. ``replay`` is the
    stored result of an earlier request with the same id and body (nothing to do).
    ``keys`` are the scripts' fixed keys; ``token_windows`` the counters (with their
    spans) that settling moves from the reserved tokens to the actual ones."""

    tenant_id: uuid.UUID
    user: str
    lease: str
    bucket: int
    cost: int
    period: str
    keys: list[str]
    token_windows: list[tuple[str, int]] = field(default_factory=list)
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
        self._windows: dict[type, tuple[tuple[str, Window], ...]] = {}
        runner: Commands = scripts or redis
        self._admit = LuaScript(runner, ADMIT)
        self._settle = LuaScript(runner, SETTLE)
        self._renew = LuaScript(runner, RENEW)

    def keys(self, tenant_id: uuid.UUID, user: str, period: str,
             request_id: str | None = None) -> list[str]:
        """The scripts' six fixed keys of a tenant (and end user), all in one cluster
        slot (``scripts.FIXED_KEYS``: e.g. ``keys(...)[BUDGET]`` is the period's budget)."""
        return fixed_keys(tenant_prefix(self.namespace, tenant_id), user, period, request_id)

    def applied(self, tenant_id: uuid.UUID, user: str, period: str,
                limits: Limits) -> list[WindowRow]:
        """The window limits that apply to this request: those set, per end user only
        when the request names one; each with its counter's key."""
        return self._rows(tenant_prefix(self.namespace, tenant_id), user, period, limits)

    def _rows(self, t: str, user: str, period: str, limits: Limits) -> list[WindowRow]:
        kind = type(limits)
        table = self._windows.get(kind) or self._windows.setdefault(kind, windows_of(kind))
        return [WindowRow(w, limit, window_key(t, user, period, w)) for name, w in table
                if (limit := getattr(limits, name)) is not None and (user or not w.per_user)]

    async def admit(self, tenant_id: uuid.UUID, user: str, limits: Limits, cost: int,
                    load_budget_used: Callable[[str], Awaitable[int]],
                    claim: Claim | None = None) -> Ticket:
        """Admit a request costing ``cost`` tokens or raise 429 (``rate_limited``,
        ``concurrency_limited``, ``budget_exhausted``, or a window's own code such as
        ``monthly_calls_exhausted``); 503 if Redis is unreachable (unless fail-open).
        ``load_budget_used`` gives the period's metered tokens when Redis lost the budget
        counter (restart), so it never starts from zero. With a ``claim``, the same
        script first looks its request id up: a replay gets the stored result
        (``Ticket.replay``, no limit counted), another body or a first request still
        running 409; else the id is claimed with the admission."""
        wall = self.clock()
        now = datetime.fromtimestamp(wall, UTC)
        period = period_of(now)
        t = tenant_prefix(self.namespace, tenant_id)
        keys = fixed_keys(t, user, period, claim.request_id if claim else None)
        rows = self._rows(t, user, period, limits)
        lease = new_id()
        now_ms = int(wall * 1000)
        period_ttl = seconds_to_next_period(now) + 7 * 86400
        argv: list[int | str] = [
            now_ms, cost, lease, int(self.lease_ttl_s * 1000), _n(limits.concurrency),
            _n(limits.user_concurrency if user else None), _n(limits.budget), period_ttl,
            claim.body_hash if claim else ""]
        token_windows: list[tuple[str, int]] = []
        for w, limit, key in rows:
            if w.tokens:
                argv += (limit, cost, w.span_s)
                token_windows.append((key, w.span_s))
            else:
                argv += (limit, 1, w.span_s)
        ticket = Ticket(tenant_id, user, lease, now_ms // 1000, cost, period, keys,
                        token_windows)
        try:
            result = await self._ask(ticket, [*keys, *(r.key for r in rows)], argv, rows,
                                     lambda: load_budget_used(period), period_ttl)
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
            ticket.headers = _headers(rows, result)
            ticket.claimed = claim is not None
            return ticket
        if code in (4, 5, 6):
            return _idempotent(ticket, code, result)
        raise _refusal(code, result, rows, limits, now)

    async def _ask(self, ticket: Ticket, keys: list[str], argv: list[int | str],
                   rows: list[WindowRow], load_budget_used: Callable[[], Awaitable[int]],
                   period_ttl: int) -> list[Any]:
        """``ADMIT``'s answer: after rebuilding a lost budget counter, and after the
        tenant's settlements under way if one of them could turn a refusal around."""
        result: list[Any] = await self._admit(keys=keys, args=argv)
        if int(result[0]) == 9:  # the budget counter is gone: rebuild it, once
            used = await load_budget_used()
            await self.redis.hsetnx(keys[BUDGET], "used", used)
            await self.redis.hsetnx(keys[BUDGET], "reserved", 0)
            await self.redis.expire(keys[BUDGET], period_ttl)
            result = await self._admit(keys=keys, args=argv)
        settling = self._settling.get(ticket.tenant_id)
        if settling and _settling_may_change(result, rows):  # nothing was reserved: again
            await asyncio.wait(list(settling), timeout=SETTLE_WAIT_S)
            result = await self._admit(keys=keys, args=argv)
        return result

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
        args: list[int | str] = [ticket.lease, ticket.bucket, ticket.cost, actual_tokens,
                                 result or "", self.idempotency_window_s]
        args += [span for _, span in ticket.token_windows]
        try:
            await self._settle(keys=[*ticket.keys, *(k for k, _ in ticket.token_windows)],
                               args=args)
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
    ticket.replay = _text(result[1])
    ticket.settled = True  # nothing was admitted
    return ticket


def _refusal(code: int, result: list[Any], rows: list[WindowRow], limits: Limits,
             now: datetime) -> RateLimitedError:
    """The 429 for ``ADMIT``'s refusal ``code``: a window limit (a sliding window's
    retry is the script's, a period's is the next month), concurrency or the budget."""
    if code == 1:
        row = rows[int(result[2]) - 1]
        w = row.window
        if w.span_s == PERIOD:
            return RateLimitedError(
                f"the {w.what} for {period_of(now)} is used up ({row.limit})", code=w.refusal,
                limit=w.name, retry_after_s=seconds_to_next_period(now))
        return RateLimitedError(f"rate limit reached: {w.what}", code=w.refusal,
                                limit=w.name, retry_after_s=int(result[1]))
    if code == 2:
        which = _text(result[2])
        what = "concurrent requests" if which == "concurrency" else (
            "this end user's concurrent requests")
        return RateLimitedError(f"too many requests at once: {what}",
                                code="concurrency_limited", limit=which, retry_after_s=1)
    return RateLimitedError(
        f"the token budget for {period_of(now)} is used up ({limits.budget} tokens)",
        code="budget_exhausted", limit="budget", retry_after_s=seconds_to_next_period(now))


def _settling_may_change(result: list[Any], rows: list[WindowRow]) -> bool:
    """A refusal that a settlement under way could turn around: concurrency (it frees a
    slot), a window counting tokens or the budget (it replaces a reservation by what was
    used), a request id still claimed (it stores the answer to replay). Windows counting
    requests do not change with settling."""
    code = int(result[0])
    if code == 1:
        return rows[int(result[2]) - 1].window.tokens
    return code in (2, 3, 5)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _n(value: int | None) -> int:
    return UNLIMITED if value is None else int(value)


def _headers(rows: list[WindowRow], result: list[int]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the windows that have them (the tenant's
    requests and tokens per minute): ``ADMIT`` answers each window's remaining and reset."""
    headers: dict[str, str] = {}
    for i, row in enumerate(rows):
        if (name := row.window.header) is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(row.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, int(result[1 + 2 * i])))
            headers[f"x-ratelimit-reset-{name}"] = f"{int(result[2 + 2 * i])}s"
    return headers
