"""Thin Dramatiq actors: decode the message, hand the work to the service core.

Transient failures raise, and Dramatiq retries them with exponential backoff; permanent
ones (an unparseable file) are recorded by the pipeline as ``failed`` and not raised.
The pipeline also caps the attempts per document version (``INGEST_MAX_ATTEMPTS``),
counting ones lost to crashes, so a poison file cannot loop forever.
"""

from __future__ import annotations

import logging
import uuid

import dramatiq

from app.outbox import (
    DELETE_DOCUMENT_POINTS,
    DELETE_KB_POINTS,
    DELETE_STALE_VERSIONS,
    INGEST_DOCUMENT,
)
from workers.runtime import current

log = logging.getLogger(__name__)
MAX_RETRIES, MIN_BACKOFF_MS, MAX_BACKOFF_MS = 10, 1_000, 300_000


@dramatiq.actor(actor_name=INGEST_DOCUMENT, queue_name="ingest", max_retries=MAX_RETRIES,
                min_backoff=MIN_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS)
def ingest_document(tenant_id: str, document_id: str, version: int) -> None:
    """Parse, chunk, embed and publish one document version."""
    rt = current()
    tenant, document = uuid.UUID(tenant_id), uuid.UUID(document_id)
    try:
        rt.call(rt.pipeline.run(tenant, document, version))
    except Exception as exc:
        _note(tenant, document, version, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        rt.wake_relay()  # a slot of this tenant's fair share may be free now


def _note(tenant: uuid.UUID, document: uuid.UUID, version: int, reason: str) -> None:
    rt = current()
    try:
        rt.call(rt.pipeline.note_transient_error(tenant, document, version, reason), timeout=10)
    except Exception:  # the database may be what failed; the retry still happens
        log.exception("could not record the failure of document %s", document)


@dramatiq.actor(actor_name=DELETE_DOCUMENT_POINTS, queue_name="maintenance",
                max_retries=MAX_RETRIES,
                min_backoff=MIN_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS)
def delete_document_points(tenant_id: str, document_id: str) -> None:
    """Remove every version's points of a deleted document."""
    rt = current()
    rt.call(rt.pipeline.purge_document(uuid.UUID(tenant_id), uuid.UUID(document_id)))


@dramatiq.actor(actor_name=DELETE_KB_POINTS, queue_name="maintenance", max_retries=MAX_RETRIES,
                min_backoff=MIN_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS)
def delete_kb_points(tenant_id: str, kb_id: str) -> None:
    """Remove every point of a deleted knowledge base."""
    rt = current()
    rt.call(rt.pipeline.purge_kb(uuid.UUID(tenant_id), uuid.UUID(kb_id)))


@dramatiq.actor(actor_name=DELETE_STALE_VERSIONS, queue_name="maintenance",
                max_retries=MAX_RETRIES, min_backoff=MIN_BACKOFF_MS, max_backoff=MAX_BACKOFF_MS)
def delete_stale_versions(tenant_id: str, document_id: str, below: int) -> None:
    """Remove the points of versions older than ``below`` (sent after a grace delay)."""
    rt = current()
    rt.call(rt.pipeline.purge_stale_versions(uuid.UUID(tenant_id), uuid.UUID(document_id),
                                             below))
