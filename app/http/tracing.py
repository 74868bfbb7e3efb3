"""Optional OpenTelemetry tracing of the API, on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set:
one server span per request (Litestar's OpenTelemetry plugin), exported over OTLP/HTTP to
``<endpoint>/v1/traces``. The packages are the ``otel`` extra (``pip install
'tenantrag[otel]'``; the container image has them)."""

from __future__ import annotations

from litestar.middleware import DefineMiddleware

from app.settings import TracingSettings

# Probes would make most of the spans.
UNTRACED_PATHS = ["^/healthz$", "^/readyz$"]


class TracingUnavailableError(RuntimeError):
    """Tracing is configured but the OpenTelemetry packages are not installed."""


def tracing_middleware(settings: TracingSettings) -> list[DefineMiddleware]:
    """The tracing middleware when tracing is on, else none. Raises
    TracingUnavailableError when it is on but OpenTelemetry is missing."""
    if not settings.exporter_otlp_endpoint:
        return []
    try:
        from litestar.plugins.opentelemetry import OpenTelemetryConfig
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailableError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry packages are not "
            "installed: install the otel extra (pip install 'tenantrag[otel]') or unset "
            f"the variable ({exc})"
        ) from exc
    endpoint = settings.exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    # The provider flushes its batch at interpreter exit (shutdown_on_exit).
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    config = OpenTelemetryConfig(tracer_provider=provider, exclude=UNTRACED_PATHS)
    return [config.middleware]
