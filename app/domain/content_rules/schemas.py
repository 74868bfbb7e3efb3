"""Request and response bodies for content rules and their hits."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import regex
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
)

from app.domain.content_rules.matcher import PatternRefused, compile_pattern
from app.text_fields import FREE_TEXT, SINGLE_LINE

Term = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                 SINGLE_LINE]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=500), FREE_TEXT]


class ContentRules(BaseModel):
    """What neither the user's message nor the model's answer may contain, and a
    disclaimer added to every answer."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)

    blocked_terms: Annotated[list[Term], Field(max_length=500)] = []
    blocked_patterns: Annotated[list[Pattern], Field(max_length=50)] = []
    disclaimer: Annotated[str, Field(max_length=2000), FREE_TEXT] | None = None

    @field_validator("blocked_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        """Text that is no regular expression at all is refused here (400); one that is,
        but that RE2 cannot run, is refused by the service (422, saying why)."""
        for p in patterns:
            try:
                compile_pattern(p)
            except PatternRefused:
                try:
                    regex.compile(p)
                except regex.error as exc:
                    raise ValueError(f"{p!r} is not a valid regular expression: {exc}") \
                        from exc
        return patterns


class ContentRulesOut(ContentRules):
    """The rules as stored; ``unsupported_patterns`` (shown only when there are any)
    lists stored patterns RE2 cannot run, which are not applied: saved before RE2 was
    the engine, they must be rewritten."""

    unsupported_patterns: list[str] = []

    @model_serializer(mode="wrap")
    def _omit_none_unsupported(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if not out.get("unsupported_patterns"):
            out.pop("unsupported_patterns", None)
        return out


class ContentRuleHitOut(BaseModel):
    """A request or answer the rules stopped: which rule, never the text."""

    model_config = ConfigDict(from_attributes=True)

    request_id: str
    end_user: str
    direction: str
    rule: str
    created_at: datetime


class ContentRuleHitPage(BaseModel):
    """Hits, newest first."""

    data: list[ContentRuleHitOut]
    total: int
    limit: int
    offset: int
