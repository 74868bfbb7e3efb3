"""The child side of `ingestion.isolated`: a process that forks once per file it parses.

`IsolatedParser` starts it with the descriptors of two pipe ends (see `main`).
It imports the parsers once, then for each request forks a child that limits its own
address space and CPU time, parses, and sends its outcome back through this process,
which kills it at the deadline (and, being its parent, reaps it: no zombies). A fork
costs milliseconds, and nothing one file leaves behind (memory, parser state) is there
for the next one, which may be another tenant's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import resource
import signal
import sys
import warnings
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from ingestion.document import Format
from ingestion.errors import CorruptDocumentError, IngestionError, short
from ingestion.limits import ParseLimits
from ingestion.parse import parse_document

# Outcome kinds: (kind, value) pairs travel back to the parent.
PARSED, REFUSED, OUT_OF_MEMORY = "parsed", "refused", "out_of_memory"
TIMED_OUT, DIED = "timed_out", "died"  # DIED's value: the exit code (-N for signal N)
# CPU seconds an orphaned child (its parent killed) may spin past its deadline.
CPU_GRACE_S = 5


@dataclass(frozen=True)
class ParseRequest:
    """One file to parse, with the limits its child process applies to itself."""

    data: bytes
    fmt: Format
    limits: ParseLimits
    memory_bytes: int
    timeout_s: float


def serve(requests: Connection, results: Connection) -> None:
    """Answer requests one at a time until the parent closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops us
    logging.disable(logging.CRITICAL)  # a hostile file's parser warnings; the outcome says
    warnings.simplefilter("ignore")
    try:
        while True:
            results.send_bytes(_parse_in_fork(requests.recv(), requests, results))
    except (EOFError, BrokenPipeError):  # the parent is gone
        return


def _parse_in_fork(request: ParseRequest, *inherited: Connection) -> bytes:
    """Fork a child to parse ``request``: its pickled outcome, TIMED_OUT (it was killed
    at the deadline) or DIED with its exit code."""
    receiver, sender = Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # the child: only the pipe to its parent stays open
        for conn in (receiver, *inherited):
            conn.close()
        _parse_and_send(request, sender)
    sender.close()
    timeout_s = request.timeout_s
    del request  # the child has its own copy of the bytes
    payload: bytes | None = None
    answered = receiver.poll(timeout_s)  # also true when it died: EOF
    if answered:
        with contextlib.suppress(EOFError):  # died before answering (or half-way through)
            payload = receiver.recv_bytes()
    else:
        os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still this child's
    receiver.close()
    _, status = os.waitpid(pid, 0)
    if payload is not None:
        return payload
    if not answered:
        return pickle.dumps((TIMED_OUT, None))
    return pickle.dumps((DIED, os.waitstatus_to_exitcode(status)))


def _parse_and_send(request: ParseRequest, sender: Connection) -> NoReturn:
    """The forked child's whole life: limit itself, parse, answer, exit."""
    code = 0
    try:
        _first_to_go_when_memory_runs_out()
        resource.setrlimit(resource.RLIMIT_AS, (request.memory_bytes, request.memory_bytes))
        cpu_s = math.ceil(request.timeout_s) + CPU_GRACE_S  # only matters if we are orphaned
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + CPU_GRACE_S))
        outcome = _parse(request)
        try:
            sender.send(outcome)
        except MemoryError:  # pickling a huge result failed before anything was written
            sender.send((OUT_OF_MEMORY, None))
    except BaseException:  # the exit code is all a crash can tell
        code = 1
    finally:
        os._exit(code)


def _first_to_go_when_memory_runs_out() -> None:
    """Ask the kernel's out-of-memory killer to pick this child before anything else in
    its container (the worker with its model, say); raising one's own score needs no
    privileges. Where /proc is missing, the address-space limit still holds."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("1000")


def _parse(request: ParseRequest) -> tuple[str, Any]:
    try:
        return PARSED, parse_document(request.data, request.fmt, request.limits)
    except Exception as exc:  # MemoryError included
        if _out_of_memory(exc):
            return OUT_OF_MEMORY, None
        if isinstance(exc, IngestionError):
            return REFUSED, exc
        # A parser bug on one file repeats on every retry: refuse the file, say what broke.
        return REFUSED, CorruptDocumentError(
            f"could not parse this {request.fmt} file: {short(exc)}")


def _out_of_memory(exc: BaseException | None) -> bool:
    """A MemoryError in the first links of the chain, or libxml2's own words for one."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, MemoryError) or "memory allocation failed" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def main() -> None:
    """Entry point: serve on the pipe ends whose descriptors are the two arguments."""
    serve(Connection(int(sys.argv[1]), writable=False),
          Connection(int(sys.argv[2]), readable=False))
