"""The child side of `ingestion.isolated`: a process that forks once per file it parses.

`IsolatedParser` starts it with the descriptors of two pipe ends (see `main`).
It imports the parsers once, then for each request forks a child that limits its own
address space and CPU time, parses, and sends its outcome back through this process,
which kills it at the deadline (and, being its parent, reaps it: no zombies). A fork
costs milliseconds, and nothing one file leaves behind (memory, parser state) is there
for the next one, which may be another tenant's.

A parser that a hostile file takes over must find nothing to use: this process starts
with an almost empty environment (no database URL, pepper or store key), first moves
into a network namespace of its own where the kernel allows it (so its children have
no network, loopback included; where it is refused, it says so in its first message and
parsing goes on with the host's network), and everything crossing the pipes is msgpack
decoded into fixed types, never pickle: a forged answer cannot run code in the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import resource
import signal
import sys
import warnings
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import NoReturn

import msgspec

from ingestion.document import Format, ParsedDocument
from ingestion.errors import (
    CorruptDocumentError,
    EmptyDocumentError,
    IngestionError,
    UnsafeDocumentError,
    UnsupportedFormatError,
    short,
)
from ingestion.limits import ParseLimits
from ingestion.parse import parse_document

# Outcome kinds.
PARSED, REFUSED, OUT_OF_MEMORY = "parsed", "refused", "out_of_memory"
TIMED_OUT, DIED = "timed_out", "died"  # DIED comes with the exit code (-N for signal N)
# CPU seconds an orphaned child (its parent killed) may spin past its deadline.
CPU_GRACE_S = 5
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000  # <linux/sched.h>
# The refusals a child may name; any other name reads as a corrupt file.
REFUSALS: dict[str, type[IngestionError]] = {cls.__name__: cls for cls in (
    IngestionError, UnsupportedFormatError, EmptyDocumentError, CorruptDocumentError,
    UnsafeDocumentError)}


@dataclass(frozen=True)
class ParseRequest:
    """One file to parse, with the limits its child process applies to itself."""

    data: bytes
    fmt: Format
    limits: ParseLimits
    memory_bytes: int
    timeout_s: float


class Outcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """What became of one file: the document, or a refusal (an `IngestionError` class's
    name and its message), or how the child ended (DIED's exit code)."""

    kind: str
    document: ParsedDocument | None = None
    refusal: str | None = None
    message: str = ""
    exitcode: int | None = None

    def error(self) -> IngestionError:
        """A REFUSED outcome's exception, of one of the known classes only."""
        return REFUSALS.get(self.refusal or "", CorruptDocumentError)(self.message)


class Sandbox(msgspec.Struct, frozen=True):
    """The helper's first message: whether its children are cut off from the network."""

    network_isolated: bool
    detail: str


_ENCODER = msgspec.msgpack.Encoder()
_REQUESTS = msgspec.msgpack.Decoder(ParseRequest)
_OUTCOMES = msgspec.msgpack.Decoder(Outcome)
_SANDBOXES = msgspec.msgpack.Decoder(Sandbox)


def encode(message: ParseRequest | Outcome | Sandbox) -> bytes:
    """One message for the pipes, as msgpack."""
    return _ENCODER.encode(message)


def decode_outcome(payload: bytes) -> Outcome | None:
    """An outcome as sent by the helper, or None for anything else (a pickle, say),
    which is never interpreted."""
    try:
        return _OUTCOMES.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError):
        return None


def decode_sandbox(payload: bytes) -> Sandbox:
    """The helper's report of its sandbox."""
    try:
        return _SANDBOXES.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError):
        return Sandbox(network_isolated=False, detail="the parse helper did not say")


def cut_off_network() -> Sandbox:
    """Move this process, and so every child it forks from now on, into a new network
    namespace (nothing in it but a loopback that is down); must run while the process
    has a single thread. As root (CAP_SYS_ADMIN) a namespace is enough; unprivileged,
    a user namespace comes with it where the kernel allows those."""
    refused = []
    for flags, how in ((CLONE_NEWNET, "a network namespace"),
                       (CLONE_NEWUSER | CLONE_NEWNET, "a user and network namespace")):
        try:
            _unshare(flags)
        except OSError as exc:
            refused.append(f"{how}: {exc.strerror or exc}")
            continue
        return Sandbox(network_isolated=True, detail=f"parsers run in {how} of their own")
    return Sandbox(network_isolated=False, detail="parsers keep the host's network; the "
                   f"kernel refused unshare ({'; '.join(refused)})")


def _unshare(flags: int) -> None:
    unshare = getattr(ctypes.CDLL(None, use_errno=True), "unshare", None)  # os.unshare: 3.12+
    if unshare is None:
        raise OSError(0, "unshare(2) is not available on this system")
    if unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def serve(requests: Connection, results: Connection) -> None:
    """Say how we are sandboxed, then answer requests one at a time until the parent
    closes its end."""
    sandbox = cut_off_network()  # first: while this process has a single thread
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops us
    logging.disable(logging.CRITICAL)  # a hostile file's parser warnings; the outcome says
    warnings.simplefilter("ignore")
    try:
        results.send_bytes(encode(sandbox))
        while True:
            request = _REQUESTS.decode(requests.recv_bytes())
            results.send_bytes(_parse_in_fork(request, requests, results))
    except (EOFError, BrokenPipeError):  # the parent is gone
        return


def _parse_in_fork(request: ParseRequest, *inherited: Connection) -> bytes:
    """Fork a child to parse ``request``: its encoded outcome as it sent it (we relay it
    undecoded), TIMED_OUT (it was killed at the deadline) or DIED with its exit code."""
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
        return encode(Outcome(TIMED_OUT))
    return encode(Outcome(DIED, exitcode=os.waitstatus_to_exitcode(status)))


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
            sender.send_bytes(encode(outcome))
        except MemoryError:  # encoding a huge result failed before anything was written
            sender.send_bytes(encode(Outcome(OUT_OF_MEMORY)))
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


def _parse(request: ParseRequest) -> Outcome:
    try:
        return Outcome(PARSED, document=parse_document(request.data, request.fmt,
                                                       request.limits))
    except Exception as exc:  # MemoryError included
        if _out_of_memory(exc):
            return Outcome(OUT_OF_MEMORY)
        if isinstance(exc, IngestionError):
            return Outcome(REFUSED, refusal=type(exc).__name__, message=str(exc))
        # A parser bug on one file repeats on every retry: refuse the file, say what broke.
        return Outcome(REFUSED, refusal=CorruptDocumentError.__name__,
                       message=f"could not parse this {request.fmt} file: {short(exc)}")


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
