"""The pools area's provider: the generation dispatcher the lifespan started, or a 503
when no pool is configured (the chat service takes it from here too)."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.errors import ServiceUnavailableError
from app.inference.dispatcher import Dispatcher


def provide_dispatcher(state: State) -> Dispatcher:
    """The generation dispatcher; 503 when no pool is configured."""
    if state.dispatcher is None:
        raise ServiceUnavailableError("no generation server is configured (set LLM_BASE_URL "
                                      "or DISPATCH_POOLS_FILE)")
    dispatcher: Dispatcher = state.dispatcher
    return dispatcher


DEPENDENCIES = {"dispatcher": Provide(provide_dispatcher, sync_to_thread=False)}
