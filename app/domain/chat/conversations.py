"""Conversations: stored per tenant (row-level security) and per end user.
A conversation belongs to one end user of one tenant (``end_user`` '' when the caller
names none). Every read names the end user, and a conversation of another end user is
reported as not found, exactly like another tenant's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.db.engine import Database
from app.db.models import Conversation, ConversationMessage, utcnow
from app.errors import NotFoundError

TITLE_CHARS = 80


class ConversationService:
    """Create, continue, list, read and delete conversations."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def start(self, tenant_id: uuid.UUID, end_user: str, first_message: str) -> uuid.UUID:
        """A new, empty conversation titled after its first message."""
        title = " ".join(first_message.split())[:TITLE_CHARS]
        conv = Conversation(tenant_id=tenant_id, end_user=end_user, title=title)
        async with self.db.tenant(tenant_id) as session:
            session.add(conv)
        return conv.id

    async def history(
        self, tenant_id: uuid.UUID, end_user: str, conversation_id: uuid.UUID, limit: int
    ) -> list[dict[str, str]]:
        """The last ``limit`` messages, oldest first; NotFoundError if not this end
        user's conversation."""
        async with self.db.tenant(tenant_id) as session:
            await _owned(session, end_user, conversation_id)
            rows = (await session.exec(
                select(ConversationMessage)
                .where(col(ConversationMessage.conversation_id) == conversation_id)
                .order_by(col(ConversationMessage.id).desc()).limit(limit))).all()
        return [{"role": m.role, "content": m.content} for m in reversed(rows)]

    async def record(
        self, tenant_id: uuid.UUID, conversation_id: uuid.UUID,
        turns: Sequence[dict[str, str]], answer: str, citations: list[dict[str, Any]],
        request_id: str,
    ) -> None:
        """Append this request's turns and the assistant's answer with its citations."""
        async with self.db.tenant(tenant_id) as session:
            conv = await session.get(Conversation, conversation_id, with_for_update=True)
            if conv is None:  # deleted while the answer was generated
                return
            for turn in turns:
                session.add(ConversationMessage(
                    conversation_id=conversation_id, tenant_id=tenant_id,
                    role=turn["role"], content=turn["content"], request_id=request_id))
            session.add(ConversationMessage(
                conversation_id=conversation_id, tenant_id=tenant_id, role="assistant",
                content=answer, citations=citations, request_id=request_id))
            conv.updated_at = utcnow()
            session.add(conv)

    async def page(
        self, tenant_id: uuid.UUID, end_user: str, limit: int, offset: int
    ) -> tuple[Sequence[Conversation], int]:
        """This end user's conversations, most recently active first, and their total."""
        mine = col(Conversation.end_user) == end_user
        async with self.db.tenant(tenant_id) as session:
            total = (await session.exec(
                select(func.count()).select_from(Conversation).where(mine))).one()
            rows = (await session.exec(
                select(Conversation).where(mine)
                .order_by(col(Conversation.updated_at).desc()).limit(limit).offset(offset)
            )).all()
        return rows, int(total)

    async def get(
        self, tenant_id: uuid.UUID, end_user: str, conversation_id: uuid.UUID
    ) -> tuple[Conversation, Sequence[ConversationMessage]]:
        """The conversation with all its messages, oldest first."""
        async with self.db.tenant(tenant_id) as session:
            conv = await _owned(session, end_user, conversation_id)
            messages = (await session.exec(
                select(ConversationMessage)
                .where(col(ConversationMessage.conversation_id) == conversation_id)
                .order_by(col(ConversationMessage.id)))).all()
        return conv, messages

    async def delete(self, tenant_id: uuid.UUID, end_user: str,
                     conversation_id: uuid.UUID) -> None:
        """Delete the conversation and its messages."""
        async with self.db.tenant(tenant_id) as session:
            conv = await _owned(session, end_user, conversation_id, lock=True)
            await session.delete(conv)


async def _owned(session: AsyncSession, end_user: str, conversation_id: uuid.UUID,
                 lock: bool = False) -> Conversation:
    conv = await session.get(Conversation, conversation_id, with_for_update=lock)
    if conv is None or conv.end_user != end_user:
        raise NotFoundError(f"conversation {conversation_id} not found")
    return conv
