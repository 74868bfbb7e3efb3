"""``/healthz`` (the process is alive) and ``/readyz`` (its backing services answer)."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec

from app.domain.system.readiness import Readiness


@get("/healthz", summary="Liveness", tags=["system"], exclude_from_auth=True)
async def healthz() -> dict[str, str]:
    """Answers while the process can serve HTTP."""
    return {"status": "ok"}


def _readiness(state: State) -> Readiness:
    """The process's readiness cache (made on first use, kept in the app's state)."""
    readiness: Readiness | None = state.get("readiness")
    if readiness is None:
        readiness = Readiness({"postgres": state.db.ping, "redis": state.redis.ping,
                               "vector_store": state.vector_store.ping})
        state.readiness = readiness
    return readiness


@get("/readyz", summary="Readiness", tags=["system"], exclude_from_auth=True,
     responses={503: ResponseSpec(dict[str, Any], description="Some backing service is down",
                                  generate_examples=False)})
async def readyz(state: State) -> Response[dict[str, Any]]:
    """200 when PostgreSQL, Redis and the vector store all answer; 503 naming those that
    don't. Checked at most once a second per process (concurrent probes share a check)."""
    readiness = _readiness(state)
    body, ready = readiness.body(await readiness.checks())
    return Response(body, status_code=200 if ready else 503)
