"""Domain exceptions. Services raise these; the API layer alone maps them to HTTP."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a caller can act on. ``code`` is stable and machine-readable."""

    code = "error"
    title = "Request failed"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInputError(DomainError):
    """The request is well-formed but its content cannot be accepted."""

    code = "invalid_input"
    title = "Invalid input"


class NotFoundError(DomainError):
    """The resource does not exist for this caller (other tenants' resources included)."""

    code = "not_found"
    title = "Not found"


class ConflictError(DomainError):
    """The request clashes with existing state (e.g. a duplicate slug)."""

    code = "conflict"
    title = "Conflict"


class IdempotencyConflictError(ConflictError):
    """A client request id (``X-Request-Id``) reused with another request body."""

    code = "idempotency_conflict"
    title = "Request id reused"


class IdempotencyInProgressError(ConflictError):
    """The first request with this client request id has not finished yet."""

    code = "idempotency_in_progress"
    title = "Request id in use"


class AuthenticationError(DomainError):
    """No credential, or one that is unknown, malformed, revoked or expired."""

    code = "unauthenticated"
    title = "Authentication required"


class PermissionDeniedError(DomainError):
    """The credential is valid but may not do this."""

    code = "forbidden"
    title = "Forbidden"


class TenantSuspendedError(PermissionDeniedError):
    """The tenant is suspended by the platform operator."""

    code = "tenant_suspended"
    title = "Tenant suspended"


class CsrfError(PermissionDeniedError):
    """A browser request the console refuses as possibly forged: another site's page
    sent it, or it lacks the session's CSRF token."""

    code = "csrf_failed"
    title = "Cross-site request refused"


class ServiceUnavailableError(DomainError):
    """A backing service (database, Redis, vector store) cannot be reached."""

    code = "service_unavailable"
    title = "Service unavailable"


class PayloadTooLargeError(DomainError):
    """An uploaded file is over the configured size limit."""

    code = "payload_too_large"
    title = "Payload too large"


class UnsupportedMediaError(DomainError):
    """The upload is not one of the supported document formats."""

    code = "unsupported_media_type"
    title = "Unsupported media type"


class QuotaExceededError(PermissionDeniedError):
    """A tenant quota (documents, storage...) would be exceeded; ``quota`` names it."""

    code = "quota_exceeded"
    title = "Quota exceeded"


class MonthlyQuotaExceededError(QuotaExceededError):
    """A monthly quota (embedding tokens) is used up until the next calendar month
    (HTTP 429: ``resets_at`` and ``Retry-After`` say when)."""


class BadRequestError(DomainError):
    """The request asks for something this API does not do (HTTP 400)."""

    code = "invalid_request"
    title = "Invalid request"


class ContextLengthError(BadRequestError):
    """The prompt cannot fit the model's context window even with no history."""

    code = "context_length_exceeded"
    title = "Context length exceeded"


class UpstreamError(DomainError):
    """The generation server failed or answered with an error (HTTP 502)."""

    code = "upstream_error"
    title = "Upstream error"


class UpstreamConnectError(UpstreamError):
    """The generation server could not be reached (nothing was sent to it)."""


class NoCapacityError(ServiceUnavailableError):
    """No healthy generation server can take the request (HTTP 503)."""

    code = "no_capacity"
    title = "No generation capacity"


class QueueTimeoutError(DomainError):
    """The request waited for a generation slot past the queue timeout (HTTP 429)."""

    code = "queue_timeout"
    title = "Too many requests"


class RateLimitedError(DomainError):
    """A rate limit, concurrency limit or token budget refuses the request (HTTP 429).
    ``code`` is ``rate_limited``, ``concurrency_limited``, ``budget_exhausted`` or a
    window limit's own (``monthly_calls_exhausted``)."""

    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, code: str = "rate_limited", **extra: object) -> None:
        super().__init__(detail, **extra)
        self.code = code


class UpstreamTimeoutError(UpstreamError):
    """The generation server did not answer in time (HTTP 504)."""

    code = "upstream_timeout"
    title = "Upstream timeout"
