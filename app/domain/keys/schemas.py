"""Request and response bodies for API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app.auth.keys import Scope
from app.text_fields import SINGLE_LINE


class ApiKeyCreate(BaseModel):
    """A key to mint for the tenant."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
                    SINGLE_LINE]
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=3)]

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[Scope]) -> list[Scope]:
        return sorted(set(scopes))


class ApiKeyOut(BaseModel):
    """A key as listed: never its secret."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    prefix: str
    scopes: list[Scope]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None = None  # set when the key was rotated


class ApiKeyCreated(ApiKeyOut):
    """The response to a mint: the only time ``key`` is ever shown."""

    key: str


MAX_OVERLAP_S = 7 * 86400


class ApiKeyRotate(BaseModel):
    """How long the old key keeps working beside its replacement."""

    model_config = ConfigDict(extra="forbid")

    overlap_s: Annotated[int, Field(ge=0, le=MAX_OVERLAP_S)] = 3600


class ApiKeyRotated(ApiKeyCreated):
    """The replacement key (its secret shown once) and when the old one stops."""

    replaces: uuid.UUID
    old_key_expires_at: datetime


class ApiKeyList(BaseModel):
    """A tenant's keys, newest first."""

    data: list[ApiKeyOut]
