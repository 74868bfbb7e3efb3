"""The embedded (dev) stack's bookkeeping: where its services listen and its secrets.

``tenantrag dev`` writes ``<data_dir>/stack.json`` while it runs, so other CLI commands
in another terminal (``tenantrag tenants create``...) find the same database and Redis
without any settings. The file is removed when the stack stops.

The stack's secrets (the platform admin key, the API-key pepper and the embed-token
signing key) are made with ``secrets`` on a data folder's first start and kept there
(mode 0600): a public default would let anyone who knows a tenant and key id forge
embed tokens against any dev stack. ``AUTH_*`` settings, when given, win.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from app.settings import (
    DEV_KEY_PEPPER,
    AuthSettings,
    DatabaseSettings,
    RedisSettings,
    ServerSettings,
    Settings,
)

STACK_FILE = "stack.json"
ADMIN_KEY_FILE = "platform-admin-key"
PEPPER_FILE = "key-pepper"
EMBED_KEY_FILE = "embed-signing-key"


def ensure_secret(data_dir: Path, name: str, prefix: str = "") -> str:
    """The secret kept in ``data_dir/name``: made once (256 random bits, mode 0600 from
    the first byte), then read back on every later start."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    value = f"{prefix}{secrets.token_urlsafe(32)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def ensure_admin_key(data_dir: Path) -> str:
    """The dev platform-admin key: made once, kept (mode 0600) in the data folder."""
    return ensure_secret(data_dir, ADMIN_KEY_FILE, prefix="tra_")


def with_folder_secrets(auth: AuthSettings, data_dir: Path) -> AuthSettings:
    """``auth`` with the data folder's pepper, embed signing key and admin key wherever
    the settings left the public default or nothing."""
    pepper = auth.key_pepper
    if pepper.get_secret_value() == DEV_KEY_PEPPER:
        pepper = SecretStr(ensure_secret(data_dir, PEPPER_FILE))
    return auth.model_copy(update={
        "key_pepper": pepper,
        "embed_signing_key": auth.embed_signing_key
        or SecretStr(ensure_secret(data_dir, EMBED_KEY_FILE)),
        "platform_admin_key": auth.platform_admin_key or SecretStr(ensure_admin_key(data_dir)),
    })


def write_stack_file(data_dir: Path, database_url: str, redis_url: str) -> None:
    """Publish the running stack's endpoints for other CLI processes."""
    body = json.dumps({"database_url": database_url, "redis_url": redis_url, "pid": os.getpid()})
    (data_dir / STACK_FILE).write_text(body)


def remove_stack_file(data_dir: Path) -> None:
    """Forget the endpoints once the stack is down."""
    (data_dir / STACK_FILE).unlink(missing_ok=True)


def attach_to_running_stack(server: ServerSettings) -> Settings | None:
    """Settings for the dev stack running on ``server.data_dir``, if one is running."""
    path = server.data_dir / STACK_FILE
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if not _alive(int(info["pid"])):
        return None
    return Settings(
        server=server.model_copy(update={"env": "dev"}),
        database=DatabaseSettings(url=info["database_url"]),
        redis=RedisSettings(url=info["redis_url"]),
        auth=with_folder_secrets(AuthSettings(), server.data_dir),  # keys hash as the API's
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
