"""Request and response bodies for knowledge bases and documents."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.db.models import DocumentStatus
from app.text_fields import FREE_TEXT, SINGLE_LINE, FreeText, SingleLine

KbName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                   SINGLE_LINE]
ExternalId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256),
                       SINGLE_LINE]
Filename = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=512),
                     SINGLE_LINE]
Description = Annotated[str, Field(max_length=2000), FREE_TEXT]
MetadataValue = FreeText | int | float | bool | None
Metadata = Annotated[dict[SingleLine, MetadataValue], Field(max_length=64)]


class KnowledgeBaseCreate(BaseModel):
    """A new knowledge base."""

    model_config = ConfigDict(extra="forbid")

    name: KbName
    description: Description = ""


class KnowledgeBaseUpdate(BaseModel):
    """Rename or re-describe a knowledge base."""

    model_config = ConfigDict(extra="forbid")

    name: KbName | None = None
    description: Description | None = None


class KnowledgeBaseOut(BaseModel):
    """A knowledge base with its document counts."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    description: str
    created_at: datetime
    updated_at: datetime
    document_count: int = 0


class KnowledgeBaseList(BaseModel):
    """The tenant's knowledge bases."""

    data: list[KnowledgeBaseOut]


class TextUpload(BaseModel):
    """A document sent as JSON text instead of a file."""

    model_config = ConfigDict(extra="forbid")

    text: Annotated[str, Field(max_length=20_000_000)]
    filename: Filename = "text.txt"
    external_id: ExternalId | None = None
    metadata: Metadata = {}


class DocumentOut(BaseModel):
    """A document and where its processing stands."""

    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: uuid.UUID
    kb_id: uuid.UUID
    external_id: str | None
    filename: str
    format: str
    size_bytes: int
    sha256: str
    metadata: dict[str, Any] = Field(validation_alias="doc_metadata")
    status: DocumentStatus
    error: str | None
    chunk_count: int | None
    chunks_embedded: int
    version: int
    live_version: int | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    processing_started_at: datetime | None
    ready_at: datetime | None


class UploadedDocument(DocumentOut):
    """One file of an upload: ``duplicate`` is true when identical bytes were already
    in the knowledge base (nothing new was stored or queued)."""

    duplicate: bool = False


class UploadResult(BaseModel):
    """Every file of one upload request, in the order sent."""

    data: list[UploadedDocument]


class DocumentPage(BaseModel):
    """One page of a knowledge base's documents."""

    data: list[DocumentOut]
    total: int
    limit: int
    offset: int


class ChunkOut(BaseModel):
    """One chunk as it was embedded: ``text == extracted_text[char_start:char_end]``.
    A chunk never crosses a page or a heading change, so it has one page (PDF only)
    and one heading path (outermost first)."""

    chunk_index: int
    text: str
    char_start: int
    char_end: int
    page: int | None
    heading_path: list[str]
    token_count: int
    # The chunk reads like instructions aimed at an AI (docs/ingestion.md): the whole
    # chunk [char_start, char_end) is the flagged passage; search and chat label it too.
    suspected_instructions: bool
    instruction_reasons: list[str]


class ChunkPage(BaseModel):
    """One page of a document version's chunks, in order; pass ``next_cursor`` back as
    ``cursor`` for the next page (None: this was the last)."""

    document_id: uuid.UUID
    version: int
    chunk_count: int
    limit: int
    next_cursor: str | None
    data: list[ChunkOut]


class DocumentTextOut(BaseModel):
    """A document version's extracted text (or its ``[start, end)`` characters): the
    text that chunk offsets point into. ``length`` is the whole text's, in characters."""

    document_id: uuid.UUID
    version: int
    format: str
    length: int
    start: int
    end: int
    text: str
