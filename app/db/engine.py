"""Engines and tenant-scoped transactions.

The app connects as a non-owner role without BYPASSRLS. Each transaction states whose
rows it may see with ``SET LOCAL app.tenant_id`` (via ``set_config(..., true)``); a
transaction that sets nothing sees no tenant rows at all. Platform-operator work
(tenant registry, key lookup before the tenant is known) sets ``app.platform`` instead.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from app.settings import DatabaseSettings

_SET_TENANT = text("SELECT set_config('app.tenant_id', :tenant_id, true)")
_SET_PLATFORM = text("SELECT set_config('app.platform', 'on', true)")


def make_engine(url: str, settings: DatabaseSettings) -> AsyncEngine:
    """A pooled asyncpg engine with explicit limits and timeouts."""
    return create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout_s,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={
            "timeout": settings.connect_timeout_s,
            "server_settings": {
                "application_name": "tenantrag",
                "statement_timeout": str(settings.statement_timeout_ms),
            },
        },
    )


class Database:
    """The app's connection pool and the only way to open a transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # A Session class of this database's own, so commit hooks stay per database.
        self._session_class: type[Session] = type("TrackedSession", (Session,), {})
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False,
                                            sync_session_class=self._session_class)

    def on_commit(self, keys: Callable[[object], object | None],
                  callback: Callable[[set[object]], None]) -> None:
        """After each commit, call ``callback`` with ``keys(row)`` of every ORM row the
        transaction added, changed or deleted (rows ``keys`` maps to None are ignored)."""
        info_key = f"changed_keys:{id(callback)}"  # each registration its own set

        def after_flush(session: Session, _: object) -> None:
            changed = session.info.setdefault(info_key, set())
            for row in (*session.new, *session.dirty, *session.deleted):
                key = keys(row)
                if key is not None:
                    changed.add(key)

        def after_commit(session: Session) -> None:
            changed = session.info.pop(info_key, None)
            if changed:
                callback(changed)

        def after_rollback(session: Session) -> None:
            session.info.pop(info_key, None)

        event.listen(self._session_class, "after_flush", after_flush)
        event.listen(self._session_class, "after_commit", after_commit)
        event.listen(self._session_class, "after_soft_rollback",
                     lambda session, _: after_rollback(session))

    @asynccontextmanager
    async def tenant(self, tenant_id: uuid.UUID) -> AsyncIterator[AsyncSession]:
        """A transaction that sees only ``tenant_id``'s rows; commits on success."""
        async with self._sessions() as session, session.begin():
            await self.switch_tenant(session, tenant_id)
            yield session

    @staticmethod
    async def switch_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> None:
        """From here on, the session's transaction sees (and writes) only
        ``tenant_id``'s rows; batch writers switch between tenants in one transaction."""
        await (await session.connection()).execute(_SET_TENANT, {"tenant_id": str(tenant_id)})

    @asynccontextmanager
    async def platform(self) -> AsyncIterator[AsyncSession]:
        """A transaction in the platform operator's scope (all tenants); commits on success."""
        async with self._sessions() as session, session.begin():
            await (await session.connection()).execute(_SET_PLATFORM)
            yield session

    @asynccontextmanager
    async def unscoped(self) -> AsyncIterator[AsyncSession]:
        """A transaction with no tenant set: row-level security shows it no tenant rows."""
        async with self._sessions() as session, session.begin():
            yield session

    async def ping(self) -> None:
        """Raise if PostgreSQL cannot run a trivial query."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
