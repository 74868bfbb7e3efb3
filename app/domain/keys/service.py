"""Tenant API keys: mint, list, rotate, revoke. Runs inside the tenant's own RLS scope.

Inside a tenant a key never reaches beyond its own scopes: it may mint, rotate or revoke
only keys whose scopes are a subset of its own (else an admin-only key could mint a chat
key and read every end user's conversations, or rotate a wider key to learn its secret).
The operator and the CLI are above tenants and exempt."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlmodel import col, select

from app.auth.keys import Grantor, hash_key, mint_key
from app.db.engine import Database
from app.db.models import ApiKey, Tenant, utcnow
from app.domain.audit.records import AuditAction, record_audit
from app.domain.keys.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, ApiKeyRotated
from app.errors import ConflictError, NotFoundError, PermissionDeniedError


class ApiKeyService:
    """Keys of one tenant at a time; the caller has already resolved which tenant."""

    def __init__(self, db: Database, pepper: str) -> None:
        self.db = db
        self.pepper = pepper

    async def create(self, tenant_id: uuid.UUID, data: ApiKeyCreate,
                     by: Grantor) -> ApiKeyCreated:
        """Mint a key; the plaintext is in the result and nowhere else."""
        _require_within(by, "create", [s.value for s in data.scopes])
        new = mint_key()
        key = ApiKey(
            tenant_id=tenant_id,
            name=data.name,
            prefix=new.prefix,
            secret_hash=hash_key(new.plaintext, self.pepper),
            scopes=[s.value for s in data.scopes],
        )
        async with self.db.tenant(tenant_id) as session:
            if await session.get(Tenant, tenant_id) is None:
                raise NotFoundError(f"tenant {tenant_id} not found")
            session.add(key)
            record_audit(session, tenant_id, by.actor, AuditAction.key_created, ("api_key", key.id),
                         {"name": key.name, "prefix": key.prefix, "scopes": key.scopes})
        out = ApiKeyOut.model_validate(key)
        return ApiKeyCreated(**out.model_dump(), key=new.plaintext)

    async def list(self, tenant_id: uuid.UUID) -> list[ApiKey]:
        """All of the tenant's keys, revoked ones included, newest first."""
        query = select(ApiKey).order_by(col(ApiKey.created_at).desc(), col(ApiKey.id))
        async with self.db.tenant(tenant_id) as session:
            return list((await session.exec(query)).all())

    async def rotate(self, tenant_id: uuid.UUID, key_id: uuid.UUID,
                     overlap: timedelta, by: Grantor) -> ApiKeyRotated:
        """Mint a replacement with the same name and scopes; the old key keeps working
        for ``overlap`` (so clients can switch without downtime), then stops."""
        new = mint_key()
        async with self.db.tenant(tenant_id) as session:
            old = await session.get(ApiKey, key_id, with_for_update=True)
            if old is None:
                raise NotFoundError(f"API key {key_id} not found")
            _require_within(by, "rotate", old.scopes)
            now = utcnow()
            if old.revoked_at is not None or (old.expires_at and old.expires_at <= now):
                raise ConflictError("this API key is revoked or expired; create a new one")
            until = now + overlap
            old.expires_at = min(until, old.expires_at) if old.expires_at else until
            replacement = ApiKey(tenant_id=tenant_id, name=old.name, prefix=new.prefix,
                                 secret_hash=hash_key(new.plaintext, self.pepper),
                                 scopes=list(old.scopes))
            session.add_all([old, replacement])
            record_audit(session, tenant_id, by.actor, AuditAction.key_rotated, ("api_key", old.id),
                         {"name": old.name, "prefix": old.prefix, "replaced_by": replacement.id,
                          "replacement_prefix": replacement.prefix,
                          "old_key_expires_at": old.expires_at})
        out = ApiKeyOut.model_validate(replacement)
        return ApiKeyRotated(**out.model_dump(), key=new.plaintext, replaces=old.id,
                             old_key_expires_at=old.expires_at)

    async def revoke(self, tenant_id: uuid.UUID, key_id: uuid.UUID, by: Grantor) -> ApiKey:
        """Revoke a key; every later request with it is refused. Idempotent."""
        async with self.db.tenant(tenant_id) as session:
            key = await session.get(ApiKey, key_id, with_for_update=True)
            if key is None:
                raise NotFoundError(f"API key {key_id} not found")
            _require_within(by, "revoke", key.scopes)
            if key.revoked_at is None:
                key.revoked_at = utcnow()
                session.add(key)
                record_audit(session, tenant_id, by.actor, AuditAction.key_revoked,
                             ("api_key", key.id), {"name": key.name, "prefix": key.prefix})
        return key


def _require_within(by: Grantor, verb: str, scopes: list[str]) -> None:
    """Refuse a grantor acting on a key with scopes it does not hold itself."""
    lacking = by.lacks(scopes)
    if lacking:
        names = ", ".join(repr(s) for s in lacking)
        raise PermissionDeniedError(
            f"this API key may only {verb} keys whose scopes are within its own; "
            f"it lacks the {names} scope{'s' if len(lacking) > 1 else ''}",
            missing_scopes=lacking,
        )
