"""Prometheus metrics of the service and their ``/metrics`` route."""
