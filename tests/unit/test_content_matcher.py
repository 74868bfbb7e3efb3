"""The blocklist matcher: terms as one pass, hits named as the tenant wrote them, a
stream never releasing a blocked term, citation snippets cleared."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from app.domain.chat.content import AnswerFilter, matching_threads
from app.domain.chat.schemas import Citation
from app.domain.content_rules.matcher import (
    STREAM_WINDOW_CHARS,
    MatchBudget,
    PatternRefused,
    StreamGuard,
    compile_pattern,
    compile_rules,
    first_hit,
    unsupported,
)
from app.settings import ChatSettings


def test_terms_match_whole_words_whatever_the_case_and_are_named_as_written() -> None:
    rules = compile_rules(["Project Falcon", "w2"], [r"\b\d{3}-\d{2}-\d{4}\b"])
    assert len(rules) == 2  # all terms are one rule
    assert first_hit(rules, "about PROJECT falcon?") == "term:Project Falcon"
    assert first_hit(rules, "falconry projects") is None
    assert first_hit(rules, "call 555-12-3456") == r"pattern:\b\d{3}-\d{2}-\d{4}\b"


def test_a_stream_holds_back_what_a_rule_could_still_match() -> None:
    rules = compile_rules(["Project Falcon"], [])
    guard = StreamGuard(rules)
    shown = [guard.feed(p) for p in ["The ", "proj", "ect is ", "fine. ", "Project ", "Fal"]]
    assert shown == ["The ", "", "project is ", "fine. ", "", ""]
    assert guard.feed("con launches") == "" and guard.hit == "term:Project Falcon"
    assert "Falcon" not in "".join(shown)


async def test_a_citation_snippet_that_breaks_a_rule_is_cleared() -> None:
    rules = compile_rules(["Project Falcon"], [])
    flt = AnswerFilter(rules=tuple(rules))
    cited = Citation(index=1, chunk_id=uuid.uuid4(), document_id=uuid.uuid4(), kb_id=uuid.uuid4(),
                     filename="f.md", page=None, char_start=0, char_end=10,
                     heading_path=[], score=1.0, snippet="Project Falcon starts in May.")
    fine = cited.model_copy(update={"snippet": "Visitors sign in."})
    cleared, kept = await flt.citations([cited, fine])
    assert cleared.snippet == "" and cleared.index == 1  # keeps its place, not its text
    assert kept.snippet == "Visitors sign in."


def feed_all(guard: StreamGuard, pieces: list[str]) -> list[str]:
    return [guard.feed(p) for p in pieces]


def test_patterns_run_on_re2_and_what_it_cannot_run_is_refused_or_left_out() -> None:
    for pattern in (r"(a)\1", r"(?<=a)b", r"a(?!b)", r"x\Z", r"(.{0,40}a){10}Z"):
        with pytest.raises(PatternRefused):
            compile_pattern(pattern)
    # A stored pattern from before RE2 is not applied (and listed), the others are.
    rules = compile_rules([], [r"(a)\1", r"\d{4}"])
    assert [r.name for r in rules] == [r"pattern:\d{4}"]
    assert unsupported([r"(a)\1", r"\d{4}"]) == [r"(a)\1"]
    # Nested quantifiers cost RE2 linear time on input built to make backtracking explode.
    hostile = compile_rules([], [r"(a+)+Z", r"(\w+\s?)+Z", r"(a|aa)+Z"])
    started = time.perf_counter()
    assert first_hit(hostile, "a" * 100_000 + "!") is None
    assert time.perf_counter() - started < 0.5


def test_a_stream_holds_back_a_pattern_only_from_where_it_could_start() -> None:
    guard = StreamGuard(compile_rules([], [r"w4\s+w5"]))
    shown = feed_all(guard, ["w0 ", "w1 ", "w2 ", "w3 ", "w4", " "])
    assert "".join(shown) == "w0 w1 w2 w3 "  # "w4 " waits: it may become a hit
    assert guard.feed("w5") == "" and guard.hit == r"pattern:w4\s+w5"
    # A word edge waits for the next piece: "foo" may become "food".
    guard = StreamGuard(compile_rules([], [r"\bfoo\b"]))
    assert feed_all(guard, ["the foo", "d is good"]) == ["the ", "food is good"]
    assert guard.hit is None and guard.flush() == ""
    # Without a fixed start, a bounded pattern holds back as many characters as it spans.
    guard = StreamGuard(compile_rules([], [r"\d{3}-\d{4}"]))
    assert feed_all(guard, ["call 555", "-12 and more text"]) == ["", "call 555-12 and m"]
    assert guard.hit is None and guard.flush() == "ore text"
    guard = StreamGuard(compile_rules([], [r"\d{3}-\d{4}"]))
    assert feed_all(guard, ["call 555", "-1234 now"]) == ["", ""]
    assert guard.hit == r"pattern:\d{3}-\d{4}"
    guard = StreamGuard(compile_rules([], [r"\bfoo\b"]))
    assert feed_all(guard, ["the foo", " is"]) == ["the ", ""]
    assert guard.hit == r"pattern:\bfoo\b"


def test_an_unbounded_pattern_is_checked_within_the_stream_window() -> None:
    guard = StreamGuard(compile_rules([], [r"secret.*code"]))
    shown = feed_all(guard, ["the secret ", "x" * 100, " code"])
    assert guard.hit == "pattern:secret.*code" and "secret" not in "".join(shown)
    guard = StreamGuard(compile_rules([], [r"secret.*code"]))
    shown = feed_all(guard, ["the secret ", "x" * (STREAM_WINDOW_CHARS + 10), " code"])
    assert guard.hit is None and "secret" in "".join(shown)  # beyond the documented window


def test_a_spent_time_budget_fails_closed() -> None:
    rules = compile_rules(["Project Falcon"], [r"\d{4}"])
    spent = MatchBudget(seconds=0.0)
    assert first_hit(rules, "harmless", spent) == "terms (time budget spent)"
    guard = StreamGuard(rules, MatchBudget(seconds=0.0))
    assert guard.feed("harmless") == "" and guard.hit == "terms (time budget spent)"
    budget = MatchBudget(seconds=10.0)
    assert first_hit(rules, "harmless", budget) is None and 0 < budget.spent < 10.0


async def test_long_inputs_and_slow_rules_are_matched_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = matching_threads(ChatSettings())  # as the app's lifespan makes it
    flt = AnswerFilter(rules=tuple(compile_rules(["Project Falcon"], [])), offload_chars=10,
                       pool=pool)
    ran: list[tuple[str, str]] = []  # (function, thread)

    def watched(fn: Any) -> Any:
        def run(*args: Any) -> Any:
            ran.append((fn.__name__, threading.current_thread().name))
            return fn(*args)
        return run

    real = AnswerFilter._in_thread

    async def spy(self: AnswerFilter, fn: Any, *args: Any) -> Any:
        return await real(self, watched(fn), *args)

    monkeypatch.setattr(AnswerFilter, "_in_thread", spy)
    assert await flt.check_input("short") is None and ran == []
    assert await flt.check_input("a long message about project falcon") == \
        "term:Project Falcon"
    # Rules that keep being slow are matched off the loop for every request after.
    for _ in range(3):
        flt.rules[0].cost.note(0.01, None)
    again = AnswerFilter(rules=flt.rules, offload_chars=10, _guard=StreamGuard(flt.rules),
                         pool=pool)
    assert await again.check_input("short") is None
    assert await again.piece("fine ") == "fine "
    assert [name for name, _ in ran] == ["first_hit", "first_hit", "feed"]
    assert all(thread.startswith("content-rules") for _, thread in ran)
    pool.shutdown()
