"""Liveness and readiness."""

from app.domain.system.controllers import healthz, readyz

ROUTES = [healthz, readyz]
__all__ = ["ROUTES"]
