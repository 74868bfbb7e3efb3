"""The error answers in the OpenAPI document: every operation lists the problem+json
statuses it can answer, so clients (and the schema tests) know them.

The statuses every route shares are added here from what the route is (authenticated,
has path ids, takes input); a route's own ones sit in its decorator (``problems(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.constants import RESERVED_KWARGS
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.routes import HTTPRoute
from pydantic import BaseModel, ConfigDict

from app.http.auth import PUBLIC_PATHS
from app.http.problems import PROBLEM_JSON

DESCRIPTIONS = {
    400: "Malformed or invalid request (`errors` names each bad field)",
    401: "Missing, malformed, unknown or revoked key",
    403: "Wrong scope, operator-only route, suspended tenant, or a quota (`quota`)",
    404: "No such resource for this caller (other tenants' resources included)",
    409: "Conflicts with an existing resource",
    413: "Body or file over the size limit",
    415: "Not a supported document format",
    422: "A valid request the rules refuse",
    429: "Rate, concurrency or budget limit, monthly quota, or queue timeout (`Retry-After`)",
    502: "The generation server failed",
    503: "A backing service is down, or no generation capacity (`Retry-After`)",
    504: "The generation server did not answer in time",
}


class OpenAIError(BaseModel):
    """The same message in OpenAI's error shape (OpenAI SDKs show it)."""

    message: str
    type: str
    code: str


class Problem(BaseModel):
    """An RFC 9457 problem; some carry more fields (``errors``, ``quota``,
    ``retry_after_s``...)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    error: OpenAIError


def problems(*codes: int) -> dict[int, ResponseSpec]:
    """Response specs for the problem+json answers ``codes``."""
    return {code: ResponseSpec(Problem, description=DESCRIPTIONS[code], media_type=PROBLEM_JSON,
                               generate_examples=False) for code in codes}


def also_answering(media_type: str, status: int = 200) -> type[Operation]:
    """An operation class (the decorator's ``operation_class``) whose ``status`` answer
    may also be a text body of ``media_type`` (an event stream, a CSV file)."""

    @dataclass
    class AlsoAnswering(Operation):
        def __post_init__(self) -> None:
            response = (self.responses or {}).get(str(status))
            if isinstance(response, OpenAPIResponse):
                text = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
                response.content = {**(response.content or {}), media_type: text}

    return AlsoAnswering


def document_problems(app: Litestar) -> None:
    """Add the statuses every route shares to each route's documented responses (its
    decorator's own win)."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            codes = _shared_codes(route, handler)
            handler.responses = {**problems(*codes), **(handler.responses or {})}


def _shared_codes(route: HTTPRoute, handler: Any) -> list[int]:
    codes: list[int] = []
    if _takes_input(route, handler):
        codes.append(400)
    if not any(route.path == p or route.path.startswith(f"{p}/") for p in PUBLIC_PATHS):
        codes += [401, 403, 503]  # the key is checked in PostgreSQL
    if route.path_parameters:
        codes.append(404)
    if "data" in handler.parsed_fn_signature.parameters:
        codes.append(413)
    return codes


def _takes_input(route: HTTPRoute, handler: Any) -> bool:
    """What Litestar validates (and answers 400 for): a body, path or query parameters."""
    parameters = set(handler.parsed_fn_signature.parameters)
    query = parameters - set(handler.resolve_dependencies()) - RESERVED_KWARGS - {"self"}
    return bool(route.path_parameters) or "data" in parameters or bool(query)
