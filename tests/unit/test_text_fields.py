"""The two text rules every stored field uses: single-line values refuse every control
character (C0, DEL, C1) and lone surrogates; free text keeps tab, newline and carriage
return; refused values can still be kept escaped."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import StringConstraints, TypeAdapter, ValidationError

from app.text_fields import SINGLE_LINE, FreeText, SingleLine, escape_controls

BOUNDED = TypeAdapter(Annotated[str, StringConstraints(strip_whitespace=True, max_length=5),
                                SINGLE_LINE])


@pytest.mark.parametrize("value", ["\x00", "a\tb", "a\nb", "a\rb", "\x1b[0m", "\x7f", "\x85",
                                   "\x9f", "\ud800", "x\udfff"])
def test_a_single_line_refuses_control_characters_and_lone_surrogates(value: str) -> None:
    with pytest.raises(ValidationError, match="must not contain"):
        TypeAdapter(SingleLine).validate_python(value)


@pytest.mark.parametrize("value", ["ann", "Zoë Ødegård", "名前", "=HYPERLINK(1)", "a b", "😀"])
def test_a_single_line_keeps_printable_text(value: str) -> None:
    assert TypeAdapter(SingleLine).validate_python(value) == value


def test_free_text_keeps_tab_newline_and_return_and_refuses_the_rest() -> None:
    free = TypeAdapter(FreeText)
    assert free.validate_python("one\ttwo\r\nthree\x85") == "one\ttwo\r\nthree\x85"
    for value in ("a\x00", "\x08", "\x0b", "\x1f", "\ud800"):
        with pytest.raises(ValidationError, match="must not contain"):
            free.validate_python(value)


def test_bounds_apply_before_the_rule_and_the_error_says_where() -> None:
    assert BOUNDED.validate_python("  ab  ") == "ab"
    with pytest.raises(ValidationError, match=r"U\+0000 at position 1"):
        BOUNDED.validate_python("a\x00")


def test_escaped_values_are_single_lines() -> None:
    escaped = escape_controls("bob\x00\t\ud800é")
    assert escaped == "bob\\u0000\\u0009\\ud800é"
    assert TypeAdapter(SingleLine).validate_python(escaped) == escaped
