"""Model facts: what the generation servers know about a model, asked of them.

The context window (from settings, else ``/v1/models``' ``max_model_len``; asked once per
pool and model) needs no slot: any healthy server of the tenant's first pool answers
(its affinity replica first). Token counts (vLLM's ``/tokenize``: a prompt with the chat
template, or a completion's plain text) make the server work as a generation does, so
they take a slot and wait their turn in the fair queue like one, through the
dispatcher's send (with its failover).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from app.errors import UpstreamConnectError
from app.inference.routing import TenantRoute
from app.inference.slots import Disconnected, Lease, Pool, no_capacity
from app.inference.upstream import Upstream

T = TypeVar("T")


class Candidates(Protocol):
    """The tenant's candidate pools for a model, in order (the dispatcher's routing)."""

    def __call__(self, tenant: TenantRoute, model: str) -> list[Pool]: ...


class Send(Protocol):
    """Take a slot and send there, with failover (the dispatcher's)."""

    def __call__(self, tenant: TenantRoute, model: str, body: dict[str, Any], cost: float,
                 disconnected: Disconnected | None,
                 send: Callable[[Upstream, dict[str, Any]], Awaitable[T]],
                 ) -> Awaitable[tuple[T, Lease, int]]: ...


class ModelFacts:
    """Context windows and token counts of the served models."""

    def __init__(self, candidates: Candidates, send: Send, retry_after_s: float) -> None:
        self._candidates = candidates
        self._send = send
        self._retry_after_s = retry_after_s
        self._windows: dict[tuple[str, str], int] = {}

    async def ask_any(self, tenant: TenantRoute, model: str,
                      ask: Callable[[Upstream], Awaitable[T]]) -> tuple[Pool, T]:
        """Ask a healthy server of the tenant's first pool that has one (its affinity
        replica first); an unreachable one is marked down and the next is tried, once."""
        tried: set[str] = set()
        for _ in (1, 2):
            now = time.monotonic()
            for pool in self._candidates(tenant, model):
                usable = [r for r in pool.replicas if r.usable(now) and r.url not in tried]
                if usable:
                    break
            else:
                raise no_capacity(tenant, model, self._retry_after_s)
            replica = max(usable, key=lambda r: r.affinity(tenant.key))
            try:
                return pool, await ask(replica.upstream)
            except UpstreamConnectError as exc:
                replica.mark_down(exc)
                tried.add(replica.url)
                last = exc
        raise last

    async def context_window(self, tenant: TenantRoute, model: str) -> int:
        """The model's context window on the tenant's first pool (asked once per pool)."""
        for pool in self._candidates(tenant, model):
            if (pool.name, model) in self._windows:
                return self._windows[(pool.name, model)]
        pool, window = await self.ask_any(tenant, model, lambda u: u.context_window(model))
        self._windows[(pool.name, model)] = window
        return window

    async def count_prompt_tokens(self, tenant: TenantRoute, model: str,
                                  messages: Sequence[dict[str, Any]], cost: float = 1.0,
                                  ) -> int:
        """Exact prompt tokens, from a server of the tenant's pool (``/tokenize``), in a
        slot taken as a generation's (waiting its turn, ``cost`` tokens)."""
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
        lease.generation = False  # milliseconds: not what a replica's answers take
        lease.release(True)
        return count
