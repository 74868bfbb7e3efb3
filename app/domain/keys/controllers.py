"""Key routes for the tenant's own admins (``/v1/keys``) and the operator."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from app.auth.keys import Scope
from app.domain.keys.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyOut,
    ApiKeyRotate,
    ApiKeyRotated,
)
from app.domain.keys.service import ApiKeyService
from app.http.guards import grantor_of, platform_only, requires_scope, tenant_of

AnyRequest = Request[Any, Any, Any]


class TenantKeysController(Controller):
    """A tenant admin manages the tenant's own keys."""

    path = "/v1/keys"
    guards = [requires_scope(Scope.admin)]  # noqa: RUF012
    tags = ["tenant admin"]  # noqa: RUF012

    @post("/", summary="Create an API key (the secret is shown once)")
    async def create(
        self,
        request: AnyRequest,
        data: JSONBody[ApiKeyCreate],
        keys: NamedDependency[ApiKeyService],
    ) -> ApiKeyCreated:
        return await keys.create(tenant_of(request), data, grantor_of(request))

    @get("/", summary="List API keys")
    async def list_keys(
        self, request: AnyRequest, keys: NamedDependency[ApiKeyService]
    ) -> ApiKeyList:
        rows = await keys.list(tenant_of(request))
        return ApiKeyList(data=[ApiKeyOut.model_validate(k) for k in rows])

    @post("/{key_id:uuid}/rotate", status_code=201,
          summary="Replace a key; the old one works for an overlap window")
    async def rotate(
        self, request: AnyRequest, key_id: FromPath[uuid.UUID],
        keys: NamedDependency[ApiKeyService], data: JSONBody[ApiKeyRotate | None] = None,
    ) -> ApiKeyRotated:
        overlap = timedelta(seconds=(data or ApiKeyRotate()).overlap_s)
        return await keys.rotate(tenant_of(request), key_id, overlap, grantor_of(request))

    @delete("/{key_id:uuid}", status_code=200, summary="Revoke an API key")
    async def revoke(
        self, request: AnyRequest, key_id: FromPath[uuid.UUID], keys: NamedDependency[ApiKeyService]
    ) -> ApiKeyOut:
        key = await keys.revoke(tenant_of(request), key_id, grantor_of(request))
        return ApiKeyOut.model_validate(key)


class PlatformKeysController(Controller):
    """The operator manages any tenant's keys (e.g. the first admin key)."""

    path = "/admin/tenants/{tenant_id:uuid}/keys"
    guards = [platform_only]  # noqa: RUF012
    tags = ["platform admin"]  # noqa: RUF012

    @post("/", summary="Create an API key for a tenant (the secret is shown once)")
    async def create(
        self,
        request: AnyRequest,
        tenant_id: FromPath[uuid.UUID],
        data: JSONBody[ApiKeyCreate],
        keys: NamedDependency[ApiKeyService],
    ) -> ApiKeyCreated:
        return await keys.create(tenant_id, data, grantor_of(request))

    @get("/", summary="List a tenant's API keys")
    async def list_keys(
        self, tenant_id: FromPath[uuid.UUID], keys: NamedDependency[ApiKeyService]
    ) -> ApiKeyList:
        return ApiKeyList(data=[ApiKeyOut.model_validate(k) for k in await keys.list(tenant_id)])

    @post("/{key_id:uuid}/rotate", status_code=201,
          summary="Replace a tenant's key; the old one works for an overlap window")
    async def rotate(
        self, request: AnyRequest, tenant_id: FromPath[uuid.UUID], key_id: FromPath[uuid.UUID],
        keys: NamedDependency[ApiKeyService], data: JSONBody[ApiKeyRotate | None] = None,
    ) -> ApiKeyRotated:
        overlap = timedelta(seconds=(data or ApiKeyRotate()).overlap_s)
        return await keys.rotate(tenant_id, key_id, overlap, grantor_of(request))

    @delete("/{key_id:uuid}", status_code=200, summary="Revoke a tenant's API key")
    async def revoke(
        self,
        request: AnyRequest,
        tenant_id: FromPath[uuid.UUID],
        key_id: FromPath[uuid.UUID],
        keys: NamedDependency[ApiKeyService],
    ) -> ApiKeyOut:
        return ApiKeyOut.model_validate(await keys.revoke(tenant_id, key_id, grantor_of(request)))
