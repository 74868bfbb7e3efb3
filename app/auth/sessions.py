"""Console sessions in Redis: what a browser holds instead of an API key.

Signing in to the web console exchanges a key for a random 256-bit session id, which the
browser keeps in an HttpOnly cookie (app/http/sessions.py). Redis stores only the id's
SHA-256, so a dump of Redis holds nothing a browser could present; under it, who signed
in (the principal's kind, tenant, key id and scopes), the session's CSRF token, when it
began and when it was last used. A session ends when unused for ``idle_s``, ``max_s``
after it began whatever its use (both checked on every use; Redis's TTL only forgets it),
when signed out, or with every session of its key (:meth:`SessionStore.end_all`). The key
itself is never stored: each use re-checks it by its id through the credential cache
(``ApiKeyAuthenticator.recheck``), so a revoked key's sessions end within a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.auth.keys import Scope
from app.auth.principal import PlatformPrincipal, Principal, TenantPrincipal
from app.errors import ServiceUnavailableError

Kind = Literal["tenant", "operator"]
MAX_ID_CHARS = 64  # a session id is 43 characters; a longer cookie is not one of ours


class ConsoleSession(msgspec.Struct, frozen=True):
    """One signed-in browser, as stored (under the hash of its id)."""

    digest: str  # SHA-256 of the session id: the Redis key's last part
    kind: Kind
    credential: str  # the tenant key's id, or the operator key's fingerprint
    tenant_id: str | None
    scopes: tuple[str, ...]
    csrf_token: str
    created: float  # seconds since the epoch
    last_seen: float


def may_use_console(principal: Principal) -> bool:
    """The console is for people who administer: the operator, and tenant keys holding
    ``admin``; never embed tokens or chat/ingest-only keys."""
    if isinstance(principal, PlatformPrincipal):
        return True
    return isinstance(principal, TenantPrincipal) and Scope.admin in principal.scopes


def digest_of(session_id: str) -> str:
    """How Redis names a session: the SHA-256 of its id (the id has 256 random bits, so
    an unkeyed hash cannot be reversed or guessed)."""
    return hashlib.sha256(session_id.encode()).hexdigest()


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Redis unreachable: the client's 503, not a 500."""
    try:
        yield
    except RedisError as exc:
        raise ServiceUnavailableError("the session store (Redis) is unavailable; retry "
                                      "shortly", retry_after_s=2) from exc


class SessionStore:
    """Console sessions under ``<namespace>:console:``, with their idle and absolute
    lifetimes. ``clock`` (seconds since the epoch) is replaceable (tests move time)."""

    def __init__(self, redis: aioredis.Redis, namespace: str, idle_s: int, max_s: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.prefix = f"{namespace}:console"
        self.idle_s = idle_s
        self.max_s = max_s
        self.clock = clock

    def key_of(self, digest: str) -> str:
        """The Redis key holding a session."""
        return f"{self.prefix}:session:{digest}"

    def _index(self, credential: str) -> str:
        """The set of one key's sessions (for :meth:`end_all`)."""
        return f"{self.prefix}:key:{credential}"

    async def create(self, principal: Principal, credential: str) -> tuple[str, ConsoleSession]:
        """A new session for ``principal`` (which :func:`may_use_console`): its id, to
        give the browser once, and what is stored."""
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        tenant = principal if isinstance(principal, TenantPrincipal) else None
        session = ConsoleSession(
            digest=digest_of(session_id), kind="tenant" if tenant else "operator",
            credential=credential, tenant_id=str(tenant.tenant_id) if tenant else None,
            scopes=tuple(sorted(tenant.scopes)) if tenant else (),
            csrf_token=secrets.token_urlsafe(32), created=now, last_seen=now)
        async with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.key_of(session.digest), msgspec.json.encode(session),
                     px=self.idle_s * 1000)
            pipe.sadd(self._index(credential), session.digest)
            pipe.expire(self._index(credential), self.max_s)  # outlives its sessions
            await pipe.execute()
        return session_id, session

    async def _load(self, session_id: str) -> ConsoleSession | None:
        if not session_id or len(session_id) > MAX_ID_CHARS:
            return None
        async with redis_errors():
            raw = await self.redis.get(self.key_of(digest_of(session_id)))
        if raw is None:
            return None
        try:
            return msgspec.json.decode(raw, type=ConsoleSession)
        except msgspec.DecodeError:  # written by another version: not a session now
            return None

    async def resolve(self, session_id: str) -> ConsoleSession | None:
        """The live session with this id, its use recorded; None when there is none or
        it has gone idle or reached its end (then it is deleted)."""
        session = await self._load(session_id)
        if session is None:
            return None
        now = self.clock()
        left_s = min(self.idle_s, session.created + self.max_s - now)
        if now - session.last_seen >= self.idle_s or left_s <= 0:
            await self.end(session)
            return None
        used = msgspec.structs.replace(session, last_seen=now)
        async with redis_errors():  # XX: a session ended meanwhile is not brought back
            kept = await self.redis.set(self.key_of(session.digest), msgspec.json.encode(used),
                                        px=max(1, int(left_s * 1000)), xx=True)
        return used if kept else None

    def expires_at(self, session: ConsoleSession) -> float:
        """When the session ends whatever its use."""
        return session.created + self.max_s

    async def end(self, session: ConsoleSession) -> None:
        """Sign one session out."""
        async with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self.key_of(session.digest))
            pipe.srem(self._index(session.credential), session.digest)
            await pipe.execute()

    async def discard(self, session_id: str) -> None:
        """End the session with this id, if there is one (a browser signing in again)."""
        session = await self._load(session_id)
        if session is not None:
            await self.end(session)

    async def end_all(self, credential: str) -> int:
        """End every session of one key (or of the operator key); how many there were."""
        index = self._index(credential)
        async with redis_errors():
            digests = await self.redis.smembers(index)
            pipe = self.redis.pipeline(transaction=False)
            for digest in digests:
                pipe.delete(self.key_of(digest.decode() if isinstance(digest, bytes)
                                        else digest))
            pipe.delete(index)
            ended = await pipe.execute()
        return sum(ended[:-1])


def tenant_credential(principal: TenantPrincipal) -> str:
    """The credential a tenant key's sessions are filed under: the key's id."""
    return str(principal.key_id)


def credential_key_id(session: ConsoleSession) -> uuid.UUID:
    """The id of the tenant key a tenant session was opened with."""
    return uuid.UUID(session.credential)
