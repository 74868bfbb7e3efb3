"""JSON request bodies, decoded in one place for every route.

Litestar's decoder turns malformed JSON into a 400, but two inputs escape it as 500s:
nesting deeper than the decoder's stack (``[`` x 100,000 raises ``RecursionError``) and
bytes that are not UTF-8 (``UnicodeDecodeError``). :func:`decode_json` refuses all three
as the client's 400, naming what was sent; :class:`ApiRequest` (the app's request class)
and the chat endpoint (app/server/fast_chat.py, which reads its body itself) both use it.
msgspec also refuses lone surrogates (``"\\ud800"``), which no database column stores.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ClientException
from litestar.types import Empty

_decoder = msgspec.json.Decoder()  # as Litestar's, for a body with no target type
# A high surrogate escape not followed by a low one, or a low one on its own: msgspec
# reports these as truncated input, which misleads the client.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def decode_json(data: bytes | str, what: str = "the request body") -> Any:
    """``data`` parsed as JSON; a 400 naming ``what`` when it cannot be."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raw = data.encode(errors="replace") if isinstance(data, str) else data
        if _LONE_SURROGATE.search(raw):
            raise ClientException(f"{what} is not valid JSON: it holds a lone surrogate "
                                  "escape, which is not text") from exc
        raise ClientException(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ClientException(f"{what} is not valid JSON: it is nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise ClientException(f"{what} is not valid JSON: byte {exc.start} is not UTF-8") \
            from exc


class ApiRequest(Request[Any, Any, Any]):
    """Litestar's request, decoding JSON bodies with :func:`decode_json`."""

    async def json(self) -> Any:
        """The body as JSON (decoded once per request, as Litestar does)."""
        if self._json is Empty:
            if (cached := self._connection_state.json) is not Empty:
                self._json = cached
            else:
                self._json = self._connection_state.json = decode_json(
                    await self.body() or b"null")
        return self._json
