"""The tenant's content rules applied to one chat request: its input checked before any
work, its answer checked as it is generated (whole, or piece by piece as it streams),
and the tenant's disclaimer added at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.db.models import Tenant
from app.domain.chat.schemas import Citation
from app.domain.content_rules.matcher import Rule, StreamGuard, first_hit
from app.domain.content_rules.service import rules_of

CONTENT_FILTER = "content_filter"  # OpenAI's finish reason for a filtered answer
INPUT_REFUSAL = ("I can't help with that: the request breaks this assistant's content "
                 "rules.")
OUTPUT_REFUSAL = "[The rest of this answer was withheld by this assistant's content rules.]"


@dataclass
class AnswerFilter:
    """Rules and disclaimer for one answer; ``hit`` names the rule that stopped it."""

    rules: tuple[Rule, ...] = ()
    disclaimer: str | None = None
    hit: str | None = None
    _guard: StreamGuard | None = field(default=None, repr=False)

    @classmethod
    def of(cls, tenant: Tenant) -> AnswerFilter:
        """The tenant's filter (a no-op when it sets no rules and no disclaimer)."""
        rules = rules_of(tenant)
        return cls(rules=rules, disclaimer=tenant.disclaimer or None,
                   _guard=StreamGuard(rules) if rules else None)

    def check_input(self, text: str) -> str | None:
        """The rule the user's message breaks, if any."""
        self.hit = first_hit(self.rules, text) if self.rules else None
        return self.hit

    def citation(self, cited: Citation) -> Citation:
        """A citation whose snippet breaks a rule keeps its place but not its text."""
        if self.rules and first_hit(self.rules, cited.snippet) is not None:
            return cited.model_copy(update={"snippet": ""})
        return cited

    def whole(self, answer: str) -> tuple[str, bool]:
        """A complete answer as the user gets it, and whether a rule stopped it."""
        if self.rules:
            self.hit = first_hit(self.rules, answer)
            if self.hit is not None:
                return OUTPUT_REFUSAL, True
        return answer + self._disclaimer(), False

    def piece(self, text: str) -> str:
        """Of a streamed piece, what may be shown now ("" once a rule is hit)."""
        if self._guard is None:
            return text
        released = self._guard.feed(text)
        self.hit = self._guard.hit
        return released

    def end(self) -> str:
        """At the end of a stream: what was held back, then the disclaimer."""
        if self._guard is not None:
            held = self._guard.flush()
            self.hit = self._guard.hit
            if self.hit is not None:
                return ""
            return held + self._disclaimer()
        return self._disclaimer()

    def _disclaimer(self) -> str:
        return f"\n\n{self.disclaimer}" if self.disclaimer else ""
