"""``POST /v1/chat/completions`` (OpenAI wire format) and ``/v1/conversations``: the
HTTP side of chat only. A chat request is read here (its tenant, an embed token's end
user and knowledge bases, its ``X-Request-Id``, a waiter for the client's disconnect),
answered by :meth:`app.domain.chat.service.ChatService.answer`, and its reply wrapped as
a Litestar ``Response`` or ``Stream``; app/server/fast_chat.py calls the same
:func:`answer_chat`."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Stream

from app.domain.chat.conversations import ConversationService
from app.domain.chat.schemas import (
    ChatCompletionRequest,
    ConversationDetail,
    ConversationOut,
    ConversationPage,
    MessageOut,
)
from app.domain.chat.service import ChatService
from app.errors import BadRequestError, PermissionDeniedError
from app.http.cors import header_of
from app.http.guards import chat_or_embed, chat_tenant_of, embed_of, tenant_row
from app.http.openapi import also_answering, problems
from app.http.paging import Offset

AnyRequest = Request[Any, Any, Any]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")
CHAT = chat_or_embed
EndUser = Annotated[str, QueryParameter(max_length=256,
                                        description="The end user (the chat request's `user`)")]


@post("/v1/chat/completions", status_code=200, tags=["chat"], guards=[CHAT],
      responses=problems(404, 409, 429, 502, 504),
      operation_class=also_answering("text/event-stream"),
      summary="Chat, grounded in the tenant's documents (OpenAI-compatible)",
      description="OpenAI's chat completion request; extras (`knowledge_base_ids`, "
      "`retrieval`, `conversation_id`) go in the body (`extra_body` in OpenAI SDKs). The "
      "response adds `citations` and `conversation_id`; a stream sends them in its first "
      "chunk, before any content.")
async def chat_completions(
    request: AnyRequest, data: JSONBody[ChatCompletionRequest],
    chat: NamedDependency[ChatService],
) -> Response[Any]:
    """Answer with citations, streamed or whole. (The API serves this route from
    app/server/fast_chat.py, outside Litestar's layers, unless tracing is on; both call
    :func:`answer_chat`.)"""
    # One dependency: Litestar resolves two or more in a task group of their own.
    return await answer_chat(request, data, chat)


async def answer_chat(request: AnyRequest, data: ChatCompletionRequest,
                      chat: ChatService) -> Response[Any]:
    """The chat completion for an authenticated, authorized request: what the request
    says (its tenant, an embed token's scope, its ``X-Request-Id``) read here, answered
    by :meth:`ChatService.answer`, and its reply sent as a JSON ``Response`` or a
    ``Stream`` of server-sent events."""
    tenant = tenant_row(request) or await chat.tenants.get_own(chat_tenant_of(request))
    data = _within_embed_scope(request, data)
    reply = await chat.answer(tenant, data, _request_id(request), _scope_of(request),
                              _disconnected(request))
    if reply.events is not None:
        return Stream(reply.events, media_type="text/event-stream", headers=reply.headers)
    return Response(reply.json, headers=reply.headers)


def _scope_of(request: AnyRequest) -> str:
    """Who asks, for idempotency: an embed token's end user, else the tenant's key."""
    embed = embed_of(request)
    return "key" if embed is None else f"embed:{embed.end_user}"


def _within_embed_scope(request: AnyRequest,
                        data: ChatCompletionRequest) -> ChatCompletionRequest:
    """An embed token chats as its end user, on its knowledge bases only."""
    embed = embed_of(request)
    if embed is None:
        return data
    if data.user is not None and data.user != embed.end_user:
        raise PermissionDeniedError("this embed token is for another end user")
    if any(m.role in ("system", "developer") for m in data.messages):
        raise PermissionDeniedError("an embed token may not send system or developer "
                                    "messages: the tenant's prompt is set by its admins")
    kbs = data.knowledge_base_ids
    if kbs is not None and not set(kbs) <= embed.kb_ids:
        raise PermissionDeniedError("this embed token does not cover these knowledge bases")
    return data.model_copy(update={"user": embed.end_user,
                                   "knowledge_base_ids": kbs or sorted(embed.kb_ids)})


def _end_user(request: AnyRequest, user: str) -> str:
    """The end user whose conversations are asked for: an embed token's own only."""
    embed = embed_of(request)
    if embed is None:
        return user
    if user and user != embed.end_user:
        raise PermissionDeniedError("this embed token is for another end user")
    return embed.end_user


def _request_id(request: AnyRequest) -> str | None:
    """The client's ``X-Request-Id``: the request is idempotent on it (a replay gets the
    first answer, generated and metered once)."""
    value = header_of(request.scope, b"x-request-id")
    if value is None:
        return None
    if not _REQUEST_ID.fullmatch(value):
        raise BadRequestError("X-Request-Id must be 1-100 letters, digits or ._:-")
    if value.startswith("ingest:"):  # ingestion's usage events are metered under these
        raise BadRequestError("X-Request-Id may not start with 'ingest:' (reserved)")
    return value


def _disconnected(request: AnyRequest) -> Callable[[], Awaitable[None]]:
    """A waiter that returns when the client disconnects (the body is read by now, so
    the next ASGI message can only be the disconnect)."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


class ConversationController(Controller):
    """An end user's conversations. ``user`` names the end user, as in chat requests;
    another end user's (or tenant's) conversation is not found."""

    path = "/v1/conversations"
    tags = ["chat"]  # noqa: RUF012
    guards = [CHAT]  # noqa: RUF012

    @get("/", summary="List an end user's conversations")
    async def list_conversations(
        self, request: AnyRequest, conversations: NamedDependency[ConversationService],
        user: FromQuery[EndUser] = "",
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        offset: Offset = 0,
    ) -> ConversationPage:
        rows, total = await conversations.page(chat_tenant_of(request),
                                               _end_user(request, user), limit, offset)
        return ConversationPage(data=[ConversationOut.model_validate(c) for c in rows],
                                total=total, limit=limit, offset=offset)

    @get("/{conversation_id:uuid}", summary="A conversation with its messages and citations")
    async def get_conversation(
        self, request: AnyRequest, conversation_id: FromPath[uuid.UUID],
        conversations: NamedDependency[ConversationService], user: FromQuery[EndUser] = "",
    ) -> ConversationDetail:
        conv, messages = await conversations.get(chat_tenant_of(request),
                                                 _end_user(request, user), conversation_id)
        return ConversationDetail(
            **ConversationOut.model_validate(conv).model_dump(),
            messages=[MessageOut.model_validate(m) for m in messages])

    @delete("/{conversation_id:uuid}", summary="Delete a conversation")
    async def delete_conversation(
        self, request: AnyRequest, conversation_id: FromPath[uuid.UUID],
        conversations: NamedDependency[ConversationService], user: FromQuery[EndUser] = "",
    ) -> None:
        await conversations.delete(chat_tenant_of(request), _end_user(request, user),
                                   conversation_id)
