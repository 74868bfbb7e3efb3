"""``/v1/tenant/content-rules``: the tenant's blocklist and disclaimer, and its hits."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, get, put
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter

from app.auth.keys import Scope
from app.domain.content_rules.schemas import (
    ContentRuleHitOut,
    ContentRuleHitPage,
    ContentRules,
    ContentRulesOut,
)
from app.domain.content_rules.service import ContentRulesService
from app.http.guards import actor_of, requires_scope, tenant_of
from app.http.paging import Offset

AnyRequest = Request[Any, Any, Any]
ADMIN = requires_scope(Scope.admin)


@get("/v1/tenant/content-rules", tags=["tenant"], guards=[ADMIN],
     summary="The blocklist and disclaimer applied to every chat")
async def get_content_rules(request: AnyRequest,
                            content: NamedDependency[ContentRulesService]) -> ContentRulesOut:
    """Blocked terms, blocked patterns and the disclaimer (and any stored pattern the
    regular-expression engine cannot run, which is not applied)."""
    return await content.get(tenant_of(request))


@put("/v1/tenant/content-rules", tags=["tenant"], guards=[ADMIN],
     summary="Replace the blocklist and disclaimer")
async def put_content_rules(request: AnyRequest, data: JSONBody[ContentRules],
                            content: NamedDependency[ContentRulesService]) -> ContentRules:
    """Terms match case-insensitively as whole words; patterns are RE2 regular
    expressions (422 for one RE2 cannot run: backreferences, lookarounds); both are
    checked on the user's message and on the answer as it streams."""
    return await content.set(tenant_of(request), data, actor_of(request))


@get("/v1/tenant/content-rules/hits", tags=["tenant"], guards=[ADMIN],
     summary="Requests and answers the rules stopped")
async def list_content_rule_hits(
    request: AnyRequest, content: NamedDependency[ContentRulesService],
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50, offset: Offset = 0,
) -> ContentRuleHitPage:
    """Newest first: which rule, on the input or the output, for which end user."""
    rows, total = await content.hits(tenant_of(request), limit, offset)
    return ContentRuleHitPage(data=[ContentRuleHitOut.model_validate(r) for r in rows],
                              total=total, limit=limit, offset=offset)
