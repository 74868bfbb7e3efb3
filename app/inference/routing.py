"""Routing: which pools may serve a tenant's request, in which order, and which replica.

Two seams, because they answer different questions. *Which pools* (:class:`RoutingPolicy`,
default :class:`TierRouting`) is the tenant's isolation contract: its dedicated pool,
else the shared pools of its tier, only in its data region, spillover only when allowed.
It is one rule for the whole platform, so it is given to the dispatcher, not to a pool.
*Which replica* inside a pool (:class:`ReplicaPolicy`) is a load-balancing choice that can
differ per pool (its servers, its models), so each pool names one in its configuration
(``routing``, :class:`app.inference.pools.Routing`): ``least_loaded`` (the default: least
loaded with tenant affinity, :func:`app.inference.replica.choose`) or ``least_latency``
(:class:`LeastExpectedLatency`). A replica policy never sees another tenant's dedicated
pool or another region: it only picks among the replicas of a pool already allowed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from app.db.models import Tenant, Tier
from app.errors import NoCapacityError
from app.inference.pools import PoolConfig, PoolKind, Routing
from app.inference.replica import Replica, choose


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


class Configured(Protocol):
    """Anything carrying a pool's configuration (a live pool)."""

    @property
    def config(self) -> PoolConfig: ...


P = TypeVar("P", bound=Configured)


class RoutingPolicy(Protocol):
    """Chooses the pools that may serve a tenant's request, in order of preference."""

    def pools_for(self, pools: Sequence[P], tenant: TenantRoute, model: str) -> list[P]:
        """The candidates (never empty: raise ``NoCapacityError`` instead)."""
        ...


class TierRouting:
    """Today's rule: the tenant's dedicated pool first (the shared pools of its tier
    after it only with ``allow_spillover``), else the shared pools of its tier; only pools
    serving the model, only in the tenant's data region."""

    def pools_for(self, pools: Sequence[P], tenant: TenantRoute, model: str) -> list[P]:
        """The candidates, in order of preference; 503 if there are none."""
        tid = str(tenant.id)
        dedicated = [p for p in pools if p.config.kind is PoolKind.dedicated
                     and p.config.serves_tenant(tenant.slug, tid)]
        shared = [p for p in pools if p.config.kind is PoolKind.shared
                  and (not p.config.tiers or tenant.tier in p.config.tiers)]
        chosen = dedicated + shared if (not dedicated or tenant.allow_spillover) else dedicated
        chosen = [p for p in chosen if model in p.config.models]
        if tenant.data_region is not None:
            chosen = [p for p in chosen if p.config.region == tenant.data_region]
        if not chosen:
            where = f" in region {tenant.data_region!r}" if tenant.data_region else ""
            raise NoCapacityError(f"no generation pool serves model {model!r} for this "
                                  f"tenant{where}", model=model)
        return chosen


class ReplicaPolicy(Protocol):
    """Chooses the replica of one pool for a tenant's request."""

    def choose(self, replicas: list[Replica], tenant_key: bytes,
               exclude: frozenset[str] = frozenset()) -> Replica | None:
        """A usable replica below its cap (not in ``exclude``), or None if none has room."""
        ...


class LeastLoaded:
    """Least loaded, with tenant affinity (:func:`app.inference.replica.choose`)."""

    def __init__(self, headroom: float) -> None:
        self.headroom = headroom

    def choose(self, replicas: list[Replica], tenant_key: bytes,
               exclude: frozenset[str] = frozenset()) -> Replica | None:
        """The tenant's favourite unless it is clearly busier than the least loaded."""
        return choose(replicas, tenant_key, self.headroom, exclude)


class LeastExpectedLatency:
    """The replica whose next request should finish soonest: its measured mean request
    duration (an EWMA, :attr:`Replica.mean_duration_s`) times the requests it would run
    (ours in flight, vLLM's waiting, plus this one). A replica not yet measured is
    assumed as fast as the fastest measured one, so it gets tried and measured. Ties
    (e.g. nothing measured yet) go to the less busy, then the tenant's favourite."""

    def __init__(self, headroom: float) -> None:
        self.headroom = headroom  # unused: latency, not affinity, decides here

    def choose(self, replicas: list[Replica], tenant_key: bytes,
               exclude: frozenset[str] = frozenset()) -> Replica | None:
        """The usable replica with room and the lowest expected completion time."""
        now = time.monotonic()
        candidates = [r for r in replicas
                      if r.url not in exclude and r.has_room() and r.usable(now)]
        if not candidates:
            return None
        measured = [r.mean_duration_s for r in candidates if r.mean_duration_s is not None]
        prior = min(measured) if measured else 0.0

        def rank(r: Replica) -> tuple[float, float, int]:
            mean = r.mean_duration_s if r.mean_duration_s is not None else prior
            busy = r.in_flight + r.waiting
            return mean * (busy + 1), busy, -r.affinity(tenant_key)

        return min(candidates, key=rank)


# Every ``routing`` value a pool may name, and the policy it builds (given the
# affinity headroom). A value without an entry here is refused at start.
REPLICA_POLICIES: dict[Routing, Callable[[float], ReplicaPolicy]] = {
    Routing.least_loaded: LeastLoaded,
    Routing.least_latency: LeastExpectedLatency,
}


def replica_policy(config: PoolConfig, headroom: float) -> ReplicaPolicy:
    """The replica policy the pool's configuration names."""
    make = REPLICA_POLICIES.get(config.routing)
    if make is None:
        raise ValueError(f"pool {config.name!r}: routing {config.routing.value!r} has no "
                         "policy in app.inference.routing.REPLICA_POLICIES")
    return make(headroom)
