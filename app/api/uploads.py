"""Reading an upload request in any of its three shapes into files + options."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from litestar.datastructures import UploadFile
from pydantic import TypeAdapter, ValidationError

from app.domain.knowledge.document_service import IncomingFile
from app.domain.knowledge.schemas import ExternalId, Filename, Metadata, TextUpload
from app.errors import InvalidInputError

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
    form = await request.form()
    parts = [*form.getall("file", []), *form.getall("files", [])]
    files = []
    for part in parts:
        if not isinstance(part, UploadFile):
            raise InvalidInputError("'file' parts must be files, not text fields")
        name = _check(_filename, part.filename or "upload", "filename")
        files.append(IncomingFile(name, await part.read(), part.content_type or None))
    raw_meta = form.get("metadata")
    metadata = _parse_metadata(raw_meta) if isinstance(raw_meta, str) and raw_meta else {}
    ext = form.get("external_id")
    external_id = _check(_external_id, ext if isinstance(ext, str) and ext else None,
                         "external_id")
    return Upload(files, external_id, metadata)


def _json_text(body: bytes) -> Upload:
    try:
        doc = TextUpload.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid JSON upload: {_first_error(exc)}") from exc
    data = doc.text.encode()
    return Upload([IncomingFile(doc.filename, data, "text/plain")], doc.external_id,
                  dict(doc.metadata))


def _parse_metadata(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"'metadata' must be a JSON object: {exc}") from exc
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
