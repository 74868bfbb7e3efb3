"""Reading an upload request in any of its three shapes into files + options.

Multipart bodies are read here with the parser Litestar itself uses (``multipart``), not
through ``request.form()``: Litestar decodes text fields with whatever codec their part
names and fails with a 500 on bytes that are not text in it or a charset no codec has
(or spins on punycode); here text fields are read in a known charset, and anything else
is a 400 that names the field."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from litestar.exceptions import ClientException
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser
from pydantic import TypeAdapter, ValidationError

from app.domain.knowledge.document_service import IncomingFile
from app.domain.knowledge.schemas import ExternalId, Filename, Metadata, TextUpload
from app.errors import BadRequestError, InvalidInputError, PayloadTooLargeError
from app.http.bodies import decode_json

# The charsets a text field may name (Python's codec names): the Unicode ones and the
# common legacy ones, all decoded in linear time to valid text. Others are refused:
# some are not text (zlib_codec), some decode to lone surrogates (unicode_escape, utf-7)
# and punycode takes quadratic time (160 kB: 18 s of the event loop).
TEXT_CHARSETS = frozenset({
    "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
    "utf-32-be", "ascii", *(f"iso8859-{n}" for n in range(1, 17)),
    *(f"cp{n}" for n in range(1250, 1259)), "koi8-r", "koi8-u", "mac-roman", "shift_jis",
    "cp932", "euc_jp", "iso2022_jp", "gb2312", "gbk", "gb18030", "big5", "euc_kr",
})
_metadata = TypeAdapter(Metadata)
_external_id = TypeAdapter(ExternalId | None)
_filename = TypeAdapter(Filename)


@dataclass(frozen=True)
class Upload:
    """What a client sent: the files and the options that apply to them."""

    files: list[IncomingFile]
    external_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


async def read_upload(request: Request[Any, Any, Any]) -> Upload:
    """multipart/form-data, application/json (TextUpload) or a raw text/* body."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _multipart(request)
    if media == "application/json":
        return _json_text(await request.body())
    if media.startswith("text/"):
        name = _check(_filename, request.query_params.get("filename", "upload.txt"), "filename")
        ext = _check(_external_id, request.query_params.get("external_id"), "external_id")
        return Upload([IncomingFile(name, await request.body(), media)], ext)
    raise InvalidInputError(
        f"unsupported request content type {media or '(none)'!r}: use multipart/form-data, "
        "application/json or text/plain"
    )


async def _multipart(request: Request[Any, Any, Any]) -> Upload:
    files: list[IncomingFile] = []
    fields: dict[str, str] = {}
    for segment, data in await _segments(request):
        if segment.name in ("file", "files"):
            if segment.filename is None:
                raise InvalidInputError("'file' parts must be files, not text fields")
            name = _check(_filename, segment.filename or "upload", "filename")
            files.append(IncomingFile(name, data, segment.content_type or None))
        elif segment.filename is None and segment.name:
            fields.setdefault(segment.name, _text(segment, data))
    raw_meta = fields.get("metadata")
    metadata = _parse_metadata(raw_meta) if raw_meta else {}
    external_id = _check(_external_id, fields.get("external_id") or None, "external_id")
    return Upload(files, external_id, metadata)


async def _segments(request: Request[Any, Any, Any]) -> list[tuple[MultipartSegment, bytes]]:
    """Each part of a multipart body with its bytes, read within the body size limit
    (``request.stream``) and the app's part limit."""
    boundary = request.content_type[1].get("boundary")
    if not boundary:
        raise BadRequestError("multipart boundary missing in Content-Type")
    parts: list[tuple[MultipartSegment, bytes]] = []
    segment, data = None, bytearray()
    try:
        with PushMultipartParser(boundary.encode(),
                                 max_segment_count=request.app.multipart_form_part_limit
                                 ) as parser:
            async for chunk in _with_end(request.stream()):
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment, data = event, bytearray()
                    elif event:
                        data += event
                    elif segment is not None:  # the end of a part
                        parts.append((segment, bytes(data)))
    except ParserLimitReached as exc:
        raise PayloadTooLargeError(f"the multipart body has too many parts: {exc}") from exc
    except ParserError as exc:
        raise BadRequestError(f"invalid multipart/form-data: {exc}") from exc
    return parts


async def _with_end(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks, then the empty one that tells the parser the body has ended."""
    async for chunk in stream:
        if chunk:
            yield chunk
    yield b""


def _text(segment: MultipartSegment, data: bytes) -> str:
    """A text field's value in its charset (UTF-8 unless the part says otherwise); a 400
    naming the field when the charset is not one we read or the bytes are not text in it."""
    charset = segment.charset or "utf-8"
    try:
        known = codecs.lookup(charset).name in TEXT_CHARSETS
    except LookupError:
        known = False
    if not known:
        raise _not_text(segment.name, f"its charset {charset!r} is not one this API reads "
                        "(UTF-8, UTF-16, UTF-32, ISO-8859-n, Windows-125n, the common CJK ones)")
    try:
        return data.decode(charset)
    except UnicodeDecodeError as exc:
        raise _not_text(segment.name, f"byte {exc.start} is not valid {charset}") from exc


def _not_text(field: str, why: str) -> BadRequestError:
    return BadRequestError(f"multipart field {field!r} is not text: {why}",
                           errors=[{"key": field, "message": why, "source": "body"}])


def _json_text(body: bytes) -> Upload:
    try:
        doc = TextUpload.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid JSON upload: {_first_error(exc)}") from exc
    data = doc.text.encode()
    return Upload([IncomingFile(doc.filename, data, "text/plain")], doc.external_id,
                  dict(doc.metadata))


def _parse_metadata(raw: str) -> dict[str, Any]:
    try:  # the decoder of JSON bodies: deep nesting and lone surrogates are refused too
        value = decode_json(raw, "'metadata'")
    except ClientException as exc:
        raise InvalidInputError(str(exc.detail)) from exc
    return dict(_check(_metadata, value, "metadata"))


def _check(adapter: TypeAdapter[Any], value: Any, name: str) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {name}: {_first_error(exc)}") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])
