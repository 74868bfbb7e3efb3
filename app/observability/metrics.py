"""Prometheus metrics of the API process: chat requests, tokens, latency, GPU time, cost,
rejections by reason, and the dispatcher's queues and replicas (read at scrape time).

Cardinality is bounded: the first ``max_tenants`` tenants seen by this process get their
own ``tenant`` label (their slug), the rest share ``other``; a model the pools do not
serve is ``other``; statuses and reasons are the API's own error codes. Each API process
has its own registry (no process-global state); Prometheus scrapes every replica and
sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.inference.dispatcher import Dispatcher

OTHER = "other"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class ServiceMetrics:
    """The process's counters and histograms, labelled by tenant and model."""

    def __init__(self, max_tenants: int, known_models: Callable[[], Iterable[str]]) -> None:
        self.registry = CollectorRegistry()
        self.max_tenants = max_tenants
        self._known_models = known_models
        self._tenants: set[str] = set()
        r, tm = self.registry, ["tenant", "model"]
        self.requests = Counter("tenantrag_chat_requests", "Chat requests that were admitted, "
                                "by how they ended", [*tm, "status"], registry=r)
        self.tokens = Counter("tenantrag_tokens", "Tokens metered (prompt, completion, "
                              "cached prompt)", [*tm, "type"], registry=r)
        self.latency = Histogram("tenantrag_chat_duration_seconds", "Chat request duration, "
                                 "admission to last byte", tm, buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("tenantrag_time_to_first_token_seconds", "Time to the first "
                              "generated token", tm, buckets=TTFT_BUCKETS, registry=r)
        self.gpu_seconds = Counter("tenantrag_gpu_seconds", "GPU seconds attributed to "
                                   "requests", tm, registry=r)
        self.cost = Counter("tenantrag_cost_usd", "Metered cost in USD", tm, registry=r)
        self.rejections = Counter("tenantrag_rejections", "Requests refused before "
                                  "generation, by reason", ["tenant", "reason"], registry=r)
        self.usage_quarantined = Counter(
            "tenantrag_usage_events_quarantined", "Usage events PostgreSQL refused, set "
            "aside in usage_quarantine (GET /admin/usage/quarantine), by kind and the "
            "driver's error class", ["kind", "error"], registry=r)

    def tenant_label(self, slug: str) -> str:
        """The tenant's label: its slug while under the bound, else ``other``."""
        if slug in self._tenants:
            return slug
        if len(self._tenants) < self.max_tenants:
            self._tenants.add(slug)
            return slug
        return OTHER

    def model_label(self, model: str) -> str:
        """The model's label: its name if a pool serves it, else ``other``."""
        return model if model in set(self._known_models()) else OTHER

    def observe_chat(self, tenant: str, model: str, status: str, *, prompt: int,
                     completion: int, cached: int, duration_s: float, ttft_s: float | None,
                     gpu_seconds: float | None, cost_usd: float) -> None:
        """One admitted chat request, however it ended."""
        labels = (self.tenant_label(tenant), self.model_label(model))
        self.requests.labels(*labels, status).inc()
        for kind, n in (("prompt", prompt), ("completion", completion), ("cached", cached)):
            if n:
                self.tokens.labels(*labels, kind).inc(n)
        self.latency.labels(*labels).observe(duration_s)
        if ttft_s is not None:
            self.ttft.labels(*labels).observe(ttft_s)
        if gpu_seconds:
            self.gpu_seconds.labels(*labels).inc(gpu_seconds)
        if cost_usd:
            self.cost.labels(*labels).inc(cost_usd)

    def rejected(self, tenant: str, reason: str) -> None:
        """A request refused by a limit, a budget, or a full or missing pool."""
        self.rejections.labels(self.tenant_label(tenant), reason).inc()

    def quarantined(self, kind: str, error: str) -> None:
        """A usage event the writer could not store (kept in the quarantine)."""
        self.usage_quarantined.labels(kind, error).inc()

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class DispatchCollector(Collector):
    """Queue depth and replica load of the dispatcher, read when Prometheus scrapes."""

    def __init__(self, dispatcher: Callable[[], Dispatcher | None]) -> None:
        self._dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        """Gauges per pool and replica."""
        queued = GaugeMetricFamily("tenantrag_queue_depth", "Requests waiting for a "
                                   "generation slot", labels=["pool"])
        in_flight = GaugeMetricFamily("tenantrag_replica_in_flight", "Requests this "
                                      "process has on the replica", labels=["pool", "replica"])
        usable = GaugeMetricFamily("tenantrag_replica_usable", "1 if the replica is healthy "
                                   "and its circuit closed", labels=["pool", "replica"])
        dispatcher = self._dispatcher()
        for pool in dispatcher.snapshot() if dispatcher is not None else []:
            queued.add_metric([pool["name"]], pool["queued"])
            for replica in pool["replicas"]:
                labels = [pool["name"], replica["url"]]
                in_flight.add_metric(labels, replica["in_flight"])
                usable.add_metric(labels, 1.0 if replica["usable"] else 0.0)
        yield from (queued, in_flight, usable)

    def describe(self) -> list[Any]:
        """Nothing up front (the pools may change with the dispatcher)."""
        return []
