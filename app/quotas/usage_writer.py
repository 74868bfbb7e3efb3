"""Usage events written in batches, behind the answers.

Each batch waits ``linger_s`` (unless a full batch is already waiting), then takes
what queued: one transaction, one multi-row ``INSERT ... ON CONFLICT
DO NOTHING`` per tenant, each under that tenant's row-level-security scope. A busy
process writes hundreds per transaction on one connection. A PostgreSQL outage is waited out (the
batch is retried with backoff for ``retry_for_s``) rather than losing the events.

One bad event never costs the others: when PostgreSQL refuses a batch for any other
reason (a value it cannot store, a tenant gone), the batch is halved and each half
written on its own, down to the single events it refuses; those go to the usage
quarantine (app/quotas/quarantine.py) with the reason, a log line and a metric. A
batch of 500 with one bad event takes about 18 more transactions, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert
from sqlmodel.ext.asyncio.session import AsyncSession
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from app.db.engine import Database
from app.db.models import UsageEvent, utcnow
from app.quotas.quarantine import quarantine

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class UsageRow:
    """A usage event as a plain row: the chat path's (one per request). Building the
    ORM object cost about 0.3 ms (SQLModel validation and SQLAlchemy instance state)
    for a row that is only ever inserted. Its fields are `UsageEvent`'s columns (a test
    keeps them in step)."""

    tenant_id: uuid.UUID
    request_id: str
    kind: str
    model: str
    status: str
    end_user: str = ""
    pool: str | None = None
    replica: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    cost_usd: Decimal = Decimal(0)
    gpu_seconds: float | None = None
    created_at: datetime = field(default_factory=utcnow)


ROW_FIELDS = tuple(f.name for f in fields(UsageRow))
Metered = UsageEvent | UsageRow
Pending = tuple[Metered, "asyncio.Future[bool]"]


def row_values(event: Metered) -> dict[str, Any]:
    """The event's column values (its id left to the database)."""
    if isinstance(event, UsageRow):
        return {name: getattr(event, name) for name in ROW_FIELDS}
    return event.model_dump(exclude={"id"})


class UsageWriterClosedError(RuntimeError):
    """The writer is not running (not started, or shut down)."""


class UsageEventQuarantinedError(RuntimeError):
    """PostgreSQL refused this event (and only it): it is in the usage quarantine."""


class UsageWriter:
    """Batches usage events into few transactions; :meth:`record` says whether the
    event was new (False: its request id was metered before, a replay).
    ``on_quarantine(kind, error)`` is told of each event set aside (the metric)."""

    def __init__(self, db: Database, *, max_batch: int = 500, max_queued: int = 100_000,
                 retry_for_s: float = 60.0, linger_s: float = 0.05,
                 on_quarantine: Callable[[str, str], None] | None = None) -> None:
        self.db = db
        self.on_quarantine = on_quarantine
        self.max_batch = max_batch
        # Events are written behind the answers: waiting a moment for more costs no one
        # anything and turns a transaction per request into one per few dozen.
        self.linger_s = linger_s
        self.max_queued = max_queued
        self.retry_for_s = retry_for_s
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0  # transactions written (the benchmark reads it)
        self.quarantined = 0  # events set aside in the usage quarantine

    def start(self) -> None:
        """Start writing (on the running event loop)."""
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        await self._task
        self._task = None

    async def record(self, event: Metered) -> bool:
        """Queue the event and wait until it is written; True if it was new. A caller
        cancelled meanwhile does not take the event with it. UsageEventQuarantinedError:
        PostgreSQL refused this event; it is kept in the quarantine instead."""
        if self._task is None or self._task.done() or self._closing:
            raise UsageWriterClosedError("the usage writer is not running")
        if len(self._queue) >= self.max_queued:
            raise UsageWriterClosedError(f"{self.max_queued} usage events are waiting for "
                                         "PostgreSQL; refusing more")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self._queue.append((event, future))
        self._wake.set()
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # Linger before every batch, not only the first after a quiet spell: what
            # queued during the last write (a few ms) would otherwise make a
            # transaction of two or three events each under steady load.
            if self.linger_s and not self._closing and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.linger_s)
            self._wake.clear()
            if self._queue:
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                await self._write(batch)
            if self._queue:
                self._wake.set()  # more: the next batch (after its linger)
            elif self._closing:
                return

    async def _write(self, batch: list[Pending]) -> None:
        try:
            await self._write_isolating(batch)
        except Exception as exc:  # an outage past retry_for_s
            log.exception("could not write %d usage events", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)

    async def _write_isolating(self, batch: list[Pending]) -> None:
        """Write the batch; if PostgreSQL refuses it (not an outage), write its halves
        apart, down to the events it refuses alone, which go to the quarantine."""
        events = [e for e, _ in batch]
        try:
            inserted = await self._retrying(lambda: write_events(self.db, events))
        except Exception as exc:
            if _transient(exc):
                raise
            if len(batch) == 1:
                await self._quarantine(batch[0], exc)
                return
            # In order, so a replay within the batch still counts only its first.
            middle = len(batch) // 2
            await self._write_isolating(batch[:middle])
            await self._write_isolating(batch[middle:])
            return
        self.batches += 1
        for (_, future), new in zip(batch, inserted, strict=True):
            if not future.done():
                future.set_result(new)

    async def _retrying(self, write: Callable[[], Awaitable[T]]) -> T:
        """One transaction, retried with backoff while PostgreSQL is unreachable."""
        async for attempt in AsyncRetrying(
                retry=retry_if_exception(_transient), reraise=True,
                stop=stop_after_delay(self.retry_for_s),
                wait=wait_exponential(multiplier=0.1, max=5),
                before_sleep=before_sleep_log(log, logging.WARNING)):
            with attempt:
                return await write()
        raise AssertionError("unreachable: tenacity returns or reraises")

    async def _quarantine(self, pending: Pending, exc: BaseException) -> None:
        event, future = pending
        values = row_values(event)
        try:
            error, reason = await self._retrying(lambda: quarantine(self.db, values, exc))
        except Exception as failure:
            if _transient(failure):
                raise  # an outage past retry_for_s: the batch's unwritten events fail too
            # Lose this event only; the rest of its batch is still written.
            log.exception("could not quarantine usage event %r of tenant %s (refused "
                          "with %s)", values["request_id"], event.tenant_id, exc)
            if not future.done():
                future.set_exception(failure)
            return
        self.quarantined += 1
        log.error("usage event quarantined: tenant %s, request %r, kind %s: %s: %s",
                  event.tenant_id, values["request_id"], values["kind"], error, reason)
        if self.on_quarantine is not None:
            self.on_quarantine(str(values["kind"]), error)
        if not future.done():
            future.set_exception(UsageEventQuarantinedError(
                f"usage event {values['request_id']!r} was quarantined: {error}: {reason}"))


async def write_events(db: Database, events: Sequence[Metered]) -> list[bool]:
    """Insert the events in one transaction, tenant by tenant; for each, True if it was
    new (the first of its (tenant, request id) to be stored)."""
    by_tenant = sorted(events, key=lambda e: e.tenant_id.bytes)
    stored: set[tuple[uuid.UUID, str]] = set()
    async with db.unscoped() as session:
        for tenant_id, group in itertools.groupby(by_tenant, key=lambda e: e.tenant_id):
            await db.switch_tenant(session, tenant_id)
            stored |= await insert_events(session, list(group))
    # A replay within the batch: only its first occurrence counts as new.
    result = []
    for event in events:
        key = (event.tenant_id, event.request_id)
        result.append(key in stored)
        stored.discard(key)
    return result


async def insert_events(session: AsyncSession,
                        events: Sequence[Metered]) -> set[tuple[uuid.UUID, str]]:
    """One multi-row insert in the session's transaction (and its tenant's scope); the
    (tenant, request id) of the events that were new."""
    t = UsageEvent.__table__.c  # type: ignore[attr-defined]
    # executemany: SQLAlchemy batches the rows into multi-row INSERTs ("insertmanyvalues")
    # with a cached compiled statement, about 6x faster than one literal VALUES list.
    stmt = (insert(UsageEvent).on_conflict_do_nothing(
        constraint="usage_events_request_unique").returning(t.tenant_id, t.request_id))
    result = await (await session.connection()).execute(
        stmt, [row_values(e) for e in events])
    return {(row.tenant_id, row.request_id) for row in result}


def _transient(exc: BaseException) -> bool:
    """PostgreSQL unreachable or restarting, or the pool exhausted: worth waiting for."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError
                      | sa_exc.TimeoutError | OSError | ConnectionError)


def _consume(future: asyncio.Future[bool]) -> None:
    """Mark a failed write's error as seen when its caller has gone away."""
    if not future.cancelled():
        with contextlib.suppress(Exception):
            future.exception()
