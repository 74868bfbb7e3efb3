"""API key format and hashing.

A key reads ``trk_<prefix>_<secret>``. The prefix (12 lowercase letters and digits) is
stored in clear to find the row; the key itself is stored only as an HMAC-SHA256 under
the server's pepper. Keys carry 256 random bits, so a fast keyed hash is the right tool
(a slow password hash would add latency to every request and protect nothing more).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass

KEY_SCHEME = "trk"
PREFIX_LENGTH = 12
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits


class Scope(enum.StrEnum):
    """What a tenant key may do."""

    chat = "chat"
    ingest = "ingest"
    admin = "admin"


@dataclass(frozen=True)
class Grantor:
    """Who mints, rotates or revokes a key: the audit log's name for them and, for a
    tenant key, the scopes it holds. A key hands out and manages no more than it holds;
    the operator and the CLI stand above tenants, so their ``scopes`` is None."""

    actor: str
    scopes: frozenset[Scope] | None

    def lacks(self, wanted: Iterable[str]) -> list[str]:
        """The scopes in ``wanted`` this grantor does not hold, sorted (empty: allowed)."""
        if self.scopes is None:
            return []
        return sorted({str(s) for s in wanted} - {s.value for s in self.scopes})


@dataclass(frozen=True)
class NewKey:
    """A freshly minted key: ``plaintext`` is shown once and never stored."""

    plaintext: str
    prefix: str


@dataclass(frozen=True)
class ParsedKey:
    """A presented key split into its lookup prefix and the whole text."""

    prefix: str
    plaintext: str


def mint_key() -> NewKey:
    """Generate a new random key."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    return NewKey(plaintext=f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}", prefix=prefix)


def parse_key(presented: str) -> ParsedKey | None:
    """Split a presented key, or None if it is not of our format."""
    scheme, _, rest = presented.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != KEY_SCHEME or len(prefix) != PREFIX_LENGTH or len(secret) < 20:
        return None
    if any(c not in _PREFIX_ALPHABET for c in prefix):
        return None
    return ParsedKey(prefix=prefix, plaintext=presented)


def hash_key(plaintext: str, pepper: str) -> str:
    """The stored form of a key: hex HMAC-SHA256 under the server pepper."""
    keyed = _keyed(pepper).copy()  # the pepper's key schedule once, not per request
    keyed.update(plaintext.encode())
    return keyed.hexdigest()


@functools.lru_cache(maxsize=8)
def _keyed(pepper: str) -> hmac.HMAC:
    return hmac.new(pepper.encode(), digestmod=hashlib.sha256)


def key_matches(plaintext: str, stored_hash: str, pepper: str) -> bool:
    """Constant-time comparison of a presented key with a stored hash."""
    return hmac.compare_digest(hash_key(plaintext, pepper), stored_hash)
