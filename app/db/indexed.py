"""Tables of what was indexed for a document's live version: the extracted text that
chunk offsets point into, and each chunk with its offsets, page, heading path, token
count and instruction-like flags. Written by the ingestion pipeline when a version is
published (in the same transaction that makes it live) and read by the document detail
routes; tenant-owned, so row-level security applies (migration 0012)."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel


def _document_fk(primary_key: bool = True) -> sa.Column[uuid.UUID]:
    return sa.Column(pg.UUID(as_uuid=True), sa.ForeignKey("documents.id", ondelete="CASCADE"),
                     primary_key=primary_key)


def _tenant_fk() -> sa.Column[uuid.UUID]:
    return sa.Column(pg.UUID(as_uuid=True), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                     nullable=False)


class DocumentText(SQLModel, table=True):
    """The extracted text of one document version: ``chunk.text == text[start:end]``."""

    __tablename__ = "document_texts"

    document_id: uuid.UUID = Field(sa_column=_document_fk())
    version: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    text: str = Field(sa_column=sa.Column(sa.Text, nullable=False))


class DocumentChunk(SQLModel, table=True):
    """One chunk of one document version, as embedded and stored in the vector store."""

    __tablename__ = "document_chunks"

    document_id: uuid.UUID = Field(sa_column=_document_fk())
    version: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    chunk_index: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    tenant_id: uuid.UUID = Field(sa_column=_tenant_fk())
    text: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    char_start: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    char_end: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    page: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    heading_path: list[str] = Field(
        default_factory=list, sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False))
    token_count: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    instruction_reasons: list[str] = Field(
        default_factory=list, sa_column=sa.Column(pg.ARRAY(sa.Text), nullable=False))
