"""Log lines as operators read them (JSON in production, text in dev) and the optional
OpenTelemetry tracing: on only when configured, a clear refusal when its packages are
missing, spans delivered to an OTLP collector when on."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from app.http.request_context import request_middleware
from app.http.tracing import TracingUnavailableError, tracing_middleware
from app.logs import configure_logging, log_handler, request_id_var, tenant_id_var
from app.settings import ServerSettings, Settings, TracingSettings


def emit(handler: logging.Handler, message: str, **extra: Any) -> str:
    """What ``handler`` writes for one INFO record of a throwaway logger."""
    stream = io.StringIO()
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger(f"test.logs.{id(handler)}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        logger.info(message, extra=extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_lines_carry_the_request_and_tenant_of_the_context() -> None:
    handler = log_handler(ServerSettings(env="prod"))
    request, tenant = request_id_var.set("req-42"), tenant_id_var.set("tenant-7")
    try:
        line = emit(handler, "document %s ready", pool="shared")
    finally:
        request_id_var.reset(request)
        tenant_id_var.reset(tenant)
    assert line.endswith("\n") and line.count("\n") == 1  # one object per line
    record = json.loads(line)
    assert record["level"] == "INFO" and record["logger"].startswith("test.logs.")
    assert record["message"] == "document %s ready"  # no args: logged as given
    assert record["request_id"] == "req-42" and record["tenant_id"] == "tenant-7"
    assert record["pool"] == "shared"  # `extra` fields become keys
    assert record["timestamp"].endswith("+00:00")  # ISO 8601, UTC


def test_json_lines_outside_a_request_have_null_ids_and_no_terminal_colours() -> None:
    handler = log_handler(ServerSettings(log_format="json"))
    record = json.loads(emit(handler, "started", color_message="\x1b[36mstarted\x1b[0m"))
    assert record["request_id"] is None and record["tenant_id"] is None
    assert "color_message" not in record  # uvicorn's coloured copy of the message


def test_text_lines_append_the_ids_only_when_set() -> None:
    handler = log_handler(ServerSettings(env="dev"))
    assert emit(handler, "idle").rstrip().endswith(" idle")
    token = request_id_var.set("abc")
    try:
        assert emit(handler, "busy").rstrip().endswith("busy request_id=abc")
    finally:
        request_id_var.reset(token)


def test_log_format_defaults_to_json_in_production_and_text_elsewhere() -> None:
    assert ServerSettings(env="prod").effective_log_format() == "json"
    assert ServerSettings(env="dev").effective_log_format() == "text"
    assert ServerSettings(env="dev", log_format="json").effective_log_format() == "json"


@pytest.fixture
def process_logging() -> Iterator[None]:
    """Put the root logger and the quietened ones back as they were."""
    root, quiet = logging.getLogger(), [logging.getLogger(n) for n in ("httpx", "httpcore")]
    handlers, levels = list(root.handlers), [lg.level for lg in (root, *quiet)]
    yield
    root.handlers = handlers
    for logger, level in zip((root, *quiet), levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("process_logging")
def test_configure_logging_replaces_its_own_handler_and_keeps_others() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    first = configure_logging(ServerSettings(log_level="DEBUG"))
    second = configure_logging(ServerSettings(log_level="INFO"))
    assert second in root.handlers and first not in root.handlers
    assert all(h in root.handlers for h in before)  # e.g. pytest's own
    assert root.level == logging.INFO
    # One line per call to vLLM and per health probe only when debugging.
    assert logging.getLogger("httpx").level == logging.WARNING


def test_tracing_is_off_without_an_endpoint() -> None:
    assert tracing_middleware(TracingSettings(exporter_otlp_endpoint=None)) == []
    assert tracing_middleware(TracingSettings(exporter_otlp_endpoint="")) == []


def test_tracing_refuses_to_start_without_its_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes that import fail, as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(TracingUnavailableError, match=r"pip install 'tenantrag\[otel\]'"):
        tracing_middleware(TracingSettings(exporter_otlp_endpoint="http://127.0.0.1:4318"))


def test_serve_exits_with_the_reason_when_tracing_packages_are_missing() -> None:
    script = ("import sys; sys.modules['opentelemetry.sdk.trace'] = None; "
              "sys.argv = ['tenantrag', 'serve']; from app.server.cli import main; main()")
    env = {**os.environ, "APP_ENV": "test", "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
           "REDIS_URL": "redis://127.0.0.1:1/0",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry packages" in result.stderr
    assert "Traceback" not in result.stderr


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace collector that keeps what it is sent."""

    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(base URL, requests received) of a collector on a free local port."""
    received: list[tuple[str, bytes]] = []
    handler = type("Handler", (Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@get("/v1/ping", sync_to_thread=False)
def ping() -> dict[str, str]:
    """A route to trace."""
    return {"pong": "yes"}


async def test_requests_are_traced_to_the_otlp_collector_with_the_service_name(
    collector: tuple[str, list[tuple[str, bytes]]],
) -> None:
    url, received = collector
    settings = Settings(server=ServerSettings(env="test"),
                        tracing=TracingSettings(exporter_otlp_endpoint=url + "/",
                                                service_name="tenantrag-test"))
    middleware = request_middleware(settings)
    app = Litestar([ping], middleware=middleware)
    async with AsyncTestClient(app) as client:
        resp = await client.get("/v1/ping")
        assert resp.status_code == 200 and resp.headers["x-request-id"]
    provider = middleware[1].kwargs["config"].tracer_provider
    assert provider.force_flush(10_000)
    paths = {path for path, _ in received}
    assert paths == {"/v1/traces"}
    spans, services = [], set()
    for _, body in received:
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes
                         if a.key == "service.name"}
            spans += [s.name for scope in resource_spans.scope_spans for s in scope.spans]
    assert services == {"tenantrag-test"}
    assert "GET /v1/ping" in spans
