"""Parsing in child processes, so that no file can hang or exhaust the process that asked.

The parsers run C code (libxml2, zlib) and long pure-Python loops (pypdf's content
streams) that no check of ours can interrupt, and a small file can inflate to gigabytes.
So every file is parsed in a child process of its own with an address-space limit
(``RLIMIT_AS``) and a wall-clock deadline; a parse that runs out of either is killed and
reported as `UnsafeDocumentError`, while the caller's threads and other files carry on.

The children are forked, watched and reaped by a few long-lived helper processes
(`ingestion.parse_worker`, plain interpreters with only the parsers imported), not by
the calling process: that one holds threads, sockets and models that a fork must not
copy, and multiprocessing's own start methods would import the caller's main module
(with it, the whole app: seconds and a gigabyte) into every child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing import Pipe
from typing import Any

from ingestion.document import Format, ParsedDocument
from ingestion.errors import CorruptDocumentError, IngestionError, UnsafeDocumentError
from ingestion.limits import DEFAULT_LIMITS, ParseLimits
from ingestion.parse_worker import (
    DIED,
    OUT_OF_MEMORY,
    PARSED,
    REFUSED,
    TIMED_OUT,
    ParseRequest,
)

# The helper kills a child at the deadline itself; we wait this much longer for it to
# say so before we kill the helper too.
_ANSWER_GRACE_S = 5.0


@dataclass(frozen=True)
class ProcessLimits:
    """What parsing one file may use, enforced on the child process that parses it.

    ``memory_bytes`` bounds the child's whole address space; the interpreter and the
    parser libraries take about 80 MiB of it before the file is read.
    """

    timeout_s: float = 60.0
    memory_bytes: int = 1024 * 2**20

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_bytes <= 0:
            raise ValueError("ProcessLimits values must be positive")

    def describe_timeout(self) -> str:
        """The reason given for a parse stopped at the deadline."""
        return f"parsing took longer than {self.timeout_s:g} s"

    def describe_memory(self) -> str:
        """The reason given for a parse stopped at the memory limit."""
        return f"parsing needed more than {self.memory_bytes // 2**20} MiB of memory"


class IsolatedParser:
    """`parse_document` in a child process per file, at most ``max_processes`` at once.

    Thread-safe: each caller blocks in `parse` while a child works on its file. Helper
    processes start on first use and stay for the next files; `close` ends them.
    """

    def __init__(self, limits: ParseLimits = DEFAULT_LIMITS,
                 process_limits: ProcessLimits | None = None, max_processes: int = 2) -> None:
        if max_processes < 1:
            raise ValueError("max_processes must be at least 1")
        self.limits = limits
        self.process_limits = process_limits or ProcessLimits()
        self._slots = threading.BoundedSemaphore(max_processes)
        self._lock = threading.Lock()
        self._idle: list[_Helper] = []
        self._closed = False

    def parse(self, data: bytes, fmt: Format) -> ParsedDocument:
        """Like `parse_document`, plus `UnsafeDocumentError` for a parse that took too long
        or needed too much memory and `CorruptDocumentError` for a crashed parser."""
        limits = self.process_limits
        request = ParseRequest(data, fmt, self.limits, limits.memory_bytes, limits.timeout_s)
        with self._slots:
            helper = self._take()
            try:
                kind, value = helper.run(request, limits.timeout_s + _ANSWER_GRACE_S)
            except BaseException:
                helper.close()
                raise
            self._give_back(helper)
        if kind == PARSED:
            document: ParsedDocument = value
            return document
        if kind == REFUSED:
            raise value
        raise self._failure(kind, value)

    def close(self) -> None:
        """End the helper processes (busy ones once their file is done)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for helper in idle:
            helper.close()

    def _take(self) -> _Helper:
        with self._lock:
            while self._idle:
                helper = self._idle.pop()
                if helper.alive():
                    return helper
                helper.close()
        return _Helper()

    def _give_back(self, helper: _Helper) -> None:
        with self._lock:
            if helper.alive() and not self._closed:
                self._idle.append(helper)
                return
        helper.close()

    def _failure(self, kind: str, exitcode: int | None) -> IngestionError:
        limits = self.process_limits
        if kind == TIMED_OUT or exitcode == -signal.SIGXCPU:
            return UnsafeDocumentError(limits.describe_timeout())
        # A SIGKILL we did not send comes from the kernel's out-of-memory killer.
        if kind == OUT_OF_MEMORY or exitcode == -signal.SIGKILL:
            return UnsafeDocumentError(limits.describe_memory())
        if exitcode is not None and exitcode < 0:
            return CorruptDocumentError(
                f"the parser crashed on this file ({signal.Signals(-exitcode).name})")
        return CorruptDocumentError(f"the parser stopped on this file (exit code {exitcode})")


class _Helper:
    """One `ingestion.parse_worker` process and the pipes to it."""

    def __init__(self) -> None:
        requests_in, self._requests = Pipe(duplex=False)
        self._results, results_out = Pipe(duplex=False)
        ends = (requests_in.fileno(), results_out.fileno())
        # Our sys.path, so the helper imports the same code as we do.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(  # noqa: S603  (our own interpreter and code)
            [sys.executable, "-c", "from ingestion.parse_worker import main; main()",
             *map(str, ends)],
            pass_fds=ends, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: one kill ends it and its child
        )
        requests_in.close()
        results_out.close()

    def run(self, request: ParseRequest, timeout_s: float) -> tuple[str, Any]:
        """Send one file and wait for its outcome; a helper that does not answer within
        ``timeout_s`` is killed (with its child) and the parse reported as timed out."""
        try:
            self._requests.send(request)
            if self._results.poll(timeout_s):
                outcome: tuple[str, Any] = self._results.recv()
                return outcome
        except (EOFError, OSError):  # the helper itself died
            self.close()
            return DIED, self._process.returncode
        self.close()
        return TIMED_OUT, None

    def alive(self) -> bool:
        """Still running (and so able to take the next file)."""
        return self._process.poll() is None

    def close(self) -> None:
        """Kill the helper and the child it may be running; wait for them."""
        if self._process.returncode is None:  # not reaped: its group id is still its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._requests.close()
        self._results.close()
