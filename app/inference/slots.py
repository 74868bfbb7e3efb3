"""Slots: who holds which replica's capacity, and who waits fairly for it.

A :class:`SlotTable` owns the live pools (replicas plus a fair queue each). It grants a
:class:`Lease` (one slot on one replica) when a replica the pool's policy picks has room,
else queues the request in every candidate pool at once, served by weighted deficit round
robin (costed in estimated tokens, weighted by tier): the first pool to free a slot takes
it. Past ``DISPATCH_QUEUE_TIMEOUT_S`` the request gets 429 with ``Retry-After``; a client
that disconnects leaves the queue. On shared pools no tenant holds more than
``DISPATCH_MAX_TENANT_SHARE`` of the slots. A lease goes back to its table exactly once,
telling the replica's circuit breaker how the request went. Everything runs on one event
loop: no locks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.errors import DomainError, NoCapacityError, QueueTimeoutError
from app.inference.fairqueue import DeficitRoundRobin, Entry
from app.inference.pools import PoolConfig, PoolKind
from app.inference.replica import Replica
from app.inference.routing import ReplicaPolicy, TenantRoute
from app.settings import DispatchSettings

log = logging.getLogger(__name__)
Disconnected = Callable[[], Awaitable[Any]]


class ClientGoneError(DomainError):
    """The client disconnected while its request waited (nobody reads the answer)."""

    code = "client_closed_request"
    title = "Client closed request"


@dataclass(eq=False)
class Pool:
    """A configured pool with its live replicas, its replica policy and its queue."""

    config: PoolConfig
    replicas: list[Replica]
    queue: DeficitRoundRobin[Waiter]
    policy: ReplicaPolicy
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

    def __init__(self, table: SlotTable, pool: Pool, replica: Replica,
                 tenant_key: bytes, share_start: float) -> None:
        self._table = table
        self.pool = pool
        self.replica = replica
        self.tenant_key = tenant_key
        self.started = time.monotonic()
        self.share_start = share_start
        self.share_end: float | None = None
        self.released = False
        # A generation's time feeds the replica's measured duration (least_latency);
        # a /tokenize call's does not.
        self.generation = True

    def release(self, ok: bool | None) -> None:
        """Give the slot back. ``ok``: the replica worked (True), failed (False), or
        the outcome says nothing about it (None: e.g. the client went away)."""
        if self.released:
            return
        self.released = True
        self._table.release(self, ok)

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


def no_capacity(tenant: TenantRoute, model: str, retry_after_s: float) -> NoCapacityError:
    """503: no candidate replica is healthy."""
    where = f" in region {tenant.data_region!r}" if tenant.data_region else ""
    return NoCapacityError(f"no healthy generation server for model {model!r}{where}; "
                           "retry shortly", model=model, retry_after_s=retry_after_s)


class SlotTable:
    """The pools' slots: grant, wait fairly, release, hand freed slots to waiters."""

    def __init__(self, pools: list[Pool], settings: DispatchSettings) -> None:
        self.pools = pools
        self.settings = settings

    async def acquire(self, tenant: TenantRoute, model: str, pools: list[Pool], cost: float,
                      exclude: frozenset[str] = frozenset(),
                      disconnected: Disconnected | None = None) -> Lease:
        """A slot for the tenant's request in the first of ``pools`` (its candidates, in
        order) whose policy finds a replica with room; waits fairly when all are busy.
        503 if no candidate replica is healthy, 429 past the queue timeout."""
        now = time.monotonic()
        if not any(r.usable(now) and r.url not in exclude for p in pools for r in p.replicas):
            raise no_capacity(tenant, model, self.settings.health_interval_s)
        share = self.settings.max_tenant_share
        for pool in pools:
            if len(pool.queue) or not pool.within_share(tenant.key, share):
                continue  # others wait here (do not jump ahead), or at its share: wait
            replica = pool.policy.choose(pool.replicas, tenant.key, exclude)
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
                retry_after_s=self.retry_after(pools))
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
            f"{s.queue_timeout_s:g} s", retry_after_s=self.retry_after(pools))

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

    def release(self, lease: Lease, ok: bool | None) -> None:
        """The lease's slot is free again (call :meth:`Lease.release`, not this)."""
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
            took = now - lease.started
            pool.mean_duration_s += 0.1 * (took - pool.mean_duration_s)
            if lease.generation:
                replica.observe_duration(took)
        elif ok is False and replica.breaker.on_failure(now):
            log.warning("circuit opened for replica %s of pool %s", replica.url, pool.name)
        elif ok is None:
            replica.breaker.trial_in_flight = False
        self.pump(pool)

    def pump(self, pool: Pool) -> None:
        """Hand free slots of ``pool`` to its waiters, fairest first."""
        share = self.settings.max_tenant_share
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
            replica = pool.policy.choose(pool.replicas, waiter.tenant.key)
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

    def retry_after(self, pools: Sequence[Pool]) -> int:
        """Seconds until a retry likely finds room: the queue ahead drained at the
        pools' pace (clamped to 1..60)."""
        slots = sum(p.capacity() for p in pools) or 1
        queued = sum(len(p.queue) for p in pools)
        mean = max(p.mean_duration_s for p in pools)
        return max(1, min(60, math.ceil(mean * (queued + 1) / slots)))
