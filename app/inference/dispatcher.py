"""Dispatch: tenant -> pool -> replica, fair waiting when a pool is full, failover.

Routing. A tenant with a dedicated pool goes there; it spills over to the shared pool of
its tier only when the dedicated one has no room (or no healthy replica) and the tenant
allows spillover. Other tenants go to the shared pools serving their tier. A tenant with
a ``data_region`` only ever sees pools of that region. Another tenant's dedicated pool is
never a candidate.

Replicas. Only healthy ones (active ``/health`` probes, plus a circuit breaker on errors;
a connection refused marks a replica down until its next good probe), below their
in-flight cap, least loaded (our in-flight count plus vLLM's own waiting requests and KV
cache use from ``/metrics``), with rendezvous-hash affinity per tenant (see
:func:`app.inference.replica.choose`).

Waiting. When every candidate replica is at its cap the request waits in per-tenant
queues served by weighted deficit round robin, costed in estimated tokens and weighted by
tier; past ``DISPATCH_QUEUE_TIMEOUT_S`` it gets 429 with ``Retry-After``; a client that
disconnects leaves the queue.

Failover. A connect error or a 5xx before the first byte retries once on another
replica. Everything here runs on the API process's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from app.db.models import Tenant, Tier
from app.errors import (
    DomainError,
    NoCapacityError,
    QueueTimeoutError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
)
from app.inference.fairqueue import DeficitRoundRobin, Entry
from app.inference.pools import PoolConfig, PoolKind, PoolsConfig
from app.inference.replica import CircuitBreaker, Replica, choose
from app.inference.upstream import (
    HttpClient,
    StreamEvent,
    Upstream,
    UpstreamStream,
)
from app.quotas.costs import request_cost, token_cost
from app.settings import DispatchSettings, LlmSettings

log = logging.getLogger(__name__)
Disconnected = Callable[[], Awaitable[Any]]
T = TypeVar("T")


@dataclass(frozen=True)
class TenantRoute:
    """What routing needs to know about a tenant."""

    id: uuid.UUID
    slug: str
    tier: Tier
    data_region: str | None = None
    allow_spillover: bool = False

    @classmethod
    def of(cls, tenant: Tenant) -> TenantRoute:
        """From the tenant row."""
        return cls(id=tenant.id, slug=tenant.slug, tier=Tier(tenant.tier),
                   data_region=tenant.data_region, allow_spillover=tenant.allow_spillover)

    @property
    def key(self) -> bytes:
        """The tenant's key in fair queues and affinity hashing."""
        return self.id.bytes


@dataclass(eq=False)
class Pool:
    """A configured pool with its live replicas and its queue."""

    config: PoolConfig
    replicas: list[Replica]
    queue: DeficitRoundRobin[Waiter]
    mean_duration_s: float = 5.0  # moving average of a request's time on a replica
    held: dict[bytes, int] = field(default_factory=dict)  # slots in use per tenant

    @property
    def name(self) -> str:
        """The pool's configured name."""
        return self.config.name

    def capacity(self) -> int:
        """Slots across its usable replicas."""
        now = time.monotonic()
        return sum(r.cap for r in self.replicas if r.usable(now))

    def within_share(self, tenant_key: bytes, share: float) -> bool:
        """May this tenant take one more slot? On shared pools no tenant holds more than
        ``share`` of the slots, so one is always free for another tenant's next request."""
        if share >= 1.0 or self.config.kind is not PoolKind.shared:
            return True
        return self.held.get(tenant_key, 0) < max(1, math.floor(share * self.capacity()))


@dataclass(eq=False)
class Waiter:
    """A request waiting for a slot in one or more pools."""

    tenant: TenantRoute
    future: asyncio.Future[Lease]
    entries: list[tuple[Pool, Entry[Waiter]]] = field(default_factory=list)


class Lease:
    """A slot on one replica, held for one upstream request; release it exactly once."""

    def __init__(self, dispatcher: Dispatcher, pool: Pool, replica: Replica,
                 tenant_key: bytes, share_start: float) -> None:
        self._dispatcher = dispatcher
        self.pool = pool
        self.replica = replica
        self.tenant_key = tenant_key
        self.started = time.monotonic()
        self.share_start = share_start
        self.share_end: float | None = None
        self.released = False

    def release(self, ok: bool | None) -> None:
        """Give the slot back. ``ok``: the replica worked (True), failed (False), or
        the outcome says nothing about it (None: e.g. the client went away)."""
        if self.released:
            return
        self.released = True
        self._dispatcher._release(self, ok)

    def gpu_seconds(self) -> float | None:
        """GPU time attributed to this request: its share of the replica (the time it
        ran there divided among the requests running with it) times the replica's GPUs;
        up to now while it still runs. None for pools without GPUs of ours."""
        gpus = self.pool.config.gpus_per_replica
        if not gpus:
            return None
        end = self.share_end if self.share_end is not None \
            else self.replica.share_now(time.monotonic())
        return (end - self.share_start) * gpus


@dataclass
class Dispatched:
    """Where a request ran: the pool and replica, for metering."""

    pool: str
    replica: str
    attempts: int
    lease: Lease | None = field(default=None, repr=False)

    @classmethod
    def of(cls, lease: Lease, attempts: int) -> Dispatched:
        """Where ``lease`` runs."""
        return cls(lease.pool.name, lease.replica.url, attempts, lease)

    @property
    def gpu_seconds(self) -> float | None:
        """The request's GPU time on its replica (see :meth:`Lease.gpu_seconds`)."""
        return self.lease.gpu_seconds() if self.lease is not None else None


class DispatchedStream:
    """An open upstream stream holding its replica slot until it ends."""

    def __init__(self, stream: UpstreamStream, lease: Lease, attempts: int) -> None:
        self._stream = stream
        self._lease = lease
        self.where = Dispatched.of(lease, attempts)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The upstream's events; the slot is released when they end (a failure
        mid-stream counts against the replica)."""
        ok: bool | None = None
        try:
            async for event in self._stream.events():
                if event.chunk is None:  # [DONE]: the replica did its job (callers stop
                    ok = True            # reading here, so the loop may never end)
                    self._lease.release(True)
                yield event
            ok = True
        except (UpstreamError, UpstreamTimeoutError):
            ok = False
            raise
        finally:
            self._lease.release(ok)

    async def close(self) -> None:
        """Close without reading."""
        try:
            await self._stream.close()
        finally:
            self._lease.release(None)


class Dispatcher:
    """Routes generation requests across the operator's pools."""

    def __init__(self, pools: PoolsConfig, settings: DispatchSettings, llm: LlmSettings,
                 cache_salt_key: bytes, client: HttpClient | None = None) -> None:
        self.settings = settings
        self.llm = llm
        self._salt_key = cache_salt_key
        self._salts: dict[uuid.UUID, str] = {}
        self._client = client or HttpClient(llm)
        self._owns_client = client is None
        self.pools: list[Pool] = []
        default_key = llm.api_key.get_secret_value() if llm.api_key else None
        for cfg in pools.pools:
            key = cfg.api_key() or default_key  # LLM_API_KEY unless the pool names one
            replicas = [
                Replica(pool=cfg.name, url=url.rstrip("/"), cap=cfg.max_in_flight,
                        upstream=Upstream(url, self._client, api_key=key,
                                          context_window=llm.context_window),
                        breaker=CircuitBreaker(settings.breaker_failures,
                                               settings.breaker_cooldown_s))
                for url in cfg.endpoints]
            self.pools.append(Pool(cfg, replicas, DeficitRoundRobin(settings.quantum_tokens)))
        self.models = pools.models()
        self.prices = pools.prices
        self._windows: dict[tuple[str, str], int] = {}
        self._health_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every replica once, then keep probing in the background."""
        await self.probe_all()
        self._health_task = asyncio.create_task(self._health_loop(), name="dispatch-health")

    async def close(self) -> None:
        """Stop probing; close the HTTP client if it is ours."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._owns_client:
            await self._client.close()

    async def probe_all(self) -> None:
        """One round of ``/health`` and ``/metrics`` on every replica."""
        replicas = [(pool, r) for pool in self.pools for r in pool.replicas]
        results = await asyncio.gather(
            *(r.upstream.probe(self.settings.health_timeout_s) for _, r in replicas))
        for (pool, replica), (healthy, metrics) in zip(replicas, results, strict=True):
            if healthy != replica.healthy:
                log.warning("replica %s of pool %s is %s", replica.url, pool.name,
                            "healthy again" if healthy else "unhealthy")
            replica.healthy = healthy
            if metrics is not None:
                replica.read_metrics(metrics)
            if healthy:
                self._pump(pool)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.probe_all()
            except Exception:  # never let the loop die
                log.exception("health probe round failed")

    # -- routing -----------------------------------------------------------------------

    def pools_for(self, tenant: TenantRoute, model: str) -> list[Pool]:
        """The tenant's candidate pools for ``model``, in order of preference."""
        tid = str(tenant.id)
        dedicated = [p for p in self.pools if p.config.kind is PoolKind.dedicated
                     and p.config.serves_tenant(tenant.slug, tid)]
        shared = [p for p in self.pools if p.config.kind is PoolKind.shared
                  and (not p.config.tiers or tenant.tier in p.config.tiers)]
        pools = dedicated + shared if (not dedicated or tenant.allow_spillover) else dedicated
        pools = [p for p in pools if model in p.config.models]
        if tenant.data_region is not None:
            pools = [p for p in pools if p.config.region == tenant.data_region]
        if not pools:
            where = f" in region {tenant.data_region!r}" if tenant.data_region else ""
            raise NoCapacityError(f"no generation pool serves model {model!r} for this "
                                  f"tenant{where}", model=model)
        return pools

    def serves(self, model: str) -> bool:
        """True if some pool serves ``model``."""
        return model in self.models

    # -- slots -------------------------------------------------------------------------

    async def acquire(self, tenant: TenantRoute, model: str, cost: float,
                      exclude: frozenset[str] = frozenset(),
                      disconnected: Disconnected | None = None) -> Lease:
        """A slot for the tenant's request on the best replica; waits fairly when all
        are busy. 503 if no candidate replica is healthy, 429 past the queue timeout."""
        pools = self.pools_for(tenant, model)
        now = time.monotonic()
        if not any(r.usable(now) and r.url not in exclude for p in pools for r in p.replicas):
            raise self._no_capacity(tenant, model)
        share = self.settings.max_tenant_share
        for pool in pools:
            if len(pool.queue) or not pool.within_share(tenant.key, share):
                continue  # others wait here (do not jump ahead), or at its share: wait
            replica = choose(pool.replicas, tenant.key, self.settings.affinity_headroom, exclude)
            if replica is not None:
                return self._grant(pool, replica, tenant.key)
        return await self._wait(tenant, pools, cost, disconnected)

    async def _wait(self, tenant: TenantRoute, pools: list[Pool], cost: float,
                    disconnected: Disconnected | None) -> Lease:
        s = self.settings
        if any(p.queue.depth(tenant.key) >= s.max_queued_per_tenant for p in pools):
            raise QueueTimeoutError(
                f"too many of this tenant's requests are already waiting "
                f"(DISPATCH_MAX_QUEUED_PER_TENANT={s.max_queued_per_tenant})",
                retry_after_s=self._retry_after(pools))
        loop = asyncio.get_running_loop()
        waiter = Waiter(tenant, loop.create_future())
        weight = s.weight(tenant.tier)
        for pool in pools:
            entry: Entry[Waiter] = Entry(tenant.key, weight, max(cost, 1.0), waiter)
            pool.queue.push(entry)
            waiter.entries.append((pool, entry))
        gone: asyncio.Future[Any] | None = (
            asyncio.ensure_future(disconnected()) if disconnected is not None else None)
        waits: set[asyncio.Future[Any]] = {waiter.future}
        if gone is not None:
            waits.add(gone)
        try:
            await asyncio.wait(waits, timeout=s.queue_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while waiting
            self._abandon(waiter)
            raise
        finally:
            if gone is not None and not gone.done():
                gone.cancel()
        if waiter.future.done():
            return waiter.future.result()
        self._abandon(waiter)
        if gone is not None and gone.done():
            raise ClientGoneError("the client disconnected while waiting for a slot")
        raise QueueTimeoutError(
            f"every generation server for this request is busy; waited "
            f"{s.queue_timeout_s:g} s", retry_after_s=self._retry_after(pools))

    def _abandon(self, waiter: Waiter) -> None:
        """The waiter gives up: out of every queue; a slot granted meanwhile goes back."""
        self._unqueue(waiter)
        if waiter.future.done():
            if not waiter.future.cancelled():
                waiter.future.result().release(None)
        else:
            waiter.future.cancel()

    def _grant(self, pool: Pool, replica: Replica, tenant_key: bytes) -> Lease:
        now = time.monotonic()
        share_start = replica.start_request(now)
        pool.held[tenant_key] = pool.held.get(tenant_key, 0) + 1
        replica.breaker.on_dispatch(now)
        return Lease(self, pool, replica, tenant_key, share_start)

    def _release(self, lease: Lease, ok: bool | None) -> None:
        replica, pool = lease.replica, lease.pool
        lease.share_end = replica.end_request(time.monotonic())
        held = pool.held.get(lease.tenant_key, 1) - 1
        if held:
            pool.held[lease.tenant_key] = held
        else:
            pool.held.pop(lease.tenant_key, None)
        now = time.monotonic()
        if ok is True:
            replica.breaker.on_success()
            pool.mean_duration_s += 0.1 * ((now - lease.started) - pool.mean_duration_s)
        elif ok is False and replica.breaker.on_failure(now):
            log.warning("circuit opened for replica %s of pool %s", replica.url, pool.name)
        elif ok is None:
            replica.breaker.trial_in_flight = False
        self._pump(pool)

    def _pump(self, pool: Pool) -> None:
        """Hand free slots of ``pool`` to its waiters, fairest first."""
        headroom, share = self.settings.affinity_headroom, self.settings.max_tenant_share
        while len(pool.queue):
            now = time.monotonic()
            if not any(r.has_room() and r.usable(now) for r in pool.replicas):
                return
            entry = pool.queue.pop(
                lambda key: pool.within_share(key, share))  # type: ignore[arg-type]
            if entry is None:
                return
            waiter = entry.item
            if waiter.future.done():
                continue
            replica = choose(pool.replicas, waiter.tenant.key, headroom)
            if replica is None:  # cannot happen (checked above); keep the waiter
                pool.queue.push(entry)
                return
            self._unqueue(waiter)
            waiter.future.set_result(self._grant(pool, replica, waiter.tenant.key))

    @staticmethod
    def _unqueue(waiter: Waiter) -> None:
        for pool, entry in waiter.entries:
            pool.queue.remove(entry)
        waiter.entries.clear()

    def _retry_after(self, pools: Sequence[Pool]) -> int:
        """Seconds until a retry likely finds room: the queue ahead drained at the
        pools' pace (clamped to 1..60)."""
        slots = sum(p.capacity() for p in pools) or 1
        queued = sum(len(p.queue) for p in pools)
        mean = max(p.mean_duration_s for p in pools)
        return max(1, min(60, math.ceil(mean * (queued + 1) / slots)))

    # -- requests ------------------------------------------------------------------------

    def prepare_body(self, tenant: TenantRoute, pool: Pool, body: dict[str, Any]) -> dict[str, Any]:
        """The upstream body: the tenant's ``cache_salt`` always; a ``priority`` from the
        tier on pools that run vLLM's priority scheduling."""
        out = dict(body)
        out["cache_salt"] = self.cache_salt(tenant.id)
        if pool.config.priority_scheduling:
            out["priority"] = self.settings.priority(tenant.tier)
        else:
            out.pop("priority", None)
        return out

    def cache_salt(self, tenant_id: uuid.UUID) -> str:
        """vLLM keys its prefix cache by this too: no tenant can probe another's."""
        salt = self._salts.get(tenant_id)
        if salt is None:  # one HMAC per tenant, not per request
            salt = hmac.new(self._salt_key, tenant_id.bytes, hashlib.sha256).hexdigest()[:32]
            if len(self._salts) >= 100_000:
                self._salts.clear()
            self._salts[tenant_id] = salt
        return salt

    async def complete(self, tenant: TenantRoute, model: str, body: dict[str, Any],
                       cost: float, disconnected: Disconnected | None = None,
                       ) -> tuple[dict[str, Any], Dispatched]:
        """A non-streaming completion, retried once on another replica after a connect
        error or a 5xx."""
        response, lease, attempt = await self._send(
            tenant, model, body, cost, disconnected, Upstream.complete)
        lease.release(True)
        return response, Dispatched.of(lease, attempt)

    async def open_stream(self, tenant: TenantRoute, model: str, body: dict[str, Any],
                          cost: float, disconnected: Disconnected | None = None,
                          ) -> DispatchedStream:
        """Open a stream (response headers received), retried once on another replica
        after a connect error or a 5xx; the slot is held until the stream ends."""
        stream, lease, attempt = await self._send(
            tenant, model, body, cost, disconnected, Upstream.open_stream)
        return DispatchedStream(stream, lease, attempt)

    async def _send(self, tenant: TenantRoute, model: str, body: dict[str, Any], cost: float,
                    disconnected: Disconnected | None,
                    send: Callable[[Upstream, dict[str, Any]], Awaitable[T]],
                    ) -> tuple[T, Lease, int]:
        """Take a slot and ``send`` the request there; after a connect error or a 5xx,
        once more on another replica. Returns the answer with its (held) lease."""
        exclude: frozenset[str] = frozenset()
        for attempt in (1, 2):
            lease = await self.acquire(tenant, model, cost, exclude, disconnected)
            try:
                answer = await send(lease.replica.upstream,
                                    self.prepare_body(tenant, lease.pool, body))
            except DomainError as exc:
                if isinstance(exc, UpstreamConnectError):
                    self._mark_down(lease.replica, exc)
                # A refused request (4xx) says the server works; errors and timeouts count.
                lease.release(not isinstance(exc, UpstreamError))
                if attempt == 1 and _retryable(exc) and self._has_other(tenant, model, lease):
                    exclude = frozenset({lease.replica.url})
                    continue
                raise
            except BaseException:
                lease.release(None)
                raise
            return answer, lease, attempt
        raise AssertionError("unreachable")

    @staticmethod
    def _mark_down(replica: Replica, exc: DomainError) -> None:
        """A replica that refused a connection is out until its next good probe."""
        replica.healthy = False
        log.warning("replica %s unreachable; marked down: %s", replica.url, exc)

    def _has_other(self, tenant: TenantRoute, model: str, lease: Lease) -> bool:
        now = time.monotonic()
        return any(r.url != lease.replica.url and r.usable(now)
                   for p in self.pools_for(tenant, model) for r in p.replicas)

    # -- model facts (no slot needed, but token counts take one) -------------------------

    async def _ask_any(self, tenant: TenantRoute, model: str,
                       ask: Callable[[Upstream], Awaitable[T]]) -> tuple[Pool, T]:
        """Ask a healthy server of the tenant's first pool that has one (its affinity
        replica first); an unreachable one is marked down and the next is tried, once."""
        tried: set[str] = set()
        for _ in (1, 2):
            now = time.monotonic()
            for pool in self.pools_for(tenant, model):
                usable = [r for r in pool.replicas if r.usable(now) and r.url not in tried]
                if usable:
                    break
            else:
                raise self._no_capacity(tenant, model)
            replica = max(usable, key=lambda r: r.affinity(tenant.key))
            try:
                return pool, await ask(replica.upstream)
            except UpstreamConnectError as exc:
                self._mark_down(replica, exc)
                tried.add(replica.url)
                last = exc
        raise last

    def _no_capacity(self, tenant: TenantRoute, model: str) -> NoCapacityError:
        where = f" in region {tenant.data_region!r}" if tenant.data_region else ""
        return NoCapacityError(f"no healthy generation server for model {model!r}{where}; "
                               "retry shortly", model=model,
                               retry_after_s=self.settings.health_interval_s)

    async def context_window(self, tenant: TenantRoute, model: str) -> int:
        """The model's context window on the tenant's first pool (asked once per pool)."""
        for pool in self.pools_for(tenant, model):
            if (pool.name, model) in self._windows:
                return self._windows[(pool.name, model)]
        pool, window = await self._ask_any(tenant, model, lambda u: u.context_window(model))
        self._windows[(pool.name, model)] = window
        return window

    async def count_prompt_tokens(self, tenant: TenantRoute, model: str,
                                  messages: Sequence[dict[str, Any]], cost: float = 1.0,
                                  ) -> int:
        """Exact prompt tokens, from a server of the tenant's pool (``/tokenize``). The
        server works for it as for a generation, so it takes a slot the same way
        (waiting its turn in the fair queue, ``cost`` tokens)."""
        return await self._tokenize(
            tenant, model, cost, lambda u: u.count_prompt_tokens(model, messages))

    async def count_text_tokens(self, tenant: TenantRoute, model: str, text: str,
                                cost: float = 1.0) -> int:
        """Tokens of a completion's text, when a server reported no usage (in a slot,
        as :meth:`count_prompt_tokens`)."""
        return await self._tokenize(
            tenant, model, cost, lambda u: u.count_text_tokens(model, text))

    async def _tokenize(self, tenant: TenantRoute, model: str, cost: float,
                        ask: Callable[[Upstream], Awaitable[int]]) -> int:
        count, lease, _ = await self._send(tenant, model, {}, cost, None,
                                           lambda upstream, _: ask(upstream))
        lease.release(True)
        return count

    def cost(self, where: Dispatched | None, model: str, *, prompt: int, completion: int,
             cached: int = 0) -> Decimal:
        """What the request costs under its pool's rule (token prices when it never
        reached a pool)."""
        pool = next((p.config for p in self.pools if where and p.name == where.pool), None)
        price = self.prices.get(model)
        if pool is None:
            return token_cost(price, prompt, completion, cached)
        return request_cost(pool.cost_rule, price, pool.gpu_hour_usd, prompt=prompt,
                            completion=completion, cached=cached,
                            gpu_seconds=where.gpu_seconds if where else None)

    def snapshot(self) -> list[dict[str, Any]]:
        """Pools and replicas as the operator sees them (health, load, queue)."""
        now = time.monotonic()
        return [{
            "name": p.name, "kind": p.config.kind.value, "models": p.config.models,
            "region": p.config.region, "queued": len(p.queue),
            "replicas": [{"url": r.url, "healthy": r.healthy, "circuit_open": r.breaker.is_open,
                          "usable": r.usable(now), "in_flight": r.in_flight, "cap": r.cap,
                          "engine_waiting": r.waiting, "kv_cache_usage": r.kv_cache_usage}
                         for r in p.replicas],
        } for p in self.pools]


class ClientGoneError(DomainError):
    """The client disconnected while its request waited (nobody reads the answer)."""

    code = "client_closed_request"
    title = "Client closed request"


def _retryable(exc: DomainError) -> bool:
    if isinstance(exc, UpstreamConnectError):
        return True
    status = exc.extra.get("upstream_status")
    return isinstance(exc, UpstreamError) and not isinstance(exc, UpstreamTimeoutError) \
        and isinstance(status, int) and status >= 500
