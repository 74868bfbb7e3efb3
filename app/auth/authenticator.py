"""Resolve a presented credential to exactly one principal.

Resolved tenant keys are cached briefly (:mod:`app.auth.cache`); PostgreSQL announces
every revocation, rescoping and tenant change, so a revoked key or a suspended tenant is
refused on the next request in every process. Refused keys are remembered briefly too,
and concurrent lookups of one key share one query: a flood of requests with a bad key
holds at most one database connection per key, not one per request. Lookups of keys
not cached wait for one of ``max_lookups`` places, so a flood of distinct made-up keys
holds at most that many connections and leaves the rest of the pool to the tenants.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from sqlmodel import col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from app.auth.cache import CredentialCache
from app.auth.embed import EmbedClaims, EmbedTokenSigner, looks_like_jwt
from app.auth.keys import ParsedKey, Scope, hash_key, key_matches, parse_key
from app.auth.principal import (
    CachedPrincipal,
    EmbedPrincipal,
    PlatformPrincipal,
    Principal,
    TenantPrincipal,
)
from app.db.engine import Database
from app.db.models import ApiKey, Tenant, TenantStatus, utcnow
from app.errors import AuthenticationError, DomainError, TenantSuspendedError

MALFORMED = "malformed API key: expected 'Authorization: Bearer trk_...'"


class ApiKeyAuthenticator:
    """Checks platform and tenant keys against their stored hashes."""

    def __init__(self, db: Database, pepper: str, platform_key: str | None,
                 last_used_resolution: timedelta, cache: CredentialCache | None = None,
                 embed: EmbedTokenSigner | None = None, max_lookups: int = 5) -> None:
        self.db = db
        self.pepper = pepper
        self._platform_hash = hash_key(platform_key, pepper) if platform_key else None
        self.last_used_resolution = last_used_resolution
        self.cache = cache
        self.embed = embed
        self._pending: dict[str, asyncio.Future[CachedPrincipal]] = {}  # lookups under way
        self._lookups = asyncio.Semaphore(max_lookups)  # connections lookups may hold

    async def authenticate(self, presented: str) -> Principal:
        """The principal for a key, or AuthenticationError / TenantSuspendedError."""
        digest = hash_key(presented, self.pepper)
        if self._platform_hash is not None and hmac.compare_digest(digest, self._platform_hash):
            return PlatformPrincipal()
        if looks_like_jwt(presented) and self.embed is not None:
            claims = self.embed.verify(presented)  # signature and expiry, no I/O
            return await self._cached(digest, lambda: self._embed_lookup(claims))
        parsed = parse_key(presented)
        if parsed is None:
            raise AuthenticationError(MALFORMED)
        return await self._cached(digest, lambda: self._lookup(parsed))

    async def _cached(self, digest: str,
                      lookup: Callable[[], Awaitable[CachedPrincipal]]) -> CachedPrincipal:
        if self.cache is None:
            return await lookup()
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        refused = self.cache.refusal(digest)
        if refused is not None:
            raise _as_refusal(refused)
        pending = self._pending.get(digest)
        if pending is not None:  # the same key is being looked up: share its answer
            try:
                return await asyncio.shield(pending)
            except DomainError as exc:
                raise _as_refusal(exc) from None
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request was cancelled, not the lookup it waited on
        return await self._lead_lookup(digest, lookup)

    async def _lead_lookup(self, digest: str,
                           lookup: Callable[[], Awaitable[CachedPrincipal]]) -> CachedPrincipal:
        """Look the key up for every request presenting it meanwhile."""
        future: asyncio.Future[CachedPrincipal] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            principal = await self._looked_up(digest, lookup)
        except asyncio.CancelledError:
            future.cancel()  # the waiters look it up themselves
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: there may be no waiter
            raise
        else:
            future.set_result(principal)
        finally:
            if self._pending.get(digest) is future:
                del self._pending[digest]
        return principal

    async def _looked_up(self, digest: str,
                         lookup: Callable[[], Awaitable[CachedPrincipal]]) -> CachedPrincipal:
        """One lookup; its principal, or its refusal, remembered for the next ones."""
        assert self.cache is not None
        generation = self.cache.generation
        try:
            async with self._lookups:
                principal = await lookup()
        except (AuthenticationError, TenantSuspendedError) as exc:
            self.cache.refuse(digest, _as_refusal(exc), generation)
            raise
        self.cache.put(digest, principal, generation)
        return principal

    async def _embed_lookup(self, claims: EmbedClaims) -> EmbedPrincipal:
        """An embed token's principal: its minting key and tenant must still be good."""
        async with self.db.platform() as session:
            query = (select(ApiKey, Tenant)
                     .join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
                     .where(col(ApiKey.id) == claims.key_id,
                            col(ApiKey.tenant_id) == claims.tenant_id))
            row = (await session.exec(query)).first()
        if row is None:
            raise AuthenticationError("this embed token's key no longer exists")
        key, tenant = row
        try:
            self._check_usable(key, tenant)
        except AuthenticationError as exc:
            raise AuthenticationError(f"the key that minted this embed token is no longer "
                                      f"valid: {exc.detail}") from exc
        expires = min(claims.expires_at, key.expires_at) if key.expires_at \
            else claims.expires_at
        return EmbedPrincipal(tenant_id=tenant.id, tenant_slug=tenant.slug, tier=tenant.tier,
                              key_id=key.id, end_user=claims.end_user, kb_ids=claims.kb_ids,
                              tenant=tenant, expires_at=expires)

    async def _lookup(self, parsed: ParsedKey) -> TenantPrincipal:
        """The key's principal, read from PostgreSQL (and its use recorded)."""
        async with self.db.platform() as session:
            query = (
                select(ApiKey, Tenant)
                .join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
                .where(ApiKey.prefix == parsed.prefix)
            )
            row = (await session.exec(query)).first()
            if row is None or not key_matches(parsed.plaintext, row[0].secret_hash, self.pepper):
                raise AuthenticationError("invalid API key")
            key, tenant = row
            self._check_usable(key, tenant)
            await self._touch(session, key)
        return _tenant_principal(key, tenant)

    async def recheck(self, key_id: uuid.UUID) -> TenantPrincipal:
        """A tenant key's principal by the key's id, refused as :meth:`authenticate`
        would refuse the key now (revoked, expired, tenant suspended). A console session
        (app/auth/sessions.py) holds the key's id, never the key; cached and dropped on
        the same notifications as keys, so a revoked key's sessions end within a second."""
        principal = await self._cached(f"key-id:{key_id}", lambda: self._lookup_id(key_id))
        assert isinstance(principal, TenantPrincipal)
        return principal

    async def _lookup_id(self, key_id: uuid.UUID) -> TenantPrincipal:
        async with self.db.platform() as session:
            query = (select(ApiKey, Tenant)
                     .join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
                     .where(col(ApiKey.id) == key_id))
            row = (await session.exec(query)).first()
            if row is None:
                raise AuthenticationError("this API key no longer exists")
            key, tenant = row
            self._check_usable(key, tenant)
            await self._touch(session, key)
        return _tenant_principal(key, tenant)

    def platform_fingerprint(self) -> str | None:
        """A name for the operator key configured now (neither the key nor its stored
        hash): an operator's console session records it, so a changed key ends them."""
        if self._platform_hash is None:
            return None
        return hashlib.sha256(b"console:" + self._platform_hash.encode()).hexdigest()

    @staticmethod
    def _check_usable(key: ApiKey, tenant: Tenant) -> None:
        if key.revoked_at is not None:
            raise AuthenticationError("this API key has been revoked")
        if key.expires_at is not None and key.expires_at <= utcnow():
            raise AuthenticationError("this API key has expired (it was rotated; use its "
                                      "replacement)")
        if tenant.status == TenantStatus.suspended:
            raise TenantSuspendedError(
                f"tenant {tenant.slug!r} is suspended; contact the platform operator"
            )

    async def _touch(self, session: AsyncSession, key: ApiKey) -> None:
        """Record use at most once per resolution window (one write, not one per call)."""
        now = utcnow()
        if key.last_used_at is not None and now - key.last_used_at < self.last_used_resolution:
            return
        stmt = update(ApiKey).where(col(ApiKey.id) == key.id).values(last_used_at=now)
        await (await session.connection()).execute(stmt)


def _tenant_principal(key: ApiKey, tenant: Tenant) -> TenantPrincipal:
    return TenantPrincipal(tenant_id=tenant.id, tenant_slug=tenant.slug, tier=tenant.tier,
                           key_id=key.id, scopes=frozenset(Scope(s) for s in key.scopes),
                           tenant=tenant, expires_at=key.expires_at)


def _as_refusal(exc: DomainError) -> DomainError:
    """A fresh copy of a refusal to raise again (no traceback of the first request)."""
    return type(exc)(exc.detail, **exc.extra)
