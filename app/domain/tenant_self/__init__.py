"""What a tenant key can read about its own tenant."""

from app.domain.tenant_self.controllers import (
    get_system_prompt,
    list_models,
    list_system_prompt_versions,
    put_system_prompt,
    whoami,
)

ROUTES = [whoami, list_models, get_system_prompt, put_system_prompt,
          list_system_prompt_versions]
__all__ = ["ROUTES"]
