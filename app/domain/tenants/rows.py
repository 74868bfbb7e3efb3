"""Reading the tenant row inside a transaction that already has its scope."""

from __future__ import annotations

import uuid

from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.models import Tenant
from app.errors import NotFoundError


async def tenant_row_in(session: AsyncSession, tenant_id: uuid.UUID,
                        lock: bool = False) -> Tenant:
    """The tenant (locked for update if ``lock``), or NotFoundError."""
    tenant = await session.get(Tenant, tenant_id, with_for_update=lock)
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    return tenant
