"""The fast chat door's start-up check: an app whose middleware is not the list the
door's steps reproduce (app/server/chat_pipeline.py) does not start."""

from __future__ import annotations

import pytest
from litestar.middleware import DefineMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

import app.server.factory as factory
from app.http.request_context import request_middleware
from app.server.chat_pipeline import REPRODUCED_MIDDLEWARE, check_middleware
from app.settings import Settings


class AddedMiddleware:
    """A middleware someone adds to the app (the fast door does not know it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("APP_ENV", "test")
    return Settings()


def test_the_app_starts_with_the_middleware_the_fast_door_reproduces(
        settings: Settings) -> None:
    app = factory.create_app(settings)
    assert app.fast_chat is not None
    assert tuple(getattr(m, "middleware", m) for m in app.middleware) == REPRODUCED_MIDDLEWARE


def test_adding_a_middleware_makes_create_app_fail_naming_it(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "request_middleware", lambda s: [
        *request_middleware(s), DefineMiddleware(AddedMiddleware)])
    with pytest.raises(RuntimeError, match=r"AddedMiddleware would not run for POST "
                                           r"/v1/chat/completions.*chat_pipeline\.py"):
        factory.create_app(settings)


def test_without_the_fast_door_any_middleware_may_be_added(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "request_middleware", lambda s: [
        *request_middleware(s), DefineMiddleware(AddedMiddleware)])
    app = factory.create_app(settings.model_copy(update={
        "server": settings.server.model_copy(update={"fast_chat": False})}))
    assert app.fast_chat is None


def test_a_reordered_or_missing_middleware_fails_too() -> None:
    with pytest.raises(RuntimeError, match="another order, or one missing"):
        check_middleware(list(reversed(REPRODUCED_MIDDLEWARE)))
    with pytest.raises(RuntimeError, match="another order, or one missing"):
        check_middleware(REPRODUCED_MIDDLEWARE[:2])
