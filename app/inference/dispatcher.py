"""Dispatch: tenant -> pool -> replica, fair waiting when a pool is full, failover.

The facade the chat path and the server use. It builds the live pools from the
configuration and puts the parts together: routing (:mod:`app.inference.routing`: which
pools may serve the tenant, which replica inside a pool), slots and the fair wait
(:mod:`app.inference.slots`), model facts (:mod:`app.inference.model_facts`: context
window, ``/tokenize``) and pricing (:class:`app.quotas.costs.Pricing`). What it does
itself: sending with failover (a connect error or a 5xx before the first byte retries
once on another replica; a refused connection marks the replica down until its next good
probe), the tenant's ``cache_salt`` and tier ``priority`` on every body, the background
``/health`` and ``/metrics`` probes, and the operator's snapshot. Everything here runs on
the API process's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from app.errors import DomainError, UpstreamConnectError, UpstreamError, UpstreamTimeoutError
from app.inference.dispatched import Dispatched, DispatchedStream
from app.inference.fairqueue import DeficitRoundRobin
from app.inference.model_facts import ModelFacts
from app.inference.pools import PoolConfig, PoolsConfig
from app.inference.replica import CircuitBreaker, Replica
from app.inference.routing import RoutingPolicy, TenantRoute, TierRouting, replica_policy
from app.inference.slots import ClientGoneError, Disconnected, Lease, Pool, SlotTable
from app.inference.upstream import HttpClient, Upstream
from app.quotas.costs import Pricing
from app.settings import DispatchSettings, LlmSettings

__all__ = ["ClientGoneError", "Disconnected", "Dispatched", "DispatchedStream", "Dispatcher",
           "Lease", "Pool", "TenantRoute"]
log = logging.getLogger(__name__)
T = TypeVar("T")


class Dispatcher:
    """Routes generation requests across the operator's pools."""

    def __init__(self, pools: PoolsConfig, settings: DispatchSettings, llm: LlmSettings,
                 cache_salt_key: bytes, client: HttpClient | None = None,
                 routing: RoutingPolicy | None = None) -> None:
        self.settings = settings
        self.llm = llm
        self._salt_key = cache_salt_key
        self._salts: dict[uuid.UUID, str] = {}
        self._client = client or HttpClient(llm)
        self._owns_client = client is None
        self.routing: RoutingPolicy = routing or TierRouting()
        self.pools: list[Pool] = [self._pool(cfg) for cfg in pools.pools]
        self.slots = SlotTable(self.pools, settings)
        self.facts = ModelFacts(self.pools_for, self._send, settings.health_interval_s)
        self.pricing = Pricing.of(pools)
        self.models = pools.models()
        self._health_task: asyncio.Task[None] | None = None

    def _pool(self, cfg: PoolConfig) -> Pool:
        """The live pool of ``cfg``: its replicas, its queue, its replica policy."""
        s, llm = self.settings, self.llm
        default_key = llm.api_key.get_secret_value() if llm.api_key else None
        key = cfg.api_key() or default_key  # LLM_API_KEY unless the pool names one
        replicas = [
            Replica(pool=cfg.name, url=url.rstrip("/"), cap=cfg.max_in_flight,
                    upstream=Upstream(url, self._client, api_key=key,
                                      context_window=llm.context_window),
                    breaker=CircuitBreaker(s.breaker_failures, s.breaker_cooldown_s))
            for url in cfg.endpoints]
        return Pool(cfg, replicas, DeficitRoundRobin(s.quantum_tokens),
                    replica_policy(cfg, s.affinity_headroom))

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
                self.slots.pump(pool)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.probe_all()
            except Exception:  # never let the loop die
                log.exception("health probe round failed")

    # -- routing and slots -----------------------------------------------------------

    def pools_for(self, tenant: TenantRoute, model: str) -> list[Pool]:
        """The tenant's candidate pools for ``model``, in order of preference."""
        return self.routing.pools_for(self.pools, tenant, model)

    def serves(self, model: str) -> bool:
        """True if some pool serves ``model``."""
        return model in self.models

    async def acquire(self, tenant: TenantRoute, model: str, cost: float,
                      exclude: frozenset[str] = frozenset(),
                      disconnected: Disconnected | None = None) -> Lease:
        """A slot for the tenant's request on the best replica; waits fairly when all
        are busy. 503 if no candidate replica is healthy, 429 past the queue timeout."""
        return await self.slots.acquire(tenant, model, self.pools_for(tenant, model), cost,
                                        exclude, disconnected)

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
                    lease.replica.mark_down(exc)
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

    def _has_other(self, tenant: TenantRoute, model: str, lease: Lease) -> bool:
        now = time.monotonic()
        return any(r.url != lease.replica.url and r.usable(now)
                   for p in self.pools_for(tenant, model) for r in p.replicas)

    # -- model facts and cost (delegated) --------------------------------------------------

    async def context_window(self, tenant: TenantRoute, model: str) -> int:
        """The model's context window on the tenant's first pool (asked once per pool)."""
        return await self.facts.context_window(tenant, model)

    async def count_prompt_tokens(self, tenant: TenantRoute, model: str,
                                  messages: Sequence[dict[str, Any]], cost: float = 1.0,
                                  ) -> int:
        """Exact prompt tokens (``/tokenize``, in a slot: see :class:`ModelFacts`)."""
        return await self.facts.count_prompt_tokens(tenant, model, messages, cost)

    async def count_text_tokens(self, tenant: TenantRoute, model: str, text: str,
                                cost: float = 1.0) -> int:
        """Tokens of a completion's text, when a server reported no usage."""
        return await self.facts.count_text_tokens(tenant, model, text, cost)

    def cost(self, where: Dispatched | None, model: str, *, prompt: int, completion: int,
             cached: int = 0) -> Decimal:
        """What the request costs under its pool's rule (token prices when it never
        reached a pool): :meth:`app.quotas.costs.Pricing.cost`."""
        return self.pricing.cost(where.pool if where else None, model, prompt=prompt,
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


def _retryable(exc: DomainError) -> bool:
    if isinstance(exc, UpstreamConnectError):
        return True
    status = exc.extra.get("upstream_status")
    return isinstance(exc, UpstreamError) and not isinstance(exc, UpstreamTimeoutError) \
        and isinstance(status, int) and status >= 500
