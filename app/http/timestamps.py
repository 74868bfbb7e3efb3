"""Date-time query parameters (``from``, ``to``...): ISO 8601 with a time zone, held in UTC.

An offset can carry a time that no ``datetime`` holds once in UTC
(``0001-01-01T00:00:00+14:00`` is in year 0, ``9999-12-31T12:00:00-14:00`` in 10000),
and the database compares in UTC: such a value used to fail deep in a route or the
driver (500, or 503 "database unavailable"). Declared as :data:`UtcDateTime`, a query
parameter is parsed, checked and converted before the route runs; what fails is the
client's 400 naming the parameter (Litestar's validation errors, whose keys
``app.http.problems`` turns into the names the client sent).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from litestar.openapi.spec import OpenAPIFormat, OpenAPIType, Schema
from litestar.plugins import OpenAPISchemaPlugin
from litestar.typing import FieldDefinition

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator


class UtcDateTime(datetime):
    """An aware date-time, in UTC, from a query parameter."""


def decode_utc(_: type[Any], value: Any) -> UtcDateTime:
    """Litestar's type decoder for :class:`UtcDateTime` (messages name no parameter:
    Litestar adds it). A ValueError here is the client's 400."""
    if not isinstance(value, str | datetime):
        raise ValueError("expected an ISO 8601 date-time")
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("needs a time zone (e.g. 2026-11-01T00:00:00Z)")
    try:
        utc = parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None
    return UtcDateTime.combine(utc.date(), utc.timetz())


def is_utc_datetime(annotation: Any) -> bool:
    """Whether Litestar should decode ``annotation`` with :func:`decode_utc`."""
    return annotation is UtcDateTime


class UtcDateTimeSchema(OpenAPISchemaPlugin):
    """:class:`UtcDateTime` in the OpenAPI document: an RFC 3339 date-time string."""

    @staticmethod
    def is_plugin_supported_type(value: Any) -> bool:
        return value is UtcDateTime

    def to_openapi_schema(self, field_definition: FieldDefinition,
                          schema_creator: SchemaCreator) -> Schema:
        return Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.DATE_TIME)
