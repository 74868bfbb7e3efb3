"""Tier defaults for the quota fields a tenant leaves ``null``."""

from __future__ import annotations

from typing import Literal

from app.db.models import Tenant, Tier

QuotaField = Literal[
    "rpm_limit", "tpm_limit", "max_concurrency", "monthly_token_budget",
    "max_output_tokens", "max_documents", "max_storage_bytes", "monthly_embedding_tokens",
]
GIB = 1024**3

# None means unlimited. Operators override per tenant through /admin/tenants.
TIER_DEFAULTS: dict[Tier, dict[QuotaField, int | None]] = {
    Tier.free: {
        "rpm_limit": 20, "tpm_limit": 20_000, "max_concurrency": 2,
        "monthly_token_budget": 1_000_000, "max_output_tokens": 512,
        "max_documents": 100, "max_storage_bytes": GIB // 10,
        "monthly_embedding_tokens": 5_000_000,
    },
    Tier.pro: {
        "rpm_limit": 300, "tpm_limit": 200_000, "max_concurrency": 10,
        "monthly_token_budget": 50_000_000, "max_output_tokens": 2048,
        "max_documents": 10_000, "max_storage_bytes": 10 * GIB,
        "monthly_embedding_tokens": 500_000_000,
    },
    Tier.enterprise: {
        "rpm_limit": None, "tpm_limit": None, "max_concurrency": None,
        "monthly_token_budget": None, "max_output_tokens": 4096,
        "max_documents": None, "max_storage_bytes": None,
        "monthly_embedding_tokens": None,
    },
}


def effective_limit(tenant: Tenant, field: QuotaField) -> int | None:
    """The tenant's own value for ``field``, else its tier's default (None = unlimited)."""
    own: int | None = getattr(tenant, field)
    return own if own is not None else TIER_DEFAULTS[Tier(tenant.tier)][field]
