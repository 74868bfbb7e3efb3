"""A local vLLM CPU server with an OpenAI-compatible API, for the dev stack and the tests.

Its virtualenv and model are prepared once by app/devstack/vllm_prepare.py. `LocalVLLM`
runs ``vllm.entrypoints.openai.api_server`` from that venv as our child, in its own session
and with a parent-death signal (as the embedded PostgreSQL and Redis are), log appended to
``<data_dir>/vllm.log``::

    with LocalVLLM(prepare(default_cache_dir()), Path(".data")) as server:
        server.base_url  # http://127.0.0.1:PORT/v1

``python -m app.devstack.local_vllm prepare`` prepares; ``... serve`` also runs the server in
the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

from app.devstack.child_server import (
    STOP_TIMEOUT_S,
    ChildServer,
    EmbeddedServiceError,
    OwnerLock,
    spawn,
    tail,
)
from app.devstack.vllm_prepare import (
    CHILD_ENV_SET,
    CHILD_ENV_UNSET,
    SERVED_MODEL_NAME,
    LocalVLLMError,
    PreparedVLLM,
    default_cache_dir,
    prepare,
)

__all__ = [
    "SERVED_MODEL_NAME", "LocalVLLM", "LocalVLLMError", "PreparedVLLM", "default_cache_dir",
    "main", "prepare",
]

logger = logging.getLogger(__name__)

_POLL_S = 0.5
_PROBE_TIMEOUT_S = 5.0
_LEFTOVER_GRACE_S = 5.0  # vLLM's engine core exits within ~2 s of the API server


class LocalVLLM(ChildServer):
    """A vLLM OpenAI-compatible server, our child process; a context manager that stops it.

    The start/stop lifecycle (folder lock, parent-death signal, readiness polling with the
    log's tail on failure) is the embedded servers' own. `start()` picks a free port
    unless one is given and returns once ``/health`` answers 200 and ``/v1/models`` lists
    the model (about 50 s on a CPU). It takes a lock on `data_dir` (``vllm.lock``), so
    one folder serves one server at a time.
    """

    name = "vLLM"
    poll_s = _POLL_S
    error = LocalVLLMError

    def __init__(
        self,
        prepared: PreparedVLLM,
        data_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str = SERVED_MODEL_NAME,
        max_model_len: int = 2048,
        max_num_seqs: int = 8,
        kv_cache_gib: int = 1,
        start_timeout_s: float = 240.0,
    ) -> None:
        super().__init__(data_dir)
        self.prepared = prepared
        # Lock and log inside the folder (the database servers keep theirs beside it).
        self._lock = OwnerLock(self.data_dir / "vllm.lock")
        self._log = self.log = self.data_dir / "vllm.log"
        self.host = host
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kv_cache_gib = kv_cache_gib
        self.start_timeout_s = start_timeout_s
        self._requested_port = port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1`` of the running server; raises if it is not started."""
        if self._url is None:
            raise LocalVLLMError("the local vLLM server is not started")
        return self._url

    def _launch(self) -> str:
        port = self._requested_port or _free_port(self.host)
        started = time.monotonic()
        self._child = spawn(self._argv(port), self._log, self.stop_signal, None)
        root = f"http://{self.host}:{port}"
        with httpx.Client(timeout=_PROBE_TIMEOUT_S) as client:
            self._wait_until(lambda: True if self._serves_model(client, root) else None)
        logger.info("local vLLM serves %s (ready in %.0f s)", self.served_model_name,
                    time.monotonic() - started)
        return f"{root}/v1"

    def stop(self) -> None:
        """SIGTERM the server, kill it after a timeout, reap what it started (idempotent)."""
        child = self._child
        leftovers = _descendants(child.pid) if child is not None else []  # engine core...
        super().stop()
        _reap(leftovers)

    def wait(self) -> int:
        """Block until the server exits; its exit status (raises if it is not started)."""
        if self._child is None:
            raise LocalVLLMError("the local vLLM server is not started")
        return self._child.wait()

    def _argv(self, port: int) -> list[str]:
        """The server command, its environment set through env(1) (which execs: same pid)."""
        env = {**CHILD_ENV_SET, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib)}
        return [
            "/usr/bin/env",
            *(arg for name in CHILD_ENV_UNSET for arg in ("-u", name)),
            *(f"{name}={value}" for name, value in env.items()),
            *(str(self.prepared.python), "-m", "vllm.entrypoints.openai.api_server"),
            *("--model", str(self.prepared.model_dir)),
            *("--served-model-name", self.served_model_name, "--dtype", "bfloat16"),
            *("--max-model-len", str(self.max_model_len)),
            *("--max-num-seqs", str(self.max_num_seqs), "--enforce-eager"),
            "--enable-prompt-tokens-details",  # cached prompt tokens, for metering
            *("--host", self.host, "--port", str(port)),
        ]

    def _serves_model(self, client: httpx.Client, root: str) -> bool:
        try:
            if client.get(f"{root}/health").status_code != httpx.codes.OK:
                return False
            listing = client.get(f"{root}/v1/models")
            if listing.status_code != httpx.codes.OK:
                return False
            models = listing.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        return any(isinstance(m, dict) and m.get("id") == self.served_model_name for m in models)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _reap(processes: list[psutil.Process]) -> None:
    """Give what the server started a grace period to exit with it; kill what lingers."""
    lingering = _wait_gone(processes, _LEFTOVER_GRACE_S)
    for proc in lingering:
        logger.warning("killing pid %d that vLLM left behind", proc.pid)
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil refuses if the pid now belongs to another process
    _wait_gone(lingering, STOP_TIMEOUT_S)


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of `processes` runs (a zombie counts as gone); those that still do."""
    deadline = time.monotonic() + timeout_s
    while (running := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare`` the vLLM environment, or ``serve`` it in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m app.devstack.local_vllm", description="The local vLLM CPU server."
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="venv and model folder (default: $VLLM_CACHE_DIR or <repo>/.cache/vllm)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="install vLLM and convert the model (idempotent)")
    serve = commands.add_parser("serve", help="prepare, then serve until Ctrl-C")
    serve.add_argument("--port", type=int, default=None, help="default: a free port")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where vllm.log goes (default: $APP_DATA_DIR or .data)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness probe
    cache_dir: Path = args.cache_dir or default_cache_dir()
    try:
        prepared = prepare(cache_dir)
        print(f"vLLM python: {prepared.python}\nmodel folder: {prepared.model_dir}")
        if args.command == "prepare":
            return 0
        data_dir: Path = args.data_dir or Path(os.environ.get("APP_DATA_DIR") or ".data")
        with LocalVLLM(prepared, data_dir, port=args.port) as server:
            print(f"serving {server.served_model_name} at {server.base_url} (Ctrl-C stops)")
            print(f"log: {server.log}", flush=True)
            code = server.wait()
        print(f"vLLM exited with status {code}; end of {server.log}:\n{tail(server.log)}")
        return 1
    except (LocalVLLMError, EmbeddedServiceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
