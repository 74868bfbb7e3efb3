"""Prometheus metrics of the service and their ``/metrics`` route."""

from app.observability.routes import prometheus_metrics

ROUTES = [prometheus_metrics]
__all__ = ["ROUTES"]
