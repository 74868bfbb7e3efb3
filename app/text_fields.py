"""Text that is safe to store: the shared validators for every text field a client sends
that reaches PostgreSQL, the vector store or a log line.

PostgreSQL refuses NUL in ``text`` and ``jsonb``, and a lone surrogate cannot be encoded
as UTF-8 at all: such a value, accepted at the edge, fails the write behind the answer
(the usage writer's batch, a document row) instead of the request that sent it. Two
kinds of field, two rules:

- ``SingleLine`` (names, slugs, end users, filenames, external ids, metadata keys):
  no C0 or C1 control character (tab and newline included), no DEL, no lone surrogate.
- ``FreeText`` (descriptions, system prompts, metadata values): tab, newline and
  carriage return are text; every other C0 control and any lone surrogate is refused.

Put ``SINGLE_LINE`` or ``FREE_TEXT`` last in a field's ``Annotated[str, ...]``, after
its ``StringConstraints`` (pydantic then strips and bounds first, in its fast string
schema); ``SingleLine`` and ``FreeText`` are the unbounded types (dict keys, values).
:func:`check_single_line` is the same rule for values that arrive outside a schema (a
token's claims). A refusal names the character and where
it is, and pydantic names the field.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_SINGLE_LINE_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_FREE_TEXT_REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def _refuse(pattern: re.Pattern[str], value: str, what: str) -> str:
    found = pattern.search(value)
    if found is not None:
        char = found.group()
        kind = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
        raise ValueError(f"{what} must not contain {kind} (U+{ord(char):04X} at "
                         f"position {found.start()})")
    return value


def check_single_line(value: str) -> str:
    """``value`` if it is a single line of printable text, else ValueError saying why."""
    return _refuse(_SINGLE_LINE_REFUSED, value, "a single-line value")


def check_free_text(value: str) -> str:
    """``value`` if it holds no control character other than tab, newline and carriage
    return (and no lone surrogate), else ValueError saying why."""
    return _refuse(_FREE_TEXT_REFUSED, value, "text")


SINGLE_LINE = AfterValidator(check_single_line)
FREE_TEXT = AfterValidator(check_free_text)
SingleLine = Annotated[str, SINGLE_LINE]
FreeText = Annotated[str, FREE_TEXT]


def escape_controls(value: str) -> str:
    """``value`` with every character a single line refuses written as a ``\\uXXXX``
    escape: storable and readable, for keeping a refused value as evidence."""
    return _SINGLE_LINE_REFUSED.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
