"""``GET /metrics``: Prometheus exposition, for the scraper's token or the operator's key."""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import AuthenticationError
from app.observability.metrics import ServiceMetrics
from app.settings import Settings


@get("/metrics", tags=["system"], exclude_from_auth=True, include_in_schema=False,
     summary="Prometheus metrics")
async def prometheus_metrics(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Requests, tokens, latency, GPU time, cost and rejections by tenant and model;
    queue depth and replica load by pool. Needs ``Authorization: Bearer`` with
    ``METRICS_TOKEN`` or the operator's key (the labels name tenants)."""
    _check_scraper(request.headers.get("authorization", ""), state.settings)
    registry: ServiceMetrics = state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)


def _check_scraper(header: str, settings: Settings) -> None:
    scheme, _, token = header.partition(" ")
    secrets = [s.get_secret_value() for s in (settings.metrics.token,
                                              settings.auth.platform_admin_key) if s]
    if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(token.strip().encode(), s.encode()) for s in secrets):
        raise AuthenticationError("/metrics needs 'Authorization: Bearer <METRICS_TOKEN or "
                                  "the operator key>'")
