"""Settings refuse default secrets outside dev/test and derive the app role's URL."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from app.settings import (
    DEV_KEY_PEPPER,
    AuthSettings,
    DatabaseSettings,
    IngestSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    as_asyncpg_url,
)


def test_production_refuses_default_or_missing_secrets() -> None:
    with pytest.raises(ValidationError) as err:
        # explicit values: the environment (CI sets DATABASE_URL) must not leak in
        Settings(server=ServerSettings(env="prod"), database=DatabaseSettings(url=None),
                 redis=RedisSettings(url=None),
                 auth=AuthSettings(key_pepper=SecretStr(DEV_KEY_PEPPER), platform_admin_key=None))
    message = str(err.value)
    for needed in ("AUTH_KEY_PEPPER", "AUTH_PLATFORM_ADMIN_KEY", "DATABASE_URL", "REDIS_URL"):
        assert needed in message


def test_production_accepts_real_secrets() -> None:
    s = Settings(
        server=ServerSettings(env="prod"),
        database=DatabaseSettings(url="postgresql://owner:pw@db:5432/app"),
        redis=RedisSettings(url="redis://cache:6379/0"),
        auth=AuthSettings(key_pepper=SecretStr("p" * 40),
                          platform_admin_key=SecretStr("k" * 40)),
    )
    assert s.is_production


def test_dev_runs_without_secrets() -> None:
    assert not Settings(server=ServerSettings(env="dev")).is_production


def test_app_url_uses_the_app_role_on_the_same_server() -> None:
    db = DatabaseSettings(url="postgres://owner:secret@db.internal:5432/app?sslmode=require",
                          app_password=SecretStr("apppw"))
    assert db.owner_url() == "postgresql+asyncpg://owner:secret@db.internal:5432/app?sslmode=require"
    assert db.application_url() == (
        "postgresql+asyncpg://tenantrag_app:apppw@db.internal:5432/app?sslmode=require")
    explicit = DatabaseSettings(url="postgresql://o@h/d", app_url="postgresql://other@h/d")
    assert explicit.application_url() == "postgresql+asyncpg://other@h/d"


def test_bad_values_are_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="PostgreSQL URL"):
        as_asyncpg_url("mysql://root@localhost/db")
    with pytest.raises(ValidationError, match="INGEST_CHUNK_OVERLAP_TOKENS"):
        IngestSettings(chunk_max_tokens=64, chunk_overlap_tokens=64)
    with pytest.raises(ValidationError):
        DatabaseSettings(app_role="robert'); DROP TABLE students;--")


@pytest.mark.parametrize(("auth", "named"), [
    (AuthSettings(key_pepper=SecretStr(DEV_KEY_PEPPER)), "AUTH_KEY_PEPPER"),
    (AuthSettings(key_pepper=SecretStr("short-pepper")), "AUTH_KEY_PEPPER"),
    (AuthSettings(key_pepper=SecretStr("p" * 40), embed_signing_key=SecretStr("s" * 31)),
     "AUTH_EMBED_SIGNING_KEY"),
    (AuthSettings(key_pepper=SecretStr("p" * 40), platform_admin_key=SecretStr("k" * 8)),
     "AUTH_PLATFORM_ADMIN_KEY"),
])
def test_production_refuses_a_default_or_short_secret_by_name(
    auth: AuthSettings, named: str,
) -> None:
    admin = auth.platform_admin_key or SecretStr("k" * 40)
    with pytest.raises(ValidationError, match=named):
        Settings(server=ServerSettings(env="prod"),
                 database=DatabaseSettings(url="postgresql://owner:pw@db:5432/app"),
                 redis=RedisSettings(url="redis://cache:6379/0"),
                 auth=auth.model_copy(update={"platform_admin_key": admin}))
