"""The monthly quota on embedding tokens: what ingestion may embed per tenant and month.

Ingestion meters each document version's embedding tokens as a usage event of kind
``embedding`` when it is published; the quota sums those events over the calendar month
(UTC). It is checked twice: at upload, where a tenant already at its quota is refused
(the bytes are not yet parsed, so their tokens are unknown), and by the worker once a
document is chunked, where its exact token count must still fit (else the document ends
``failed`` with the reason, before any embedding work). Documents being embedded at the
same moment are not yet metered, so a tenant can pass its quota by at most what it has
in flight (its fair share, see workers/relay.py).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.models import Document, DocumentStatus, Tenant, UsageEvent, utcnow
from app.errors import MonthlyQuotaExceededError
from app.quotas.limiter import period_of
from app.quotas.policy import QuotaField, effective_limit
from app.quotas.usage import EMBEDDING

QUOTA: QuotaField = "monthly_embedding_tokens"
# How a document refused by the quota starts its error: uploading its bytes again
# retries it (a file that failed for any other reason stays a duplicate).
NOT_EMBEDDED = f"not embedded: quota {QUOTA} exceeded"


@dataclass(frozen=True)
class EmbeddingAllowance:
    """A tenant's quota for the month of ``now`` and how much of it is used."""

    limit: int
    used: int
    now: datetime

    @property
    def resets_at(self) -> datetime:
        """The first moment of the next calendar month (UTC)."""
        year, month = self.now.year, self.now.month
        return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)

    def refusal(self, adding: int = 0) -> MonthlyQuotaExceededError | None:
        """The error if ``adding`` more tokens would not fit (None if they do)."""
        if self.used + adding <= self.limit and self.used < self.limit:
            return None
        needs = f" + {adding} for this document" if adding else ""
        resets = self.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        return MonthlyQuotaExceededError(
            f"quota {QUOTA} exceeded: {self.used} embedding tokens used in "
            f"{period_of(self.now)}{needs} > limit {self.limit}; it resets at {resets}",
            quota=QUOTA, limit=self.limit, used=self.used, resets_at=resets,
            retry_after_s=math.ceil((self.resets_at - self.now).total_seconds()))


async def allowance(session: AsyncSession, tenant: Tenant) -> EmbeddingAllowance | None:
    """The tenant's embedding allowance this month; None if it has no quota."""
    limit = effective_limit(tenant, QUOTA)
    if limit is None:
        return None
    now = utcnow()
    return EmbeddingAllowance(limit, await tokens_used(session, tenant.id, now), now)


async def tokens_used(session: AsyncSession, tenant_id: uuid.UUID, now: datetime) -> int:
    """Embedding tokens metered for the tenant in the calendar month of ``now``."""
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    t = UsageEvent.__table__.c  # type: ignore[attr-defined]
    total = await session.scalar(
        select(func.coalesce(func.sum(t.prompt_tokens), 0))
        .where(t.tenant_id == tenant_id, t.kind == EMBEDDING, t.created_at >= start))
    return int(total or 0)


async def refuse_if_used_up(session: AsyncSession, tenant: Tenant) -> None:
    """Raise `MonthlyQuotaExceededError` if the tenant's month's quota is used up."""
    current = await allowance(session, tenant)
    refusal = current.refusal() if current is not None else None
    if refusal is not None:
        raise refusal


def not_embedded(refusal: MonthlyQuotaExceededError) -> str:
    """The ``error`` of a document refused by the quota (starts with NOT_EMBEDDED)."""
    return f"not embedded: {refusal.detail}"


def failed_for_quota(document: Document) -> bool:
    """True if the document's newest version was refused by this quota (not broken)."""
    return (document.status == DocumentStatus.failed
            and (document.error or "").startswith(NOT_EMBEDDED))
