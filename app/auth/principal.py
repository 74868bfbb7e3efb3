"""Who is calling: resolved from the credential only, never from the request body."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from app.auth.keys import Scope
from app.db.models import Tenant, Tier

# How the audit log names the operator (the platform key) and the CLI acting.
OPERATOR = "operator"
CLI = "cli"


def key_actor(key_id: uuid.UUID) -> str:
    """How the audit log names a tenant API key acting."""
    return f"key:{key_id}"


@dataclass(frozen=True)
class TenantPrincipal:
    """A tenant API key's holder: exactly one tenant, a set of scopes."""

    tenant_id: uuid.UUID
    tenant_slug: str
    tier: Tier
    key_id: uuid.UUID
    scopes: frozenset[Scope] = field(default_factory=frozenset)
    # The tenant row as read when the key was checked (read-only; at most the
    # credential cache's TTL old, and dropped when the tenant changes).
    tenant: Tenant | None = field(default=None, compare=False, repr=False)
    expires_at: datetime | None = None  # a rotated key's end of overlap


@dataclass(frozen=True)
class EmbedPrincipal:
    """A browser holding an embed token: one end user of one tenant, chat only, on the
    token's knowledge bases."""

    tenant_id: uuid.UUID
    tenant_slug: str
    tier: Tier
    key_id: uuid.UUID  # the key that minted the token
    end_user: str
    kb_ids: frozenset[uuid.UUID]
    tenant: Tenant | None = field(default=None, compare=False, repr=False)
    expires_at: datetime | None = None


@dataclass(frozen=True)
class PlatformPrincipal:
    """The platform operator."""

    name: str = "platform-admin"


Principal = TenantPrincipal | EmbedPrincipal | PlatformPrincipal
CachedPrincipal = TenantPrincipal | EmbedPrincipal
