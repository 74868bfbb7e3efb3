"""The tenant's content rules applied to one chat request: its input checked before any
work, its answer checked as it is generated (whole, or piece by piece as it streams),
and the tenant's disclaimer added at the end.

All matching of one request shares one time budget (``CHAT_CONTENT_RULES_BUDGET_MS``):
once spent, the next check counts as a hit (fail closed). A text longer than
``CHAT_CONTENT_RULES_OFFLOAD_CHARS`` (the user's messages, a whole answer) is matched in
a worker thread, where RE2 runs without the GIL: the event loop keeps serving every
other tenant meanwhile. Stream pieces are short and matched inline, until one check of
the request takes longer than :data:`INLINE_LIMIT_S` (rules whose automaton RE2 cannot
cache): from then on that request's pieces are matched in a thread too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.db.models import Tenant
from app.domain.chat.schemas import Citation
from app.domain.content_rules.matcher import MatchBudget, Rule, StreamGuard, first_hit
from app.domain.content_rules.service import rules_of
from app.settings import ChatSettings

CONTENT_FILTER = "content_filter"  # OpenAI's finish reason for a filtered answer
INPUT_REFUSAL = ("I can't help with that: the request breaks this assistant's content "
                 "rules.")
INLINE_LIMIT_S = 0.001  # an inline check slower than this sends the rest off the loop
OUTPUT_REFUSAL = "[The rest of this answer was withheld by this assistant's content rules.]"


@dataclass
class AnswerFilter:
    """Rules and disclaimer for one answer; ``hit`` names the rule that stopped it."""

    rules: tuple[Rule, ...] = ()
    disclaimer: str | None = None
    hit: str | None = None
    budget: MatchBudget = field(default_factory=lambda: MatchBudget(
        ChatSettings.model_fields["content_rules_budget_ms"].default / 1000))
    offload_chars: int = ChatSettings.model_fields["content_rules_offload_chars"].default
    _guard: StreamGuard | None = field(default=None, repr=False)
    _offload: bool = field(default=False, repr=False)  # an inline check was slow

    @classmethod
    def of(cls, tenant: Tenant, chat: ChatSettings | None = None) -> AnswerFilter:
        """The tenant's filter (a no-op when it sets no rules and no disclaimer)."""
        chat = chat or ChatSettings()
        rules = rules_of(tenant)
        budget = MatchBudget(chat.content_rules_budget_ms / 1000)
        return cls(rules=rules, disclaimer=tenant.disclaimer or None, budget=budget,
                   offload_chars=chat.content_rules_offload_chars,
                   _guard=StreamGuard(rules, budget) if rules else None)

    async def check_input(self, text: str) -> str | None:
        """The rule the user's message breaks, if any."""
        self.hit = await self._first_hit(text) if self.rules else None
        return self.hit

    def citation(self, cited: Citation) -> Citation:
        """A citation whose snippet breaks a rule keeps its place but not its text."""
        if self.rules and first_hit(self.rules, cited.snippet, self.budget) is not None:
            return cited.model_copy(update={"snippet": ""})
        return cited

    async def whole(self, answer: str) -> tuple[str, bool]:
        """A complete answer as the user gets it, and whether a rule stopped it."""
        if self.rules:
            self.hit = await self._first_hit(answer)
            if self.hit is not None:
                return OUTPUT_REFUSAL, True
        return answer + self._disclaimer(), False

    async def _first_hit(self, text: str) -> str | None:
        """Short texts inline (cheaper than a thread hop); long ones off the loop."""
        if len(text) <= self.offload_chars and not self._offload:
            started = time.perf_counter()
            hit = first_hit(self.rules, text, self.budget)
            self._offload = time.perf_counter() - started > INLINE_LIMIT_S
            return hit
        return await asyncio.to_thread(first_hit, self.rules, text, self.budget)

    async def piece(self, text: str) -> str:
        """Of a streamed piece, what may be shown now ("" once a rule is hit)."""
        if self._guard is None:
            return text
        released = await self._off_loop_if_slow(self._guard.feed, text)
        self.hit = self._guard.hit
        return released

    async def end(self) -> str:
        """At the end of a stream: what was held back, then the disclaimer."""
        if self._guard is not None:
            held = await self._off_loop_if_slow(self._guard.flush)
            self.hit = self._guard.hit
            if self.hit is not None:
                return ""
            return held + self._disclaimer()
        return self._disclaimer()

    async def _off_loop_if_slow(self, check: Callable[..., str], *args: str) -> str:
        if self._offload:
            return await asyncio.to_thread(check, *args)
        started = time.perf_counter()
        result = check(*args)
        self._offload = time.perf_counter() - started > INLINE_LIMIT_S
        return result

    def _disclaimer(self) -> str:
        return f"\n\n{self.disclaimer}" if self.disclaimer else ""
