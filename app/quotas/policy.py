"""Quota policy: what each tenant may use, in one place. The tier defaults for every
quota a tenant leaves ``null``, the admission ``Limits`` of a chat request
(``limits_for``), the cap on an answer's tokens (``output_cap``) and the document and
storage quotas of an upload (``check_storage``). Enforcement lives elsewhere (the Redis
scripts in ``limiter.py``; the embedding quota in ``app/domain/knowledge``); the numbers
and which tenant column sets which limit live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import func
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.models import Document, Tenant, Tier
from app.errors import QuotaExceededError
from app.quotas.limiter import Limits

QuotaField = Literal[
    "rpm_limit", "tpm_limit", "max_concurrency", "monthly_token_budget",
    "max_output_tokens", "max_documents", "max_storage_bytes", "monthly_embedding_tokens",
    "user_rpm_limit", "user_tpm_limit", "user_max_concurrency", "monthly_call_limit",
]
GIB = 1024**3
# Per end user there is no tier default: a tenant sets its own.
NO_USER_LIMITS: dict[QuotaField, int | None] = {
    "user_rpm_limit": None, "user_tpm_limit": None, "user_max_concurrency": None,
}

# None means unlimited. Operators override per tenant through /admin/tenants. The
# monthly calls bound what the token budget does not price (each call's retrieval):
# a budget's worth of the smallest requests, 100 tokens each.
TIER_DEFAULTS: dict[Tier, dict[QuotaField, int | None]] = {
    Tier.free: {
        "rpm_limit": 20, "tpm_limit": 20_000, "max_concurrency": 2,
        "monthly_token_budget": 1_000_000, "max_output_tokens": 512,
        "max_documents": 100, "max_storage_bytes": GIB // 10,
        "monthly_embedding_tokens": 5_000_000, "monthly_call_limit": 10_000,
        **NO_USER_LIMITS,
    },
    Tier.pro: {
        "rpm_limit": 300, "tpm_limit": 200_000, "max_concurrency": 10,
        "monthly_token_budget": 50_000_000, "max_output_tokens": 2048,
        "max_documents": 10_000, "max_storage_bytes": 10 * GIB,
        "monthly_embedding_tokens": 500_000_000, "monthly_call_limit": 500_000,
        **NO_USER_LIMITS,
    },
    Tier.enterprise: {
        "rpm_limit": None, "tpm_limit": None, "max_concurrency": None,
        "monthly_token_budget": None, "max_output_tokens": 4096,
        "max_documents": None, "max_storage_bytes": None,
        "monthly_embedding_tokens": None, "monthly_call_limit": None,
        **NO_USER_LIMITS,
    },
}

# Each admission limit (a ``Limits`` field) and the tenant column that sets it.
LIMIT_COLUMNS: dict[str, QuotaField] = {
    "rpm": "rpm_limit", "tpm": "tpm_limit", "concurrency": "max_concurrency",
    "user_rpm": "user_rpm_limit", "user_tpm": "user_tpm_limit",
    "user_concurrency": "user_max_concurrency", "budget": "monthly_token_budget",
    "monthly_calls": "monthly_call_limit",
}


def effective_limit(tenant: Tenant, field: QuotaField) -> int | None:
    """The tenant's own value for ``field``, else its tier's default (None = unlimited)."""
    own: int | None = getattr(tenant, field)
    return own if own is not None else TIER_DEFAULTS[Tier(tenant.tier)][field]


def limits_for(tenant: Tenant) -> Limits:
    """The limits a chat request of ``tenant`` is admitted under."""
    return Limits(**{name: effective_limit(tenant, column)
                     for name, column in LIMIT_COLUMNS.items()})


def output_cap(tenant: Tenant) -> int | None:
    """The most tokens one answer of ``tenant`` may generate (None = no cap)."""
    return effective_limit(tenant, "max_output_tokens")


async def check_storage(session: AsyncSession, tenant: Tenant, adding: Sequence[int]) -> None:
    """Refuse (403 ``quota_exceeded``) an upload of files of ``adding`` bytes each that
    could push the tenant past its document or storage quota. Counted in ``session``,
    the tenant's scope, with the tenant row locked, so concurrent uploads are counted one
    after another."""
    docs, used = (await session.exec(
        select(func.count(), func.coalesce(func.sum(Document.size_bytes), 0))
        .select_from(Document)
    )).one()
    checks: tuple[tuple[QuotaField, int, int, str], ...] = (
        ("max_documents", docs, len(adding), "documents"),
        ("max_storage_bytes", int(used), sum(adding), "bytes"))
    for quota, current, more, unit in checks:
        limit = effective_limit(tenant, quota)
        if limit is not None and current + more > limit:
            raise QuotaExceededError(
                f"quota {quota} exceeded: {current} {unit} used + {more} in this upload "
                f"> limit {limit}",
                quota=quota, limit=limit, used=current,
            )
