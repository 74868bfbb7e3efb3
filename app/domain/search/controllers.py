"""``POST /v1/retrieve``: search only, for admins testing their knowledge bases."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.auth.keys import Scope
from app.domain.search.schemas import RetrieveRequest, RetrieveResponse
from app.domain.search.service import SearchService
from app.http.guards import requires_scope, tenant_of
from app.http.openapi import problems


@post("/v1/retrieve", status_code=200, tags=["retrieval"], summary="Search the knowledge bases",
      guards=[requires_scope(Scope.admin, Scope.ingest, Scope.chat)], responses=problems(404))
async def retrieve(
    request: Request[Any, Any, Any], data: JSONBody[RetrieveRequest],
    search: NamedDependency[SearchService],
) -> RetrieveResponse:
    """Best passages of the tenant's live documents for a query, with their sources."""
    hits = await search.search(tenant_of(request), data.query, data.knowledge_base_ids,
                               data.top_k, data.filters, data.mode,
                               data.relevant_only)
    return RetrieveResponse(data=hits)
