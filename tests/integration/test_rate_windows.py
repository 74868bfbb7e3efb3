"""The per-minute windows against a plain model of them, on real Redis: random
admissions and settlements over a driven clock (bursts, quiet spells longer than the
window, a process whose clock is a little behind), each answer compared with what
counting the last minute's requests and tokens by hand gives."""

from __future__ import annotations

import functools
import math
import random
import uuid
from collections import defaultdict

import pytest
import redis.asyncio as aioredis

from app.errors import RateLimitedError
from app.quotas.limiter import Limits, RateLimiter, Ticket
from app.quotas.scripts import WINDOW_S
from app.settings import Settings

RPM, TPM = 12, 400


class Model:
    """What the windows must say: requests and tokens by second, summed over the
    seconds after the window's start. The start is the latest clock that has looked at
    that window minus ``WINDOW_S``: a process whose clock is behind does not bring back
    seconds another has already let go."""

    def __init__(self) -> None:
        self.requests: dict[int, int] = defaultdict(int)
        self.tokens: dict[int, int] = defaultdict(int)
        self.seen_requests = self.seen_tokens = -(10**12)

    def held(self, seen: int) -> list[int]:
        return sorted(b for b in self.requests if b > seen - WINDOW_S)

    def admit(self, now: int, cost: int) -> tuple[str, int, int, int]:
        """('ok', remaining requests, remaining tokens, reset s) or the refusal's
        (limit, retry after, 0, 0)."""
        self.seen_requests = max(self.seen_requests, now)
        held = self.held(self.seen_requests)
        reset = held[0] + WINDOW_S - now if held else WINDOW_S
        used = sum(self.requests[b] for b in held)
        if used + 1 > RPM:
            return "requests", max(1, reset), 0, 0
        self.seen_tokens = max(self.seen_tokens, now)
        held_tokens = self.held(self.seen_tokens)
        tokens = sum(self.tokens[b] for b in held_tokens)
        if tokens + cost > TPM:
            reset_tokens = held_tokens[0] + WINDOW_S - now if held_tokens else WINDOW_S
            return "tokens", max(1, reset_tokens), 0, 0
        self.requests[now] += 1
        self.tokens[now] += cost
        return "ok", RPM - used - 1, TPM - tokens - cost, reset

    def settle(self, bucket: int, cost: int, actual: int) -> None:
        self.tokens[bucket] += actual - cost


@pytest.mark.parametrize("seed", range(4))
async def test_windows_count_exactly_the_last_minute(settings: Settings, seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311  # a reproducible sequence, not a secret
    async with aioredis.Redis.from_url(settings.redis.url or "") as r:
        limiter = RateLimiter(r, namespace=f"test-{uuid.uuid4().hex[:8]}")
        tenant, model = uuid.uuid4(), Model()
        clock = 1_800_000_000.0
        open_tickets: list[Ticket] = []

        async def no_usage(_: str) -> int:
            return 0

        for step in range(400):
            clock += rng.choice([0, 0, 0.05, 0.3, 0.9, 1, 2.5, 7, 30, 59, 61, 150])
            behind = rng.choice([0.0] * 6 + [1.0, 2.5])  # another process's clock
            now = clock - behind
            limiter.clock = functools.partial(float, now)
            cost = rng.randint(1, 90)
            expected = model.admit(math.floor(now), cost)
            try:
                ticket = await limiter.admit(tenant, "", Limits(rpm=RPM, tpm=TPM), cost,
                                             no_usage)
            except RateLimitedError as exc:
                got = (exc.extra["limit"], exc.extra["retry_after_s"], 0, 0)
            else:
                h = ticket.headers
                got = ("ok", int(h["x-ratelimit-remaining-requests"]),
                       int(h["x-ratelimit-remaining-tokens"]),
                       int(h["x-ratelimit-reset-requests"].rstrip("s")))
                expected = (*expected[:2], max(0, expected[2]), expected[3])
                open_tickets.append(ticket)
            assert got == expected, f"step {step} at {now - 1_800_000_000:.2f}s"
            while open_tickets and rng.random() < 0.6:  # settle some, in any order
                done = open_tickets.pop(rng.randrange(len(open_tickets)))
                actual = rng.randint(0, done.cost)
                await limiter.settle(done, actual)
                model.settle(done.bucket, done.cost, actual)
