"""Helpers of the deployment tests: external command-line tools (skipped locally when
missing, a failure in CI, where ``.ci/run`` installs them) and the environment variables
the app reads."""

from __future__ import annotations

import os
import shutil

import pytest
from pydantic_settings import BaseSettings

from app.inference.pools import PoolsConfig
from app.settings import Settings


def required_tool(name: str, install_hint: str) -> str:
    """The path of ``name``; skip the test without it, or fail when running in CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed ({install_hint})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; .ci/run should have installed it")
    pytest.skip(message)


def settings_variables() -> set[str]:
    """Every environment variable the app's settings read."""
    names = set()
    for group in Settings.model_fields.values():
        cls = group.annotation
        assert isinstance(cls, type) and issubclass(cls, BaseSettings)
        prefix = cls.model_config.get("env_prefix", "")
        names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


def unread_variables(env: set[str], pools: PoolsConfig) -> set[str]:
    """The variables of ``env`` that neither a setting nor a pool's key reads (typos)."""
    keys = {p.api_key_env for p in pools.pools if p.api_key_env}
    return env - settings_variables() - keys
