"""``GET /admin/pools``: the operator's view of generation pools, replicas and queues."""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.di import NamedDependency

from app.http.guards import platform_only
from app.inference.dispatcher import Dispatcher


@get("/admin/pools", guards=[platform_only], tags=["admin"],
     summary="Generation pools: replicas' health, circuit, load and queues")
async def list_pools(dispatcher: NamedDependency[Dispatcher]) -> list[dict[str, Any]]:
    """Each pool with its replicas (healthy, circuit open, in flight / cap, vLLM's own
    waiting requests and KV-cache use) and how many requests wait in its fair queue."""
    return dispatcher.snapshot()
