"""One vLLM server of a pool: its load, its health, and a circuit breaker on its errors.

Besides what it reports (``/health``, ``/metrics``) a replica keeps what we measure of
it: requests in flight, each request's share of it, and a moving average of how long its
requests take (read by the ``least_latency`` routing policy).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from app.inference.upstream import Upstream

log = logging.getLogger(__name__)

# vLLM's gauges (the KV-cache one was renamed in 0.10; both are read).
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass
class CircuitBreaker:
    """Closed until ``threshold`` consecutive failures, then open (no traffic) for
    ``cooldown_s``; then half-open: one trial request closes it on success or opens it
    again on failure."""

    threshold: int
    cooldown_s: float
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False

    def allows(self, now: float) -> bool:
        """May a request go to this replica now?"""
        if self.opened_at is None:
            return True
        return now - self.opened_at >= self.cooldown_s and not self.trial_in_flight

    def on_dispatch(self, now: float) -> None:
        """A request was sent; in half-open state it is the one trial."""
        if self.opened_at is not None and now - self.opened_at >= self.cooldown_s:
            self.trial_in_flight = True

    def on_success(self) -> None:
        """The replica answered: close."""
        self.failures, self.opened_at, self.trial_in_flight = 0, None, False

    def on_failure(self, now: float) -> bool:
        """The replica failed; True if that opened the breaker."""
        self.failures += 1
        was_open = self.opened_at is not None
        self.trial_in_flight = False
        if was_open or self.failures >= self.threshold:
            self.opened_at = now
            return not was_open
        return False

    @property
    def is_open(self) -> bool:
        """True while open or half-open."""
        return self.opened_at is not None


@dataclass(eq=False)
class Replica:
    """A server of ``pool`` with its in-flight count (ours) and vLLM's own gauges."""

    pool: str
    url: str
    upstream: Upstream
    cap: int
    breaker: CircuitBreaker
    in_flight: int = 0
    healthy: bool = True  # optimistic until the first probe says otherwise
    waiting: float = 0.0  # requests queued inside vLLM (its /metrics)
    kv_cache_usage: float = 0.0  # 0..1 (its /metrics)
    # Processor-sharing clock: seconds of replica time per request in flight, summed
    # (it advances by dt / n while n requests run). A request's share of the replica
    # is the clock's advance between its start and its end.
    share_clock: float = 0.0
    # Moving average (EWMA) of its requests' durations, seconds; None until one ends.
    mean_duration_s: float | None = None
    _clock_at: float = field(default_factory=time.monotonic)
    key: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.key = self.url.encode()

    def share_now(self, now: float) -> float:
        """The processor-sharing clock at ``now``."""
        if self.in_flight <= 0:
            return self.share_clock
        return self.share_clock + (now - self._clock_at) / self.in_flight

    def start_request(self, now: float) -> float:
        """One more request runs here; returns the clock at its start."""
        self.share_clock, self._clock_at = self.share_now(now), now
        self.in_flight += 1
        return self.share_clock

    def end_request(self, now: float) -> float:
        """A request ended here; returns the clock at its end."""
        self.share_clock, self._clock_at = self.share_now(now), now
        self.in_flight -= 1
        return self.share_clock

    def observe_duration(self, seconds: float, alpha: float = 0.2) -> None:
        """A request ended well here after ``seconds``: fold it into the average."""
        mean = self.mean_duration_s
        self.mean_duration_s = seconds if mean is None else mean + alpha * (seconds - mean)

    def mark_down(self, reason: object) -> None:
        """It refused a connection: out until its next good probe."""
        self.healthy = False
        log.warning("replica %s unreachable; marked down: %s", self.url, reason)

    def usable(self, now: float) -> bool:
        """Healthy and not cut off by its breaker."""
        return self.healthy and self.breaker.allows(now)

    def has_room(self) -> bool:
        """Below its in-flight cap."""
        return self.in_flight < self.cap

    def load(self) -> float:
        """Fraction of its cap in use, counting requests waiting inside the engine; a
        nearly full KV cache counts as full (the engine would queue or preempt)."""
        load = (self.in_flight + self.waiting) / self.cap
        return max(load, 1.0) if self.kv_cache_usage >= 0.98 else load

    def affinity(self, tenant_key: bytes) -> int:
        """Rendezvous (highest random weight) score of a tenant on this replica."""
        digest = hashlib.blake2b(tenant_key + b"\0" + self.key, digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def read_metrics(self, text: str) -> None:
        """Take the waiting-requests and KV-cache gauges from a ``/metrics`` page (summed
        over the engines it reports)."""
        waiting = kv = 0.0
        found_kv = 0
        try:
            for family in text_string_to_metric_families(text):
                if family.name == WAITING:
                    waiting += sum(s.value for s in family.samples)
                elif family.name in KV_CACHE:
                    values = [s.value for s in family.samples]
                    if values:
                        kv, found_kv = max(kv, max(values)), found_kv + 1
        except ValueError as exc:  # a page we cannot parse: keep the last readings
            log.warning("unreadable /metrics from %s: %s", self.url, exc)
            return
        self.waiting = waiting
        self.kv_cache_usage = kv if found_kv else 0.0


def choose(replicas: list[Replica], tenant_key: bytes, headroom: float,
           exclude: frozenset[str] = frozenset()) -> Replica | None:
    """The replica for a tenant's request, or None if every usable one is at its cap.

    Least loaded, with tenant affinity: among replicas with room, the tenant's
    rendezvous favourite wins if its load is within ``headroom`` (a fraction of the cap)
    of the least loaded one's, so its system-prompt prefix stays warm in one replica's
    cache until that replica is clearly busier than the others.
    """
    now = time.monotonic()
    candidates = [r for r in replicas
                  if r.url not in exclude and r.has_room() and r.usable(now)]
    if not candidates:
        return None
    least = min(r.load() for r in candidates)
    near = [r for r in candidates if r.load() <= least + headroom]
    return max(near, key=lambda r: r.affinity(tenant_key))
