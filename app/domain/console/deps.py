"""The console area's provider: its session service over the lifespan's clients."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.console.service import ConsoleSessions


def provide_console(state: State) -> ConsoleSessions:
    """Sign-in, sign-out and who is signed in."""
    return ConsoleSessions(state.authenticator, state.console_sessions, state.signin_attempts)


DEPENDENCIES = {"console": Provide(provide_console, sync_to_thread=False)}
