"""Blocklist matching, on whole texts and on a stream as it flows.

Terms match case-insensitively on word boundaries; patterns are the tenant's own
regular expressions (the ``regex`` module, with a time limit per search: a pattern that
takes too long counts as a hit, so a slow rule fails closed). On a stream, text is
released only once no rule can still match it: a rule that partially matches the end of
what arrived so far holds that end back until the next piece decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import regex

SEARCH_TIMEOUT_S = 0.05
CONTEXT_CHARS = 64  # released text kept as context (word boundaries, lookbehinds)


@dataclass(frozen=True)
class Rule:
    """One compiled rule and how it is shown in the record of hits. All of a tenant's
    terms are one rule (a named list: one pass over the text, however many terms);
    ``terms`` maps a matched text back to the term as the tenant wrote it."""

    name: str
    pattern: regex.Pattern[str]
    terms: dict[str, str] = field(default_factory=dict)

    def hit_name(self, match: regex.Match[str]) -> str:
        """How the record names the hit."""
        if not self.terms:
            return self.name
        found = " ".join(match.group(0).split()).casefold()
        return f"term:{self.terms.get(found, match.group(0))}"


def compile_rules(terms: Sequence[str], patterns: Sequence[str]) -> list[Rule]:
    """The tenant's rules, compiled; a bad pattern raises ``regex.error``."""
    kept = {" ".join(t.split()).casefold(): t for t in terms if t.strip()}
    rules = []
    if kept:
        rules.append(Rule("terms", regex.compile(r"(?i)(?<!\w)\L<terms>(?!\w)",
                                                 terms=list(kept.values())), kept))
    rules += [Rule(f"pattern:{p}", regex.compile(p)) for p in patterns]
    return rules


def first_hit(rules: Sequence[Rule], text: str) -> str | None:
    """The name of the first rule ``text`` breaks, if any."""
    for rule in rules:
        try:
            match = rule.pattern.search(text, timeout=SEARCH_TIMEOUT_S)
        except TimeoutError:
            return f"{rule.name} (timed out)"
        if match is not None:
            return rule.hit_name(match)
    return None


@dataclass
class StreamGuard:
    """Feeds an answer piece by piece; releases only text that no rule can still turn
    into a hit."""

    rules: Sequence[Rule]
    _context: str = ""  # the end of what was released
    _held: str = ""  # arrived, not yet released
    hit: str | None = field(default=None, init=False)

    def feed(self, piece: str) -> str:
        """The text that may go to the user now ("" when a rule is hit: see ``hit``)."""
        if self.hit is not None:
            return ""
        self._held += piece
        window = self._context + self._held
        keep_from = len(window)
        for rule in self.rules:
            try:
                m = rule.pattern.search(window, partial=True, timeout=SEARCH_TIMEOUT_S)
            except TimeoutError:
                self.hit = f"{rule.name} (timed out)"
                return ""
            if m is None:
                continue
            if not m.partial:
                self.hit = rule.hit_name(m)
                return ""
            keep_from = min(keep_from, m.start())
        cut = max(0, keep_from - len(self._context))
        released, self._held = self._held[:cut], self._held[cut:]
        self._context = (self._context + released)[-CONTEXT_CHARS:]
        return released

    def flush(self) -> str:
        """At the end of the answer: what was held back, unless it completes a hit."""
        if self.hit is not None:
            return ""
        held, self._held = self._held, ""
        self.hit = first_hit(self.rules, self._context + held)
        return "" if self.hit is not None else held
