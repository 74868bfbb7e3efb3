"""A test-only actor module, imported by the broker setup like the real actor modules."""

from __future__ import annotations

import dramatiq
import redis


@dramatiq.actor(queue_name="test-echo", max_retries=0)
def record_echo(redis_url: str, key: str, value: str) -> None:
    """Write ``value`` under ``key`` so the test can see the message was processed."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(key, value, ex=60)
    finally:
        client.close()
