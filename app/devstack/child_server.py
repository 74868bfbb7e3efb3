"""A server run as our child process, shared by the embedded PostgreSQL and Redis and the
local vLLM server: a folder lock, one child that dies with us, its log, and stopping it.

Children get a parent-death signal, so they shut down cleanly when our process dies, even
by SIGKILL; a server that an earlier, dead owner left running is stopped before a start.
"""

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import psutil

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.02


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started, or its folder is in use."""


class StartedWhileUsed:
    """A context manager over ``start()`` and ``stop()``: ``with`` starts, leaving stops
    (the servers here, and the embedded stack of two)."""

    def start(self) -> object:
        """Start (idempotent)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop (idempotent)."""
        raise NotImplementedError

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


class ChildServer(StartedWhileUsed):
    """Lifecycle shared by the servers: folder lock, one child process, its URL; a
    context manager that starts the server and stops it."""

    name = "server"
    stop_signal = signal.SIGTERM
    start_timeout_s = START_TIMEOUT_S
    poll_s = POLL_S
    error: type[EmbeddedServiceError] = EmbeddedServiceError

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().absolute()
        self._lock = OwnerLock(sibling(self.data_dir, ".lock"))
        self._log = sibling(self.data_dir, ".log")
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
            stop_child(self._child, self.stop_signal, self.name)
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
            msg = f"{self.name} {problem} after start; end of {self._log}:\n{tail(self._log)}"
            raise self.error(msg)
        return answer


class OwnerLock:
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


def sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def death_signal_hook(sig: signal.Signals) -> Callable[[], None] | None:
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


def spawn(
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
            preexec_fn=death_signal_hook(death_signal),
        )


def tail(path: Path, size: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError as err:
        return f"<unreadable: {err}>"


def stop_child(child: subprocess.Popen[bytes], sig: signal.Signals, name: str) -> None:
    """Signal our child and wait; kill it after the timeout or on a second Ctrl-C."""
    if child.poll() is None:
        child.send_signal(sig)
    try:
        child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning(
            "%s pid %d did not stop in %.0f s; killing it", name, child.pid, STOP_TIMEOUT_S
        )
        child.kill()
        child.wait()
    except KeyboardInterrupt:
        child.kill()
        child.wait()
        raise


def stop_orphan(pid: int, name: str, workdir: Path, sig: signal.Signals) -> None:
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
    if not wait_gone(proc):
        proc.kill()
        if not wait_gone(proc):
            raise EmbeddedServiceError(f"{name} pid {pid} on {workdir} does not stop")


def wait_gone(proc: psutil.Process) -> bool:
    """Wait for a process that is not our child to exit; a zombie counts as gone."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(POLL_S)
    return False
