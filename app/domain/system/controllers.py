"""``/healthz`` (the process is alive) and ``/readyz`` (its backing services answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

CHECK_TIMEOUT_S = 2.0


@get("/healthz", summary="Liveness", tags=["system"], exclude_from_auth=True)
async def healthz() -> dict[str, str]:
    """Answers while the process can serve HTTP."""
    return {"status": "ok"}


async def _check(probe: Callable[[], Awaitable[object]]) -> str:
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"timed out after {CHECK_TIMEOUT_S:.0f}s"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"[:300]
    return "ok"


@get("/readyz", summary="Readiness", tags=["system"], exclude_from_auth=True,
     responses={503: ResponseSpec(dict[str, Any], description="Some backing service is down",
                                  generate_examples=False)})
async def readyz(state: State) -> Response[dict[str, Any]]:
    """200 when PostgreSQL, Redis and the vector store all answer; 503 naming those that don't."""
    names = ("postgres", "redis", "vector_store")
    probes = (state.db.ping, state.redis.ping, state.vector_store.ping)
    results = await asyncio.gather(*(_check(p) for p in probes))
    checks = dict(zip(names, results, strict=True))
    ready = all(r == "ok" for r in results)
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return Response(body, status_code=200 if ready else 503)
