"""Console sign-in attempts, limited per client address and per key prefix in Redis.

Each bucket (``ip:<address>``, ``prefix:<key prefix>``) is a sliding window: a sorted
set of the last minute's attempts, trimmed, counted and added to in one script on
Redis's own clock, so the limit holds across every API process. An attempt over the
limit is not recorded, and its ``Retry-After`` is when the oldest counted attempt leaves
the window. The tenant quota machinery (app/quotas) does not fit: its script admits a
tenant's requests, and nobody is known before the key is checked.
"""

from __future__ import annotations

import math
import secrets

import redis.asyncio as aioredis

from app.auth.sessions import redis_errors
from app.errors import RateLimitedError

WINDOW_S = 60

# KEYS[1]: the bucket's attempts; ARGV: window (ms), limit, a unique member.
# Returns 0 (counted) or the milliseconds until an attempt would be.
SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""


class SignInAttempts:
    """``per_minute`` sign-in attempts per bucket."""

    def __init__(self, redis: aioredis.Redis, namespace: str, per_minute: int) -> None:
        self.prefix = f"{namespace}:console:signin"
        self.per_minute = per_minute
        self._script = redis.register_script(SLIDING_WINDOW)

    async def attempt(self, *buckets: str) -> None:
        """Count one attempt in each bucket, in order; RateLimitedError (429 with
        ``Retry-After``) at the first that is full."""
        for bucket in buckets:
            async with redis_errors():
                wait_ms = int(await self._script(
                    keys=[f"{self.prefix}:{bucket}"],
                    args=[WINDOW_S * 1000, self.per_minute, secrets.token_hex(8)]))
            if wait_ms > 0:
                wait_s = math.ceil(wait_ms / 1000)
                raise RateLimitedError(
                    f"too many sign-in attempts (at most {self.per_minute} a minute); "
                    f"retry in {wait_s} s", limit="console_sign_in", retry_after_s=wait_s)
