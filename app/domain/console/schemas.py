"""What the console's session routes read and answer."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class SignIn(BaseModel):
    """A sign-in: the key, exchanged for a session (JSON or a form field ``key``)."""

    key: str = Field(min_length=1, max_length=1024,
                     description="A tenant key with the `admin` scope, or the operator key")


class ConsoleSessionOut(BaseModel):
    """Who is signed in, and the session's CSRF token (send it back in `X-CSRF-Token`
    on every POST, PUT, PATCH and DELETE under /console)."""

    kind: Literal["tenant", "operator"]
    tenant_id: uuid.UUID | None
    tenant_slug: str | None
    key_id: uuid.UUID | None
    scopes: list[str]
    csrf_token: str
    expires_at: datetime = Field(description="When the session ends however it is used")
    idle_timeout_s: int = Field(description="It ends sooner if unused this long")


class SessionsEnded(BaseModel):
    """How many sessions of the key were ended (this one included)."""

    ended: int
