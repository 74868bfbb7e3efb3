"""The blocklist matcher: terms as one pass, hits named as the tenant wrote them, a
stream never releasing a blocked term, citation snippets cleared."""

from __future__ import annotations

import uuid

from app.domain.chat.content import AnswerFilter
from app.domain.chat.schemas import Citation
from app.domain.content_rules.matcher import StreamGuard, compile_rules, first_hit


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


def test_a_citation_snippet_that_breaks_a_rule_is_cleared() -> None:
    rules = compile_rules(["Project Falcon"], [])
    flt = AnswerFilter(rules=tuple(rules))
    cited = Citation(index=1, chunk_id=uuid.uuid4(), document_id=uuid.uuid4(), kb_id=uuid.uuid4(),
                     filename="f.md", page=None, char_start=0, char_end=10,
                     heading_path=[], score=1.0, snippet="Project Falcon starts in May.")
    assert flt.citation(cited).snippet == ""
    fine = cited.model_copy(update={"snippet": "Visitors sign in."})
    assert flt.citation(fine).snippet == "Visitors sign in."
