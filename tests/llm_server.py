"""Pytest plugin: one OpenAI-compatible LLM server for the whole test session.

Register it with ``pytest_plugins = ["tests.llm_server"]``. ``llm_base_url`` is
``LLM_BASE_URL`` when that is set (a server someone else runs). Otherwise the first test
that asks for it prepares the local vLLM CPU environment (``VLLM_CACHE_DIR``, default
``<repo>/.cache/vllm``; minutes the very first time, instant after) and starts one
`LocalVLLM` (about 50 s), which serves every test and is stopped at the end of the session.
Its ``vllm.log`` lies in a temporary folder, removed at the end, kept if the start failed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from app.devstack.local_vllm import LocalVLLM, default_cache_dir, prepare


@pytest.fixture(scope="session")
def local_vllm_server() -> Iterator[LocalVLLM | None]:
    """The session's local vLLM server, or None when ``LLM_BASE_URL`` names one."""
    if os.environ.get("LLM_BASE_URL"):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="tenantrag-vllm-"))
    server = LocalVLLM(prepare(default_cache_dir()), folder)
    server.start()  # on failure it has stopped the child; the folder keeps vllm.log
    processes = _process_tree(server)
    try:
        yield server
    finally:
        server.stop()
        server.stop()  # idempotent
        shutil.rmtree(folder, ignore_errors=True)
    left = [p.pid for p in processes if _running(p)]
    assert not left, f"the local vLLM server left processes behind: {left}"


@pytest.fixture(scope="session")
def llm_base_url(local_vllm_server: LocalVLLM | None) -> str:
    """Base URL (ending in ``/v1``) of the session's OpenAI-compatible server."""
    if local_vllm_server is None:
        return os.environ["LLM_BASE_URL"].rstrip("/")
    return local_vllm_server.base_url


def _process_tree(server: LocalVLLM) -> list[psutil.Process]:
    """The server process and everything it started, as psutil handles (safe on pid reuse)."""
    if server.pid is None:
        return []
    try:
        root = psutil.Process(server.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
