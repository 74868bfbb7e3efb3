"""The tenant's content rules applied to one chat request: its input checked before any
work, its answer checked as it is generated (whole, or piece by piece as it streams),
and the tenant's disclaimer added at the end.
All matching of one request shares one time budget (``CHAT_CONTENT_RULES_BUDGET_MS``):
once spent, the next check counts as a hit (fail closed). A text longer than
``CHAT_CONTENT_RULES_OFFLOAD_CHARS`` (the user's messages, a whole answer) is matched in
a worker thread, where RE2 runs without the GIL: the event loop keeps serving every
other tenant meanwhile. Shorter texts, citation snippets and stream pieces are matched
inline while that is cheap: a check goes on in a thread once it has run for
:data:`INLINE_LIMIT_S`, and a tenant's rules that were once slow (a search over
:data:`~app.domain.content_rules.matcher.SLOW_SEARCH_S`: an automaton RE2 cannot cache)
are matched in a thread from then on, for every request. Those threads are one pool for
the process (:func:`matching_threads`), made and shut down by the app's lifespan and
handed to each request's filter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.db.models import Tenant
from app.domain.chat.schemas import Citation
from app.domain.content_rules.matcher import MatchBudget, Rule, StreamGuard, first_hit, scan
from app.domain.content_rules.service import rules_of
from app.settings import ChatSettings

T = TypeVar("T")
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
    pool: Executor | None = None  # the matching threads; None: the loop's default executor
    _guard: StreamGuard | None = field(default=None, repr=False)
    _offload: bool = field(default=False, repr=False)  # a check of this request ran long

    @classmethod
    def of(cls, tenant: Tenant, chat: ChatSettings | None = None,
           pool: Executor | None = None) -> AnswerFilter:
        """The tenant's filter (a no-op when it sets no rules and no disclaimer), its
        long checks run on ``pool``."""
        chat = chat or ChatSettings()
        rules = rules_of(tenant)
        budget = MatchBudget(chat.content_rules_budget_ms / 1000)
        return cls(rules=rules, disclaimer=tenant.disclaimer or None, budget=budget,
                   offload_chars=chat.content_rules_offload_chars,
                   pool=pool,
                   _guard=StreamGuard(rules, budget) if rules else None)

    async def check_input(self, text: str) -> str | None:
        """The rule the user's message breaks, if any."""
        self.hit = await self._first_hit(text) if self.rules else None
        return self.hit

    async def citations(self, cited: list[Citation]) -> list[Citation]:
        """Citations whose snippets break a rule keep their place but not their text
        (matched inline while cheap, like the input)."""
        if not self.rules:
            return cited
        return [_cleared(c) if await self._first_hit(c.snippet) else c for c in cited]

    async def whole(self, answer: str) -> tuple[str, bool]:
        """A complete answer as the user gets it, and whether a rule stopped it."""
        if self.rules:
            self.hit = await self._first_hit(answer)
            if self.hit is not None:
                return OUTPUT_REFUSAL, True
        return answer + self._disclaimer(), False

    async def _first_hit(self, text: str) -> str | None:
        """Inline while cheap (no thread hop); the rest, or a long text, off the loop."""
        if self._off_loop() or len(text) > self.offload_chars:
            return await self._in_thread(first_hit, self.rules, text, self.budget)
        data = text.encode()
        done, hit = scan(self.rules, data, self.budget, time.perf_counter() + INLINE_LIMIT_S)
        if hit is not None or done == len(self.rules):
            return hit
        self._offload = True
        rest = self.rules[done:]
        return (await self._in_thread(scan, rest, data, self.budget))[1]

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
        if self._off_loop():
            return await self._in_thread(check, *args)
        started = time.perf_counter()
        result = check(*args)
        self._offload = time.perf_counter() - started > INLINE_LIMIT_S
        return result

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, fn, *args)

    def _off_loop(self) -> bool:
        """Whether this request's checks go to a thread: one of them ran long, or one
        of the tenant's rules was ever slow in this process."""
        return self._offload or any(r.cost.slow for r in self.rules)

    def _disclaimer(self) -> str:
        return f"\n\n{self.disclaimer}" if self.disclaimer else ""


def matching_threads(chat: ChatSettings) -> ThreadPoolExecutor:
    """The process's threads for content matching (made once, by the app's lifespan,
    which shuts them down): apart from the default executor, which embeds retrieval
    queries for every tenant, so slow rules queue behind slow rules only, on at most
    ``CHAT_CONTENT_RULES_THREADS`` cores."""
    return ThreadPoolExecutor(max_workers=chat.content_rules_threads,
                              thread_name_prefix="content-rules")


def _cleared(cited: Citation) -> Citation:
    return cited.model_copy(update={"snippet": ""})
