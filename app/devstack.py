"""The embedded (dev) stack's bookkeeping: where its services listen and its admin key.

``tenantrag dev`` writes ``<data_dir>/stack.json`` while it runs, so other CLI commands
in another terminal (``tenantrag tenants create``...) find the same database and Redis
without any settings. The file is removed when the stack stops.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from app.settings import AuthSettings, DatabaseSettings, RedisSettings, ServerSettings, Settings

STACK_FILE = "stack.json"
ADMIN_KEY_FILE = "platform-admin-key"


def ensure_admin_key(data_dir: Path) -> str:
    """The dev platform-admin key: made once, kept (mode 0600) in the data folder."""
    path = data_dir / ADMIN_KEY_FILE
    if path.exists():
        return path.read_text().strip()
    key = f"tra_{secrets.token_urlsafe(32)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


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
    key_path = server.data_dir / ADMIN_KEY_FILE
    admin_key = SecretStr(key_path.read_text().strip()) if key_path.exists() else None
    return Settings(
        server=server.model_copy(update={"env": "dev"}),
        database=DatabaseSettings(url=info["database_url"]),
        redis=RedisSettings(url=info["redis_url"]),
        auth=AuthSettings(platform_admin_key=admin_key),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
