"""The knowledge area's providers: knowledge bases and documents, built per request from
the app's state."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.knowledge.document_service import DocumentService
from app.domain.knowledge.indexed import IndexedService
from app.domain.knowledge.kb_service import KnowledgeBaseService


def provide_kbs(state: State) -> KnowledgeBaseService:
    """The knowledge-base service."""
    return KnowledgeBaseService(state.db)


def provide_documents(state: State) -> DocumentService:
    """The document service."""
    return DocumentService(state.db, state.settings.ingest)


def provide_indexed(state: State) -> IndexedService:
    """What was indexed for a document: its extracted text and chunks."""
    return IndexedService(state.db)


DEPENDENCIES = {
    "kbs": Provide(provide_kbs, sync_to_thread=False),
    "documents": Provide(provide_documents, sync_to_thread=False),
    "indexed": Provide(provide_indexed, sync_to_thread=False),
}
