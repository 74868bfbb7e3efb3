"""The Dramatiq broker over Redis, and the worker that consumes it.

Actors bind to the global broker when their module is imported, so the broker is set up
first and the actor modules imported after (see :func:`setup_broker`).
"""

from __future__ import annotations

import importlib
import logging

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from app.settings import Settings

log = logging.getLogger(__name__)
ACTOR_MODULES: tuple[str, ...] = ("workers.actors",)


def setup_broker(settings: Settings) -> RedisBroker:
    """Create the Redis broker, make it global, then import the actor modules."""
    if not settings.redis.url:
        raise ValueError("REDIS_URL is not set")
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=settings.redis.url, namespace=settings.worker.namespace,
        heartbeat_timeout=settings.worker.heartbeat_timeout_s * 1000,
    )
    dramatiq.set_broker(broker)
    for module in ACTOR_MODULES:
        importlib.import_module(module)
    return broker


def start_worker(broker: RedisBroker, threads: int) -> dramatiq.Worker:
    """Start consuming every declared queue with ``threads`` worker threads."""
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=1000)
    worker.start()
    log.info("dramatiq worker started: %d threads, queues %s", threads, sorted(broker.queues))
    return worker
