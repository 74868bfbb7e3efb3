"""Tenant registry rules. Runs in the platform operator's scope."""

from __future__ import annotations

import uuid

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from app.db.engine import Database
from app.db.models import SystemMessagePolicy, Tenant, TenantStatus, utcnow
from app.domain.audit.records import AuditAction, changed_fields, record_audit
from app.domain.tenants.prompts import change_prompt, record_prompt
from app.domain.tenants.schemas import TenantCreate, TenantUpdate
from app.errors import ConflictError, InvalidInputError, NotFoundError

NOT_NULLABLE = frozenset({"name", "tier", "system_prompt", "system_message_policy",
                          "allowed_models", "allow_spillover"})
STATUS_ACTIONS = {TenantStatus.suspended: AuditAction.tenant_suspended,
                  TenantStatus.active: AuditAction.tenant_activated}


class TenantService:
    """Create, read, update, suspend and reactivate tenants."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, data: TenantCreate, actor: str) -> Tenant:
        """Create a tenant; a taken slug is a conflict."""
        tenant = Tenant(**data.model_dump())
        # Its settings as created; the prompt's text is in its versions, not here.
        details = data.model_dump(mode="json", exclude={"system_prompt"})
        try:
            async with self.db.platform() as session:
                session.add(tenant)
                if tenant.system_prompt:
                    await session.flush()
                    prompt = await record_prompt(session, tenant, tenant.system_prompt, actor)
                    details["system_prompt_version"] = prompt.version
                record_audit(session, tenant.id, actor, AuditAction.tenant_created,
                             ("tenant", tenant.id), details)
        except IntegrityError as exc:
            raise ConflictError(f"a tenant with slug {data.slug!r} already exists") from exc
        return tenant

    async def list(
        self, limit: int, offset: int, status: TenantStatus | None = None
    ) -> tuple[list[Tenant], int]:
        """A page of tenants, oldest first, and the total count."""
        query = select(Tenant)
        counter = select(func.count()).select_from(Tenant)
        if status is not None:
            query = query.where(Tenant.status == status)
            counter = counter.where(col(Tenant.status) == status)
        query = query.order_by(col(Tenant.created_at), col(Tenant.id)).limit(limit).offset(offset)
        async with self.db.platform() as session:
            rows = list((await session.exec(query)).all())
            total = (await session.exec(counter)).one()
        return rows, total

    async def get(self, tenant_id: uuid.UUID) -> Tenant:
        """One tenant, or NotFoundError."""
        async with self.db.platform() as session:
            tenant = await session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFoundError(f"tenant {tenant_id} not found")
        return tenant

    async def get_by_slug(self, slug: str) -> Tenant:
        """One tenant by slug, or NotFoundError."""
        async with self.db.platform() as session:
            tenant = (await session.exec(select(Tenant).where(Tenant.slug == slug))).first()
        if tenant is None:
            raise NotFoundError(f"tenant {slug!r} not found")
        return tenant

    async def get_own(self, tenant_id: uuid.UUID) -> Tenant:
        """The tenant as seen from inside its own row-level-security scope."""
        async with self.db.tenant(tenant_id) as session:
            tenant = await session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFoundError(f"tenant {tenant_id} not found")
        return tenant

    async def update(self, tenant_id: uuid.UUID, data: TenantUpdate, actor: str) -> Tenant:
        """Apply the fields that were sent; ``null`` resets a quota to the tier default.
        Audited: the prompt and its policy as ``system_prompt.changed``, the other fields
        that really changed as ``tenant.updated``."""
        changes = data.model_dump(include=data.model_fields_set)
        nulled = sorted(k for k, v in changes.items() if v is None and k in NOT_NULLABLE)
        if nulled:
            raise InvalidInputError(f"these fields cannot be null: {', '.join(nulled)}")
        return await self._change(tenant_id, changes, actor, AuditAction.tenant_updated)

    async def set_status(self, tenant_id: uuid.UUID, status: TenantStatus, actor: str) -> Tenant:
        """Suspend or reactivate; a suspended tenant's keys get 403 from the next request."""
        return await self._change(tenant_id, {"status": status}, actor, STATUS_ACTIONS[status])

    async def _change(self, tenant_id: uuid.UUID, changes: dict[str, object], actor: str,
                      action: AuditAction) -> Tenant:
        async with self.db.platform() as session:
            tenant = await session.get(Tenant, tenant_id, with_for_update=True)
            if tenant is None:
                raise NotFoundError(f"tenant {tenant_id} not found")
            prompt = changes.pop("system_prompt", None)
            policy = changes.pop("system_message_policy", None)
            await change_prompt(session, tenant, prompt if isinstance(prompt, str) else None,
                                policy if isinstance(policy, SystemMessagePolicy) else None,
                                actor)
            changed = changed_fields(tenant, changes)
            for field, value in changes.items():
                setattr(tenant, field, value)
            tenant.updated_at = utcnow()
            session.add(tenant)
            if changed:
                record_audit(session, tenant_id, actor, action, ("tenant", tenant_id),
                             {"changes": changed})
        return tenant


def allowed_models(tenant: Tenant, served: list[str]) -> list[str]:
    """Models this tenant may use: its own list, else every model the platform serves."""
    return [m for m in tenant.allowed_models if m in served] if tenant.allowed_models else served
