"""``/admin/tenants``: the platform operator's tenant registry."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Controller, Request, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from app.db.models import TenantStatus
from app.domain.tenants.schemas import TenantCreate, TenantOut, TenantPage, TenantUpdate
from app.domain.tenants.service import TenantService
from app.http.guards import actor_of, platform_only
from app.http.openapi import problems
from app.http.paging import Offset

AnyRequest = Request[Any, Any, Any]

class TenantAdminController(Controller):
    """Create, list, read, update, suspend and reactivate tenants."""

    path = "/admin/tenants"
    guards = [platform_only]  # noqa: RUF012  (Litestar reads a class attribute)
    tags = ["platform admin"]  # noqa: RUF012

    @post("/", summary="Create a tenant", responses=problems(409, 422))
    async def create(
        self, request: AnyRequest, data: JSONBody[TenantCreate],
        tenants: NamedDependency[TenantService],
    ) -> TenantOut:
        return TenantOut.model_validate(await tenants.create(data, actor_of(request)))

    @get("/", summary="List tenants")
    async def list_tenants(
        self,
        tenants: NamedDependency[TenantService],
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        offset: Offset = 0,
        status: FromQuery[TenantStatus | None] = None,
    ) -> TenantPage:
        rows, total = await tenants.list(limit, offset, status)
        data = [TenantOut.model_validate(t) for t in rows]
        return TenantPage(data=data, total=total, limit=limit, offset=offset)

    @get("/{tenant_id:uuid}", summary="Get a tenant")
    async def get_tenant(
        self, tenant_id: FromPath[uuid.UUID], tenants: NamedDependency[TenantService]
    ) -> TenantOut:
        return TenantOut.model_validate(await tenants.get(tenant_id))

    @patch("/{tenant_id:uuid}", summary="Update a tenant (only the fields sent)",
           responses=problems(409, 422))
    async def update(
        self,
        request: AnyRequest,
        tenant_id: FromPath[uuid.UUID],
        data: JSONBody[TenantUpdate],
        tenants: NamedDependency[TenantService],
    ) -> TenantOut:
        return TenantOut.model_validate(await tenants.update(tenant_id, data, actor_of(request)))

    @post("/{tenant_id:uuid}/suspend", status_code=200, summary="Suspend a tenant")
    async def suspend(
        self, request: AnyRequest, tenant_id: FromPath[uuid.UUID],
        tenants: NamedDependency[TenantService],
    ) -> TenantOut:
        tenant = await tenants.set_status(tenant_id, TenantStatus.suspended, actor_of(request))
        return TenantOut.model_validate(tenant)

    @post("/{tenant_id:uuid}/activate", status_code=200, summary="Reactivate a tenant")
    async def activate(
        self, request: AnyRequest, tenant_id: FromPath[uuid.UUID],
        tenants: NamedDependency[TenantService],
    ) -> TenantOut:
        tenant = await tenants.set_status(tenant_id, TenantStatus.active, actor_of(request))
        return TenantOut.model_validate(tenant)
