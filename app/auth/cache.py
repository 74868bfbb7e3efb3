"""A short-lived cache of resolved tenant keys, kept honest by PostgreSQL.

A tenant key's principal (and its tenant row) is remembered for ``ttl_s`` so a chat
request does not pay two database transactions before it starts. Revocation and
suspension still take effect at once in every API process: a trigger on ``tenants``
and ``api_keys`` (migration 0006) sends ``NOTIFY tenantrag_auth, '<tenant id>'`` when
either changes, and each process listens on its own connection and drops that tenant's
entries; in the process that made the change, the commit itself drops them
(:func:`credential_owner`, via ``Database.on_commit``). While the process is not
listening (connecting, or its connection was lost) the cache is cleared and bypassed, so
a missed notification can never keep a revoked key alive; the TTL is a second bound.

Refusals are remembered too, for ``negative_ttl_s`` (:meth:`CredentialCache.refusal`):
a flood of requests with a bogus, revoked or suspended key costs one lookup per key and
period, not one database connection per request. Every credential change anywhere drops
them all (a reactivated tenant or restored key is not refused on); a newly minted key
was never presented before, so no refusal can be remembered for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from app.auth.principal import CachedPrincipal
from app.db.models import ApiKey, Tenant
from app.errors import DomainError

log = logging.getLogger(__name__)
CHANNEL = "tenantrag_auth"
HEARTBEAT_S = 5.0  # how often the listening connection proves it is alive


class CredentialCache:
    """Principals by the hash of the presented key, for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000,
                 negative_ttl_s: float = 0.0) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.negative_ttl_s = negative_ttl_s
        self.listening = False  # set by the listener; nothing is served without it
        self.generation = 0  # bumped by every drop: a lookup started before it is stale
        self._entries: dict[str, tuple[float, CachedPrincipal]] = {}
        self._refused: dict[str, tuple[float, DomainError]] = {}

    def refusal(self, digest: str) -> DomainError | None:
        """The error a key was refused with moments ago, if it still stands."""
        entry = self._refused.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._refused[digest]
            return None
        return entry[1]

    def refuse(self, digest: str, error: DomainError, generation: int) -> None:
        """Remember that a key looked up at ``generation`` was refused (bounded: the
        oldest refusal goes first)."""
        if self.negative_ttl_s <= 0 or generation != self.generation:
            return
        if len(self._refused) >= self.max_entries:
            self._refused.pop(next(iter(self._refused)))
        self._refused[digest] = (time.monotonic() + self.negative_ttl_s, error)

    def get(self, digest: str) -> CachedPrincipal | None:
        """The cached principal, if fresh and the cache is trustworthy now."""
        if not self.listening:
            return None
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._entries[digest]
            return None
        return entry[1]

    def put(self, digest: str, principal: CachedPrincipal, generation: int) -> None:
        """Remember a principal looked up at ``generation`` (ignored if anything was
        dropped since: the lookup may predate the change)."""
        if not self.listening or self.ttl_s <= 0 or generation != self.generation:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))  # the oldest
        keep = self.ttl_s
        if principal.expires_at is not None:  # a rotated key: not past its expiry
            keep = min(keep, (principal.expires_at - datetime.now(UTC)).total_seconds())
        self._entries[digest] = (time.monotonic() + keep, principal)

    def drop_tenant(self, tenant_id: uuid.UUID) -> None:
        """Forget every key of a tenant (one of its keys or the tenant changed)."""
        self.drop_tenants({tenant_id})

    def drop_tenants(self, tenant_ids: set[object]) -> None:
        """Forget every key of these tenants."""
        self.generation += 1
        self._refused.clear()  # a refusal names no tenant reliably: all go
        for digest in [d for d, (_, p) in self._entries.items() if p.tenant_id in tenant_ids]:
            del self._entries[digest]

    def clear(self) -> None:
        """Forget everything."""
        self.generation += 1
        self._entries.clear()
        self._refused.clear()


def credential_owner(row: object) -> uuid.UUID | None:
    """The tenant whose credentials a changed row affects (its keys, or itself)."""
    if isinstance(row, Tenant):
        return row.id
    if isinstance(row, ApiKey):
        return row.tenant_id
    return None


class CredentialChangeListener:
    """Listens for ``tenantrag_auth`` notifications on a connection of its own and
    keeps the cache in step; reconnects with backoff after losing PostgreSQL."""

    def __init__(self, dsn: str, cache: CredentialCache) -> None:
        self.dsn = dsn
        self.cache = cache
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # tests wait on it

    def start(self) -> None:
        """Start listening in the background."""
        self._task = asyncio.create_task(self._run(), name="credential-listener")

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._listen()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("credential change listener lost PostgreSQL (%s); keys are "
                            "checked in the database until it is back", exc)
            finally:
                self.cache.listening = False
                self.cache.clear()
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _listen(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn, timeout=5)
        try:
            lost = asyncio.Event()
            await conn.add_listener(CHANNEL, self._on_notify)
            conn.add_termination_listener(lambda _: self._on_lost(lost))
            self.cache.clear()  # whatever happened while not listening is unknown
            self.cache.listening = True
            self.connected.set()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), HEARTBEAT_S)
                await conn.execute("SELECT 1", timeout=HEARTBEAT_S)  # raises once lost
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    def _on_lost(self, lost: asyncio.Event) -> None:
        """The connection closed: stop trusting the cache at once."""
        self.cache.listening = False
        self.cache.clear()
        self.connected.clear()
        lost.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self.cache.drop_tenant(uuid.UUID(payload))
        except ValueError:
            self.cache.clear()
