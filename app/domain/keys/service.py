"""Tenant API keys: mint, list, revoke. Runs inside the tenant's own RLS scope."""

from __future__ import annotations

import uuid

from sqlmodel import col, select

from app.auth.keys import hash_key, mint_key
from app.db.engine import Database
from app.db.models import ApiKey, Tenant, utcnow
from app.domain.keys.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut
from app.errors import NotFoundError


class ApiKeyService:
    """Keys of one tenant at a time; the caller has already resolved which tenant."""

    def __init__(self, db: Database, pepper: str) -> None:
        self.db = db
        self.pepper = pepper

    async def create(self, tenant_id: uuid.UUID, data: ApiKeyCreate) -> ApiKeyCreated:
        """Mint a key; the plaintext is in the result and nowhere else."""
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
        out = ApiKeyOut.model_validate(key)
        return ApiKeyCreated(**out.model_dump(), key=new.plaintext)

    async def list(self, tenant_id: uuid.UUID) -> list[ApiKey]:
        """All of the tenant's keys, revoked ones included, newest first."""
        query = select(ApiKey).order_by(col(ApiKey.created_at).desc(), col(ApiKey.id))
        async with self.db.tenant(tenant_id) as session:
            return list((await session.exec(query)).all())

    async def revoke(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
        """Revoke a key; every later request with it is refused. Idempotent."""
        async with self.db.tenant(tenant_id) as session:
            key = await session.get(ApiKey, key_id, with_for_update=True)
            if key is None:
                raise NotFoundError(f"API key {key_id} not found")
            if key.revoked_at is None:
                key.revoked_at = utcnow()
                session.add(key)
        return key
