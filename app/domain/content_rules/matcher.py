"""Blocklist matching, on whole texts and on a stream as it flows.

Terms match case-insensitively as whole words; patterns are the tenant's own regular
expressions, run by RE2 (``google-re2``): time linear in the text whatever the pattern,
so no rule can freeze the process. RE2 has no backreferences or lookarounds; a pattern
using them is refused when saved (:func:`compile_pattern`). Every search of one request
draws on one :class:`MatchBudget`: once it is spent, the next check counts as a hit, so
a request whose rules cannot be checked in time fails closed.

On a stream, text is released only once no rule can still match it. RE2 has no partial
matching, so: terms hold back the end of the text that is the start of a term (exact);
a pattern holds back as many characters as its longest match, a pattern whose matches
have no bound (``a.*b``) :data:`STREAM_WINDOW_CHARS`, and such a pattern is found on a
stream only within that many characters.
"""

from __future__ import annotations

import bisect
import importlib
import logging
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import re2

log = logging.getLogger(__name__)
STREAM_WINDOW_CHARS = 256  # the longest match a stream checks (patterns without a bound)
PATTERN_MAX_MEM = 1 << 21  # RE2's memory per pattern (program and DFA cache)
# A search costs up to this many steps per byte when RE2's DFA gives up (state blow-up):
# larger programs ("(.{0,40}a){10}", 3,600) took 25 ms on a 500-byte stream window.
MAX_PROGRAM_SIZE = 2500
SLOW_SEARCH_S = 0.0005  # a rule whose searches take longer is matched off the event loop
SLOW_SEARCHES = 3  # ... once this many did (the first builds RE2's automaton: slower)
TERMS_MAX_MEM = 64 << 20  # a term list is large but literal: its DFA stays small
LOOK_AHEAD = ("\\b", "\\B", "$", "\\z")  # assertions about the character after a match
WORD = r"\pL\pM\pN\p{Pc}"  # a word character, as Unicode (and the old engine's \w) has it
_sre_parse: Any = importlib.import_module("re._parser")  # only for a pattern's match width


class Match(Protocol):
    """What we read of an RE2 match (over UTF-8 bytes)."""

    def start(self, group: int = 0) -> int: ...
    def group(self, group: int = 0) -> bytes: ...


class Regexp(Protocol):
    """A compiled RE2 expression."""

    def search(self, text: bytes, pos: int | None = None,
               endpos: int | None = None) -> Match | None: ...


class PatternRefused(ValueError):
    """RE2 cannot run this pattern; ``reason`` says why (RE2's own words)."""

    def __init__(self, pattern: str, reason: str) -> None:
        super().__init__(f"{pattern!r} cannot be used: {reason}")
        self.pattern, self.reason = pattern, reason


def _options(max_mem: int) -> Any:
    options = re2.Options()
    options.max_mem = max_mem
    options.log_errors = False  # a refused pattern is the tenant's error, not ours
    return options


def compile_pattern(pattern: str) -> Regexp:
    """The pattern compiled by RE2, or :class:`PatternRefused` saying why not
    (backreferences, lookarounds, ``\\Z``, too large a program)."""
    try:
        compiled: Regexp = re2.compile(pattern, _options(PATTERN_MAX_MEM))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "not a valid RE2 expression"
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise PatternRefused(pattern, str(reason)) from None
    size = int(getattr(compiled, "programsize", 0))
    if size > MAX_PROGRAM_SIZE:
        raise PatternRefused(pattern, f"too complex: an RE2 program of {size} instructions, "
                             f"at most {MAX_PROGRAM_SIZE} (use smaller counted repeats)")
    return compiled


def match_width(pattern: str) -> int:
    """The most characters a match of ``pattern`` can span, capped at
    :data:`STREAM_WINDOW_CHARS` (also when it cannot be worked out)."""
    if "{," in pattern:  # RE2 reads "{,n}" as literal text, Python as a repeat
        return STREAM_WINDOW_CHARS
    try:
        longest = int(_sre_parse.parse(pattern).getwidth()[1])
    except Exception:  # RE2-only syntax (\pL, \z, \Q...\E): assume the worst
        return STREAM_WINDOW_CHARS
    return max(1, min(longest, STREAM_WINDOW_CHARS))


@dataclass
class MatchBudget:
    """The time one request's matching may take, all searches together."""

    seconds: float
    spent: float = 0.0

    @property
    def exhausted(self) -> bool:
        """Whether the next search must be refused."""
        return self.spent >= self.seconds


def _char_offset(data: bytes, offset: int) -> int:
    return len(data[:offset].decode("utf-8", errors="ignore"))


@dataclass
class RuleCost:
    """What searches with one rule have cost; shared by every request of the rule set
    (compiled once per process), so a slow rule is known from its first slow search."""

    slow_searches: int = 0

    @property
    def slow(self) -> bool:
        """Slow again and again (not once, building its automaton)."""
        return self.slow_searches >= SLOW_SEARCHES

    def note(self, seconds: float, budget: MatchBudget | None) -> None:
        """Count a search against the request's budget; remember a slow one."""
        if budget is not None:
            budget.spent += seconds
        if seconds > SLOW_SEARCH_S:
            self.slow_searches += 1


@dataclass(frozen=True)
class Rule:
    """One compiled rule and how it is shown in the record of hits. All of a tenant's
    terms are one rule (one pass over the text, however many terms); ``terms`` maps a
    matched text back to the term as the tenant wrote it.

    ``whole`` decides a complete text; ``stream`` decides a hit in text that goes on
    (for terms: a term and the character after it); ``starts`` (terms only: sorted,
    casefolded) tells whether the end of the text could begin a term; ``width`` is what
    a pattern holds back at most (for terms: the longest term), from the first place its
    ``lead`` starts (or could start, at the very end)."""

    name: str
    whole: Regexp
    stream: Regexp
    width: int = 1
    lead: bytes = b""  # what every match of a pattern starts with (may be empty)
    looks_ahead: bool = False  # \b, \B, $ or \z: a match may hang on the next character
    starts: tuple[str, ...] = ()
    terms: dict[str, str] = field(default_factory=dict)
    cost: RuleCost = field(default_factory=RuleCost, compare=False, repr=False)

    def hit_name(self, match: Match) -> str:
        """How the record names the hit."""
        if not self.terms:
            return self.name
        found = match.group(1).decode("utf-8", errors="replace")
        return f"term:{self.terms.get(' '.join(found.split()).casefold(), found)}"

    def stream_hit(self, data: bytes) -> Match | None:
        """A hit in ``data`` that no later text can undo."""
        if self.terms or not self.looks_ahead:  # terms: the closing character is matched;
            # other patterns without end assertions: a match stays one whatever follows.
            return self.stream.search(data)
        if not self.looks_ahead:  # a match stays a match whatever follows
            return self.stream.search(data)
        # The last character is left undecided: \\b or $ before it may not hold.
        return self.stream.search(data, 0, _last_char(data))

    def hold_from(self, window: str, data: bytes) -> int:
        """Where in ``window`` the text a later piece could still make a hit begins."""
        if not self.terms:
            return self._lead_from(window, data)
        return self._term_start(window)

    def _term_start(self, window: str) -> int:
        """The first place, at a word's start, from which the rest of ``window`` begins
        a term (a sorted list: the terms beginning with a text follow its place)."""
        for i in range(max(0, len(window) - self.width), len(window)):
            if i > 0 and _is_word(window[i - 1]):
                continue
            rest = window[i:].casefold()
            k = bisect.bisect_left(self.starts, rest)
            if k < len(self.starts) and self.starts[k].startswith(rest):
                return i
        return len(window)

    def _lead_from(self, window: str, data: bytes) -> int:
        earliest = max(0, len(window) - self.width)
        if not self.lead:
            return earliest
        start = len(window[:earliest].encode())
        found = data.find(self.lead, start)
        ends = [k for k in range(max(start, len(data) - len(self.lead) + 1), len(data))
                if self.lead.startswith(data[k:])]  # the lead cut off by the end
        first = min([i for i in (found, *ends) if i >= 0], default=-1)
        return len(window) if first < 0 else _char_offset(data, first)


def _last_char(data: bytes) -> int:
    """The byte offset of the last UTF-8 character of ``data``."""
    i = len(data) - 1
    while i > 0 and data[i] & 0xC0 == 0x80:
        i -= 1
    return max(i, 0)


def _lead(compiled: Regexp) -> bytes:
    """The bytes every match starts with (RE2's bounds on what a match can be)."""
    try:
        low, high = getattr(compiled, "possiblematchrange")(STREAM_WINDOW_CHARS)  # noqa: B009
    except re2.error:
        return b""
    same = next((i for i, (a, b) in enumerate(zip(low, high, strict=False)) if a != b),
                min(len(low), len(high)))
    return bytes(low[:same])


def _is_word(ch: str) -> bool:
    """A word character as :data:`WORD` has it (letters, marks, numbers, connectors)."""
    category = unicodedata.category(ch)
    return category[0] in "LMN" or category == "Pc"


def _terms_rule(kept: dict[str, str]) -> Rule:
    listed = "|".join(re2.escape(t) for t in kept.values())
    edge = f"(?:^|[^{WORD}])"
    options = _options(TERMS_MAX_MEM)

    def build(body: str, after: str) -> Regexp:
        compiled: Regexp = re2.compile(f"(?i){edge}({body}){after}", options)
        return compiled

    return Rule("terms", whole=build(listed, f"(?:[^{WORD}]|$)"),
                stream=build(listed, f"[^{WORD}]"), terms=kept,
                width=max(len(t) for t in kept.values()),
                starts=tuple(sorted(t.casefold() for t in kept.values())))


def compile_rules(terms: Sequence[str], patterns: Sequence[str]) -> list[Rule]:
    """The tenant's rules, compiled. A stored pattern RE2 cannot run (saved before RE2
    was the engine) is left out, with a log line; :func:`unsupported` lists them."""
    kept = {" ".join(t.split()).casefold(): t for t in terms if t.strip()}
    rules = [_terms_rule(kept)] if kept else []
    for p in patterns:
        try:
            compiled = compile_pattern(p)
        except PatternRefused as exc:
            log.warning("content rule pattern %r is not applied: %s", p, exc.reason)
            continue
        rules.append(Rule(f"pattern:{p}", whole=compiled, stream=compiled,
                          width=match_width(p), lead=_lead(compiled),
                          looks_ahead=any(a in p for a in LOOK_AHEAD)))
    return rules


def unsupported(patterns: Sequence[str]) -> list[str]:
    """The patterns RE2 cannot run (and so are not applied)."""
    refused = []
    for p in patterns:
        try:
            compile_pattern(p)
        except PatternRefused:
            refused.append(p)
    return refused


def _spent(rule: Rule) -> str:
    log.warning("content rules: time budget spent before %s; the text counts as a hit",
                rule.name)
    return f"{rule.name} (time budget spent)"


def scan(rules: Sequence[Rule], data: bytes, budget: MatchBudget | None = None,
         until: float = float("inf")) -> tuple[int, str | None]:
    """Check ``data`` (UTF-8) against the rules in order: the first hit's name (a spent
    budget is a hit), else None; and how many rules were checked, fewer than all when
    ``time.perf_counter()`` passed ``until`` (the caller goes on with the others)."""
    for i, rule in enumerate(rules):
        if budget is not None and budget.exhausted:
            return i, _spent(rule)
        started = time.perf_counter()
        match = rule.whole.search(data)
        finished = time.perf_counter()
        rule.cost.note(finished - started, budget)
        if match is not None:
            return i + 1, rule.hit_name(match)
        if finished > until:
            return i + 1, None
    return len(rules), None


def first_hit(rules: Sequence[Rule], text: str, budget: MatchBudget | None = None) -> str | None:
    """The name of the first rule ``text`` breaks, if any (a spent budget is a hit)."""
    return scan(rules, text.encode(), budget)[1]


@dataclass
class StreamGuard:
    """Feeds an answer piece by piece; releases only text that no rule can still turn
    into a hit."""

    rules: Sequence[Rule]
    budget: MatchBudget | None = None
    _context: str = ""  # the end of what was released (word edges, long matches)
    _held: str = ""  # arrived, not yet released
    hit: str | None = field(default=None, init=False)

    def feed(self, piece: str) -> str:
        """The text that may go to the user now ("" when a rule is hit: see ``hit``)."""
        if self.hit is not None:
            return ""
        self._held += piece
        window = self._context + self._held
        data = window.encode()
        keep_from = len(window)
        for rule in self.rules:
            if self.budget is not None and self.budget.exhausted:
                self.hit = _spent(rule)
                return ""
            started = time.perf_counter()
            m = rule.stream_hit(data)
            hold = rule.hold_from(window, data)
            rule.cost.note(time.perf_counter() - started, self.budget)
            if m is not None:
                self.hit = rule.hit_name(m)
                return ""
            keep_from = min(keep_from, hold)
        cut = max(0, keep_from - len(self._context))
        released, self._held = self._held[:cut], self._held[cut:]
        # Enough released text for the longest match and a word edge before it.
        keep = max((r.width for r in self.rules), default=0) + 1
        self._context = (self._context + released)[-keep:]
        return released

    def flush(self) -> str:
        """At the end of the answer: what was held back, unless it completes a hit."""
        if self.hit is not None:
            return ""
        held, self._held = self._held, ""
        self.hit = first_hit(self.rules, self._context + held, self.budget)
        return "" if self.hit is not None else held
