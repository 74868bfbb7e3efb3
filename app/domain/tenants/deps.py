"""The tenant area's providers: the tenant registry and the system prompt service, built
per request from the app's state (the composition root merges ``DEPENDENCIES``)."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from app.domain.tenants.prompts import PromptService
from app.domain.tenants.service import TenantService


def provide_tenants(state: State) -> TenantService:
    """The tenant registry service."""
    return TenantService(state.db)


def provide_prompts(state: State) -> PromptService:
    """The tenant system prompt service."""
    return PromptService(state.db)


DEPENDENCIES = {
    "tenants": Provide(provide_tenants, sync_to_thread=False),
    "prompts": Provide(provide_prompts, sync_to_thread=False),
}
