"""Embed tokens: short-lived signed tokens (JWT, HS256) a tenant's backend mints for one
of its end users, so a browser chat UI can call the chat API directly without ever
holding an API key.

A token names its tenant, end user and knowledge bases, the key that minted it, and
expires within ``AUTH_EMBED_MAX_TTL_S``. It may only chat (and read that end user's
conversations); it stops working when it expires, when the minting key is revoked or
expires, or when the tenant is suspended.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from app.errors import AuthenticationError
from app.text_fields import check_single_line

ISSUER = "tenantrag"
AUDIENCE = "tenantrag-embed"
ALGORITHM = "HS256"
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "tid", "kid", "kbs", "jti"]


def looks_like_jwt(presented: str) -> bool:
    """Three base64url parts, the first a JSON header: not one of our API keys."""
    return presented.startswith("eyJ") and presented.count(".") == 2


@dataclass(frozen=True)
class EmbedClaims:
    """What a verified embed token says."""

    tenant_id: uuid.UUID
    end_user: str
    kb_ids: frozenset[uuid.UUID]
    key_id: uuid.UUID
    expires_at: datetime


class EmbedTokenSigner:
    """Mints and verifies embed tokens with the platform's signing key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mint(self, tenant_id: uuid.UUID, key_id: uuid.UUID, end_user: str,
             kb_ids: list[uuid.UUID], ttl: timedelta) -> tuple[str, datetime]:
        """A token for ``end_user`` of ``tenant_id``, valid for ``ttl``."""
        now = datetime.now(UTC)
        expires = now + ttl
        claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": expires,
                  "sub": end_user, "tid": str(tenant_id), "kid": str(key_id),
                  "kbs": [str(k) for k in kb_ids], "jti": uuid.uuid4().hex, "scope": "chat"}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM), expires

    def verify(self, token: str) -> EmbedClaims:
        """The token's claims, or AuthenticationError saying what is wrong."""
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=AUDIENCE,
                                issuer=ISSUER, options={"require": REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("this embed token has expired; ask the site for a "
                                      "new one") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError("this embed token's signature is not valid") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid embed token: {exc}") from exc
        try:
            return EmbedClaims(
                tenant_id=uuid.UUID(claims["tid"]),
                # A subject minted before control characters were refused is refused here.
                end_user=check_single_line(str(claims["sub"])),
                kb_ids=frozenset(uuid.UUID(k) for k in claims["kbs"]),
                key_id=uuid.UUID(claims["kid"]),
                expires_at=datetime.fromtimestamp(claims["exp"], UTC))
        except (TypeError, ValueError) as exc:
            raise AuthenticationError("invalid embed token: malformed claims") from exc
