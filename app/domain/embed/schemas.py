"""Request and response bodies for embed tokens and allowed origins."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.text_fields import SINGLE_LINE

# scheme://host[:port], as browsers send it in Origin (no path, no trailing slash).
Origin = Annotated[str, StringConstraints(
    pattern=r"^https?://[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$",
    max_length=255)]
EndUser = Annotated[str, StringConstraints(min_length=1, max_length=256), SINGLE_LINE]


class EmbedSettings(BaseModel):
    """The origins (web pages) whose browsers may use the tenant's embed tokens."""

    model_config = ConfigDict(extra="forbid")

    cors_origins: Annotated[list[Origin], Field(max_length=50)]


class EmbedTokenRequest(BaseModel):
    """A token for one end user, scoped to chat on some knowledge bases."""

    model_config = ConfigDict(extra="forbid")

    user: EndUser
    knowledge_base_ids: Annotated[list[uuid.UUID], Field(min_length=1, max_length=100)]
    ttl_s: Annotated[int | None, Field(ge=30)] = None


class EmbedToken(BaseModel):
    """A minted token: give it to the end user's browser."""

    token: str
    token_type: str = "Bearer"  # noqa: S105 (the scheme name, not a secret)
    expires_at: datetime
    user: str
    knowledge_base_ids: list[uuid.UUID]
