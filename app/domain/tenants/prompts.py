"""The tenant's system prompt, versioned: every change is kept with who made it and when.

The current text also lives on ``tenants.system_prompt`` (what the chat path reads);
``system_prompts`` holds the history. Both are written in one transaction.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import SystemMessagePolicy, SystemPromptVersion, Tenant, utcnow
from app.domain.audit.records import AuditAction, record_audit
from app.domain.tenants.rows import tenant_row_in


async def record_prompt(session: AsyncSession, tenant: Tenant, text: str,
                        by: str) -> SystemPromptVersion:
    """Make ``text`` the tenant's prompt and keep it as a new version (tenant row locked
    by the caller, so versions are numbered without gaps or clashes)."""
    newest = (await session.exec(
        select(func.coalesce(func.max(SystemPromptVersion.version), 0))
        .where(col(SystemPromptVersion.tenant_id) == tenant.id))).one()
    version = SystemPromptVersion(tenant_id=tenant.id, version=int(newest) + 1, text=text,
                                  created_by=by)
    session.add(version)
    tenant.system_prompt = text
    return version


async def change_prompt(session: AsyncSession, tenant: Tenant, text: str | None,
                        policy: SystemMessagePolicy | None, by: str) -> None:
    """Apply a new prompt (a new version) and/or policy where they differ from the
    tenant's (row locked by the caller), audited as one ``system_prompt.changed`` with
    the new version's number and the policy's old and new value."""
    changed: dict[str, Any] = {}
    if text is not None and text != tenant.system_prompt:
        changed["version"] = (await record_prompt(session, tenant, text, by)).version
    if policy is not None and policy != tenant.system_message_policy:
        changed["system_message_policy"] = {"from": tenant.system_message_policy,
                                            "to": policy}
        tenant.system_message_policy = policy
    if changed:
        record_audit(session, tenant.id, by, AuditAction.system_prompt_changed,
                     ("tenant", tenant.id), changed)


class PromptService:
    """Read and change a tenant's system prompt and its policy for callers' own
    system messages."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def current(self, tenant_id: uuid.UUID) -> tuple[Tenant, SystemPromptVersion | None]:
        """The tenant (prompt and policy) and the newest version row, if any."""
        async with self.db.tenant(tenant_id) as session:
            tenant = await tenant_row_in(session, tenant_id)
            newest = (await session.exec(
                select(SystemPromptVersion).order_by(col(SystemPromptVersion.version).desc())
                .limit(1))).first()
        return tenant, newest

    async def update(
        self, tenant_id: uuid.UUID, by: str, text: str | None,
        policy: SystemMessagePolicy | None,
    ) -> tuple[Tenant, SystemPromptVersion | None]:
        """Set a new prompt (a new version) and/or the policy."""
        async with self.db.tenant(tenant_id) as session:
            tenant = await tenant_row_in(session, tenant_id, lock=True)
            await change_prompt(session, tenant, text, policy, by)
            tenant.updated_at = utcnow()
            session.add(tenant)
        return await self.current(tenant_id)

    async def versions(self, tenant_id: uuid.UUID, limit: int,
                       offset: int) -> tuple[list[SystemPromptVersion], int]:
        """Every version, newest first, and their total."""
        async with self.db.tenant(tenant_id) as session:
            total = (await session.exec(
                select(func.count()).select_from(SystemPromptVersion))).one()
            rows = (await session.exec(
                select(SystemPromptVersion).order_by(col(SystemPromptVersion.version).desc())
                .limit(limit).offset(offset))).all()
        return list(rows), int(total)

