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

The helpers get none of the caller's environment (its database URL, key pepper, store
keys): only where our code is, a locale and a temp folder. Their children have no
network where the kernel allows a namespace of their own (the first helper's report is
logged once: a warning where it is refused). Requests and outcomes cross the pipes as
msgpack decoded into fixed types, never as pickle (see `ingestion.parse_worker`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing import Pipe

from ingestion.document import Format, ParsedDocument
from ingestion.errors import CorruptDocumentError, IngestionError, UnsafeDocumentError
from ingestion.limits import DEFAULT_LIMITS, ParseLimits
from ingestion.parse_worker import (
    DIED,
    OUT_OF_MEMORY,
    PARSED,
    REFUSED,
    TIMED_OUT,
    Outcome,
    ParseRequest,
    Sandbox,
    decode_outcome,
    decode_sandbox,
    encode,
)

log = logging.getLogger(__name__)

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
        self._sandbox_logged = False

    def parse(self, data: bytes, fmt: Format) -> ParsedDocument:
        """Like `parse_document`, plus `UnsafeDocumentError` for a parse that took too long
        or needed too much memory and `CorruptDocumentError` for a crashed parser."""
        limits = self.process_limits
        request = ParseRequest(data, fmt, self.limits, limits.memory_bytes, limits.timeout_s)
        with self._slots:
            helper = self._take()
            try:
                outcome = helper.run(request, limits.timeout_s + _ANSWER_GRACE_S)
            except BaseException:
                helper.close()
                raise
            self._log_sandbox(helper.sandbox)
            self._give_back(helper)
        if outcome.kind == PARSED and outcome.document is not None:
            return outcome.document
        if outcome.kind == REFUSED:
            raise outcome.error()
        raise self._failure(outcome.kind, outcome.exitcode)

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

    def _log_sandbox(self, sandbox: Sandbox | None) -> None:
        """Say once per parser how its children are sandboxed."""
        with self._lock:
            if sandbox is None or self._sandbox_logged:
                return
            self._sandbox_logged = True
        if sandbox.network_isolated:
            log.info("document parsers have no network: %s", sandbox.detail)
        else:
            log.warning("document parsers are NOT cut off from the network: %s",
                        sandbox.detail)

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


def helper_environment() -> dict[str, str]:
    """A helper's whole environment: where our code is (our sys.path, so it imports the
    same code as we do), a UTF-8 locale and the temp folder; none of our settings."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PATH": os.defpath,
           "LC_ALL": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


class _Helper:
    """One `ingestion.parse_worker` process and the pipes to it."""

    def __init__(self) -> None:
        requests_in, self._requests = Pipe(duplex=False)
        self._results, results_out = Pipe(duplex=False)
        ends = (requests_in.fileno(), results_out.fileno())
        self._process = subprocess.Popen(  # noqa: S603  (our own interpreter and code)
            [sys.executable, "-c", "from ingestion.parse_worker import main; main()",
             *map(str, ends)],
            pass_fds=ends, env=helper_environment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: one kill ends it and its child
        )
        requests_in.close()
        results_out.close()
        self.sandbox: Sandbox | None = None  # its first message, read with the first answer

    def run(self, request: ParseRequest, timeout_s: float) -> Outcome:
        """Send one file and wait for its outcome; a helper that does not answer within
        ``timeout_s`` is killed (with its child) and the parse reported as timed out."""
        try:
            self._requests.send_bytes(encode(request))
            if self.sandbox is None and self._results.poll(timeout_s):
                self.sandbox = decode_sandbox(self._results.recv_bytes())
            if self._results.poll(timeout_s):
                outcome = decode_outcome(self._results.recv_bytes())
                if outcome is not None:
                    return outcome
                self.close()  # it sent what we never send: no further file goes to it
                return Outcome(REFUSED, refusal=CorruptDocumentError.__name__,
                               message="the parser sent back an unreadable answer")
        except (EOFError, OSError):  # the helper itself died
            self.close()
            return Outcome(DIED, exitcode=self._process.returncode)
        self.close()
        return Outcome(TIMED_OUT)

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
