"""``/v1/knowledge-bases``: knowledge bases and their documents, for the tenant's keys."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from app.auth.keys import Scope
from app.db.models import DocumentStatus
from app.domain.knowledge.document_service import DocumentService
from app.domain.knowledge.indexed import CURSOR_PATTERN, IndexedService
from app.domain.knowledge.kb_service import KnowledgeBaseService
from app.domain.knowledge.schemas import (
    ChunkPage,
    DocumentOut,
    DocumentPage,
    DocumentTextOut,
    KnowledgeBaseCreate,
    KnowledgeBaseList,
    KnowledgeBaseOut,
    KnowledgeBaseUpdate,
    UploadedDocument,
    UploadResult,
)
from app.domain.knowledge.uploads import read_upload
from app.http.guards import actor_of, requires_scope, tenant_of
from app.http.openapi import problems
from app.http.paging import Offset

AnyRequest = Request[Any, Any, Any]
KB_WRITE = requires_scope(Scope.admin)
KB_READ = requires_scope(Scope.admin, Scope.ingest, Scope.chat)
DOCS = requires_scope(Scope.admin, Scope.ingest)
Version = Annotated[int | None, QueryParameter(
    ge=1, le=2**31 - 1, description="A stored version (default: the live one; only the "
    "live version is kept)")]
Cursor = Annotated[str | None, QueryParameter(
    pattern=CURSOR_PATTERN, max_length=19,
    description="`next_cursor` of the previous page, as returned")]
CharOffset = Annotated[int, QueryParameter(ge=0, le=2**31 - 2,
                                           description="First character (0-based)")]
CharEnd = Annotated[int | None, QueryParameter(
    ge=0, le=2**31 - 2, description="Character after the last (default: the text's end)")]


class KnowledgeBaseController(Controller):
    """Knowledge bases and documents of the calling key's tenant only."""

    path = "/v1/knowledge-bases"
    tags = ["knowledge bases"]  # noqa: RUF012

    @post("/", guards=[KB_WRITE], summary="Create a knowledge base",
          responses=problems(409, 422))
    async def create(
        self, request: AnyRequest, data: JSONBody[KnowledgeBaseCreate],
        kbs: NamedDependency[KnowledgeBaseService],
    ) -> KnowledgeBaseOut:
        return await kbs.create(tenant_of(request), data, actor_of(request))

    @get("/", guards=[KB_READ], summary="List knowledge bases")
    async def list_kbs(
        self, request: AnyRequest, kbs: NamedDependency[KnowledgeBaseService]
    ) -> KnowledgeBaseList:
        return KnowledgeBaseList(data=await kbs.list(tenant_of(request)))

    @get("/{kb_id:uuid}", guards=[KB_READ], summary="Get a knowledge base")
    async def get_kb(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID],
        kbs: NamedDependency[KnowledgeBaseService],
    ) -> KnowledgeBaseOut:
        return await kbs.get(tenant_of(request), kb_id)

    @patch("/{kb_id:uuid}", guards=[KB_WRITE], summary="Rename or re-describe",
           responses=problems(409, 422))
    async def update(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID],
        data: JSONBody[KnowledgeBaseUpdate], kbs: NamedDependency[KnowledgeBaseService],
    ) -> KnowledgeBaseOut:
        return await kbs.update(tenant_of(request), kb_id, data, actor_of(request))

    @delete("/{kb_id:uuid}", guards=[KB_WRITE], summary="Delete with all its documents")
    async def delete_kb(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID],
        kbs: NamedDependency[KnowledgeBaseService],
    ) -> None:
        await kbs.delete(tenant_of(request), kb_id, actor_of(request))

    @post("/{kb_id:uuid}/documents", guards=[DOCS], summary="Upload documents",
          status_code=202, responses={
              200: ResponseSpec(UploadResult, description="Every file was already there"),
              **problems(413, 415, 422, 429)},
          description="multipart/form-data with one or more `file` parts and optional "
          "`metadata` (JSON object) and `external_id`; or application/json "
          '`{"text", "filename", "external_id", "metadata"}`; or a raw text/* body with '
          "`?filename=&external_id=`. 202 when something was queued, 200 when every file "
          "was already there (same bytes).")
    async def upload(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID],
        documents: NamedDependency[DocumentService],
    ) -> Response[UploadResult]:
        upload = await read_upload(request)
        # Format detection and hashing take CPU time on big files: not on the event loop.
        files = await asyncio.to_thread(documents.check_files, upload.files, upload.external_id)
        outcomes = await documents.upload(
            tenant_of(request), kb_id, files, upload.external_id, upload.metadata)
        data = [UploadedDocument(**DocumentOut.model_validate(o.document).model_dump(),
                                 duplicate=o.duplicate) for o in outcomes]
        status = 200 if all(o.duplicate for o in outcomes) else 202
        return Response(UploadResult(data=data), status_code=status)

    @get("/{kb_id:uuid}/documents", guards=[DOCS], summary="List documents")
    async def list_documents(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID],
        documents: NamedDependency[DocumentService],
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 100,
        offset: Offset = 0,
        status: FromQuery[DocumentStatus | None] = None,
    ) -> DocumentPage:
        rows, total = await documents.list(tenant_of(request), kb_id, limit, offset, status)
        return DocumentPage(data=[DocumentOut.model_validate(d) for d in rows],
                            total=total, limit=limit, offset=offset)

    @get("/{kb_id:uuid}/documents/{doc_id:uuid}", guards=[DOCS], summary="Get a document")
    async def get_document(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID], doc_id: FromPath[uuid.UUID],
        documents: NamedDependency[DocumentService],
    ) -> DocumentOut:
        return DocumentOut.model_validate(await documents.get(tenant_of(request), kb_id, doc_id))

    @delete("/{kb_id:uuid}/documents/{doc_id:uuid}", guards=[DOCS], summary="Delete a document")
    async def delete_document(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID], doc_id: FromPath[uuid.UUID],
        documents: NamedDependency[DocumentService],
    ) -> None:
        await documents.delete(tenant_of(request), kb_id, doc_id, actor_of(request))

    @get("/{kb_id:uuid}/documents/{doc_id:uuid}/chunks", guards=[DOCS],
         summary="List a document's chunks", responses=problems(409),
         description="The chunks of the document's live version (or `version`) in order, "
         "as they were embedded: text, character offsets into the extracted text "
         "(`GET .../text`), page, heading path, token count and whether the chunk reads "
         "like instructions to an AI. Paged: pass `next_cursor` back as `cursor`. 409 "
         "(`document_not_ready`, with `document_status`) while nothing is indexed yet.")
    async def list_chunks(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID], doc_id: FromPath[uuid.UUID],
        indexed: NamedDependency[IndexedService],
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 100,
        cursor: Cursor = None, version: Version = None,
    ) -> ChunkPage:
        return await indexed.chunks(tenant_of(request), kb_id, doc_id, version, cursor, limit)

    @get("/{kb_id:uuid}/documents/{doc_id:uuid}/text", guards=[DOCS],
         summary="Get a document's extracted text", responses=problems(409),
         description="The text extracted from the document's live version (or `version`): "
         "chunk offsets point into it (`text[char_start:char_end]` is the chunk). "
         "`start`/`end` return a slice of it, in characters. 409 "
         "(`document_not_ready`, with `document_status`) while nothing is indexed yet.")
    async def get_text(
        self, request: AnyRequest, kb_id: FromPath[uuid.UUID], doc_id: FromPath[uuid.UUID],
        indexed: NamedDependency[IndexedService], version: Version = None,
        start: CharOffset = 0, end: CharEnd = None,
    ) -> DocumentTextOut:
        return await indexed.text(tenant_of(request), kb_id, doc_id, version, start, end)
