"""Minting embed tokens and keeping the tenant's allowed origins."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlmodel import col, select

from app.auth.embed import EmbedTokenSigner
from app.db.engine import Database
from app.db.models import KnowledgeBase, utcnow
from app.domain.audit.records import AuditAction, changed_fields, record_audit
from app.domain.embed.schemas import EmbedToken, EmbedTokenRequest
from app.domain.tenants.rows import tenant_row_in
from app.errors import BadRequestError, NotFoundError
from app.settings import AuthSettings


class EmbedService:
    """Embed tokens of one tenant at a time (the caller resolved which)."""

    def __init__(self, db: Database, signer: EmbedTokenSigner, settings: AuthSettings) -> None:
        self.db = db
        self.signer = signer
        self.settings = settings

    async def mint(self, tenant_id: uuid.UUID, key_id: uuid.UUID,
                   req: EmbedTokenRequest) -> EmbedToken:
        """A token for ``req.user`` on the tenant's knowledge bases ``req`` names."""
        ttl_s = req.ttl_s or self.settings.embed_default_ttl_s
        if ttl_s > self.settings.embed_max_ttl_s:
            raise BadRequestError(f"ttl_s is at most {self.settings.embed_max_ttl_s} "
                                    "seconds (AUTH_EMBED_MAX_TTL_S)")
        kbs = sorted(set(req.knowledge_base_ids))
        async with self.db.tenant(tenant_id) as session:
            found = set((await session.exec(select(KnowledgeBase.id).where(
                col(KnowledgeBase.id).in_(kbs)))).all())
        missing = [str(k) for k in kbs if k not in found]
        if missing:
            raise NotFoundError(f"knowledge bases not found: {', '.join(missing)}")
        token, expires = self.signer.mint(tenant_id, key_id, req.user, kbs,
                                          timedelta(seconds=ttl_s))
        return EmbedToken(token=token, expires_at=expires, user=req.user,
                          knowledge_base_ids=kbs)

    async def origins(self, tenant_id: uuid.UUID) -> list[str]:
        """The tenant's allowed origins."""
        async with self.db.tenant(tenant_id) as session:
            return list((await tenant_row_in(session, tenant_id)).cors_origins)

    async def set_origins(self, tenant_id: uuid.UUID, origins: list[str],
                          actor: str) -> list[str]:
        """Replace the tenant's allowed origins (audited when they change)."""
        async with self.db.tenant(tenant_id) as session:
            tenant = await tenant_row_in(session, tenant_id, lock=True)
            changes = changed_fields(tenant, {"cors_origins": sorted(set(origins))})
            if changes:
                tenant.cors_origins = changes["cors_origins"]["to"]
                tenant.updated_at = utcnow()
                session.add(tenant)
                record_audit(session, tenant_id, actor, AuditAction.embed_origins_changed,
                             ("tenant", tenant_id), {"changes": changes})
        return list(tenant.cors_origins)

