"""Process logging: one JSON object per line (production) or plain text (dev), every line
carrying the request id and tenant id of the request that emitted it.

The ids live in context variables: the request middleware sets the request id, the
authentication middleware the tenant id, and every record logged while that request is
handled (and in tasks it starts) picks them up.
"""

from __future__ import annotations

import logging
import sys
import uuid
from contextvars import ContextVar
from typing import TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from app.settings import ServerSettings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
tenant_id_var: ContextVar[str | None] = ContextVar("tenant_id", default=None)

# timestamp (ISO 8601, UTC), level, logger, message, request_id, tenant_id, then any
# `extra` fields of the record.
_JSON_FIELDS = ("levelname", "name", "message", "request_id", "tenant_id")
_JSON_NAMES = {"levelname": "level", "name": "logger"}
# uvicorn adds a copy of its message with terminal colour codes.
_JSON_SKIPPED = (*RESERVED_ATTRS, "color_message")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# One line per upstream call and per health probe of every replica otherwise.
_CHATTY_LOGGERS = ("httpx", "httpcore")


def set_log_tenant(tenant_id: uuid.UUID | None) -> None:
    """Name the tenant on the log lines of the current request (None: no tenant)."""
    tenant_id_var.set(str(tenant_id) if tenant_id is not None else None)


class RequestContextFilter(logging.Filter):
    """Stamps each record with the current request id and tenant id (or None)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the ids; never drops a record."""
        record.request_id = request_id_var.get()
        record.tenant_id = tenant_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal, the ids appended when there are any."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, then ``request_id=... tenant_id=...`` when set."""
        line = super().formatMessage(record)
        ids = [f"{name}={value}" for name in ("request_id", "tenant_id")
               if (value := getattr(record, name, None))]
        return " ".join([line, *ids])


def json_formatter() -> logging.Formatter:
    """One JSON object per record."""
    return JsonFormatter(list(_JSON_FIELDS), rename_fields=_JSON_NAMES, timestamp=True,
                         reserved_attrs=_JSON_SKIPPED)


def log_handler(server: ServerSettings, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to ``stream`` (stderr) in the configured format, with the ids."""
    handler = _ProcessHandler(stream or sys.stderr)
    json_lines = server.effective_log_format() == "json"
    handler.setFormatter(json_formatter() if json_lines else TextFormatter())
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(server: ServerSettings) -> logging.Handler:
    """Route every logger of the process (uvicorn's and Dramatiq's included) to one
    handler on stderr; a second call replaces the first one's handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ProcessHandler)]:
        root.removeHandler(old)
    handler = log_handler(server)
    root.addHandler(handler)
    root.setLevel(server.log_level)
    chatty_level = logging.DEBUG if server.log_level == "DEBUG" else logging.WARNING
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(chatty_level)
    return handler


class _ProcessHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (so it can find it again)."""
