"""Reading and changing a tenant's content rules, and the record of their hits."""

from __future__ import annotations

import functools
import uuid

from sqlalchemy import func
from sqlmodel import col, select

from app.db.engine import Database
from app.db.models import ContentRuleHit, Tenant, utcnow
from app.domain.audit.records import AuditAction, changed_fields, record_audit
from app.domain.content_rules.matcher import PatternRefused, Rule, compile_pattern, compile_rules
from app.domain.content_rules.matcher import unsupported as unsupported_patterns
from app.domain.content_rules.schemas import ContentRules, ContentRulesOut
from app.domain.tenants.rows import tenant_row_in
from app.errors import InvalidInputError


@functools.lru_cache(maxsize=1024)
def _compiled(terms: tuple[str, ...], patterns: tuple[str, ...]) -> tuple[Rule, ...]:
    return tuple(compile_rules(terms, patterns))


def rules_of(tenant: Tenant) -> tuple[Rule, ...]:
    """The tenant's compiled rules (compiled once per distinct rule set)."""
    return _compiled(tuple(tenant.blocked_terms), tuple(tenant.blocked_patterns))


def _check_engine(patterns: list[str]) -> None:
    for i, p in enumerate(patterns):
        try:
            compile_pattern(p)
        except PatternRefused as exc:
            raise InvalidInputError(
                f"blocked_patterns[{i}] {p!r} is not supported: {exc.reason} (patterns run "
                "on RE2: no backreferences or lookarounds; use \\z for the end of text)",
                field=f"blocked_patterns[{i}]") from None


class ContentRulesService:
    """One tenant's rules and hits, in its own row-level-security scope."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, tenant_id: uuid.UUID) -> ContentRulesOut:
        """The current rules, and those stored patterns that are not applied."""
        async with self.db.tenant(tenant_id) as session:
            tenant = await tenant_row_in(session, tenant_id)
        out = ContentRulesOut.model_validate(tenant)
        out.unsupported_patterns = unsupported_patterns(tenant.blocked_patterns)
        return out

    async def set(self, tenant_id: uuid.UUID, rules: ContentRules, actor: str) -> ContentRules:
        """Replace the rules (audited when they change); a pattern RE2 cannot run is
        refused, saying why."""
        _check_engine(rules.blocked_patterns)
        values = {"blocked_terms": list(dict.fromkeys(rules.blocked_terms)),
                  "blocked_patterns": list(dict.fromkeys(rules.blocked_patterns)),
                  "disclaimer": rules.disclaimer or None}
        async with self.db.tenant(tenant_id) as session:
            tenant = await tenant_row_in(session, tenant_id, lock=True)
            changes = changed_fields(tenant, values)
            if changes:
                for name, change in changes.items():
                    setattr(tenant, name, change["to"])
                tenant.updated_at = utcnow()
                session.add(tenant)
                record_audit(session, tenant_id, actor, AuditAction.content_rules_changed,
                             ("tenant", tenant_id), {"changes": changes})
        return ContentRules.model_validate(tenant)

    async def record_hit(self, hit: ContentRuleHit) -> None:
        """Keep a hit (behind the answer)."""
        async with self.db.tenant(hit.tenant_id) as session:
            session.add(hit)

    async def hits(self, tenant_id: uuid.UUID, limit: int,
                   offset: int) -> tuple[list[ContentRuleHit], int]:
        """Hits, newest first, and their total."""
        async with self.db.tenant(tenant_id) as session:
            total = (await session.exec(select(func.count()).select_from(ContentRuleHit))).one()
            rows = (await session.exec(
                select(ContentRuleHit).order_by(col(ContentRuleHit.id).desc())
                .limit(limit).offset(offset))).all()
        return list(rows), int(total)

