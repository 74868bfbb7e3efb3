"""``tenantrag dev`` (what ``make run`` starts), driven as a person would from a terminal.

Start it with no settings, use the printed admin key, manage tenants from a second
terminal, upload and ask, press Ctrl-C, check nothing is left running, start again on the
same data. The first start uses the session's vLLM server (``LLM_BASE_URL``) to save a
minute; the restart starts its own local vLLM server, as a newcomer's ``make run`` does.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.auth.embed import EmbedTokenSigner
from app.settings import DEV_KEY_PEPPER

CLI = [sys.executable, "-m", "app"]
STARTUP_TIMEOUT_S = 300  # includes starting a local vLLM server (about a minute)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A terminal with none of our settings, as on a newcomer's machine."""
    ours = ("DATABASE_", "REDIS_", "QDRANT_", "AUTH_", "APP_", "WORKER_", "LLM_", "CHAT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env["APP_DATA_DIR"] = str(data_dir)
    return {**env, **extra}


def processes_using(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions ``folder`` (postgres -D, redis --dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            mentions = any(str(folder) in part for part in proc.info["cmdline"] or [])
            if mentions and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class DevServer:
    """A running ``tenantrag dev`` child process and what it printed."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"dev-{self.port}.log"
        self.proc = subprocess.Popen(
            [*CLI, "dev", "--port", str(self.port)], env=clean_env(data_dir, **env),
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> str:
        """Wait for /readyz; return the admin key the command printed."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"dev server not ready:\n{self.log.read_text()}")
        out = self.log.read_text()
        assert f"base URL:            {self.base}" in out
        assert f"{self.base}/docs" in out
        match = re.search(r"platform admin key:\s+(\S+)", out)
        assert match, out
        return match.group(1)

    def interrupt(self) -> int:
        """Ctrl-C, as a person would press it; the exit code. Every process it started
        (PostgreSQL, Redis, vLLM and their children) must be gone afterwards."""
        started = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=90)
        _gone, alive = psutil.wait_procs(started, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        return code


@pytest.fixture
def data_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="tenantrag-dev-"))  # see conftest: not pytest's tmp
    folder = root / "data"
    yield folder
    for proc in processes_using(folder):  # never leave a stray server behind a failed test
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)


def run_cli(data_dir: Path, *args: str, expect: int = 0) -> str:
    done = subprocess.run([*CLI, *args], env=clean_env(data_dir), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == expect, done.stdout + done.stderr
    return done.stdout


def ingest_folder(server: DevServer, data_dir: Path, key: str) -> None:
    """``tenantrag ingest`` against the running server: progress, then a summary."""
    auth = {"Authorization": f"Bearer {key}"}
    kb = httpx.post(f"{server.base}/v1/knowledge-bases", headers=auth, json={"name": "docs"})
    assert kb.status_code == 201, kb.text
    folder = data_dir.parent / "to-ingest"
    (folder / "sub").mkdir(parents=True)
    (folder / "faq.md").write_text("# FAQ\n\nThe GIRAFFE badge opens door 7.\n")
    (folder / "sub" / "notes.txt").write_text("Lunch is served at noon.\n")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    args = ("ingest", str(folder), "--kb", kb.json()["id"], "--key", key, "--url", server.base)
    out = run_cli(data_dir, *args, expect=1)
    assert "done: 2" in out and "skipped as duplicate: 0" in out and "failed: 1" in out, out
    assert "photo.png" in out and "415" in out
    again = run_cli(data_dir, *args, expect=1)
    assert "done: 0" in again and "skipped as duplicate: 2" in again, again
    hits = httpx.post(f"{server.base}/v1/retrieve", headers=auth, json={"query": "GIRAFFE badge"})
    assert hits.json()["data"][0]["filename"] == "faq.md"


def ask(server: DevServer, key: str, question: str) -> dict[str, Any]:
    """A chat request as a chat UI sends it."""
    resp = httpx.post(f"{server.base}/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "smollm2", "max_tokens": 24,
                            "messages": [{"role": "user", "content": question}]})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_dev_starts_serves_stops_and_restarts_on_same_data(
    data_dir: Path, llm_base_url: str,
) -> None:
    server = DevServer(data_dir, LLM_BASE_URL=llm_base_url)
    admin_key = server.wait_ready()
    headers = {"Authorization": f"Bearer {admin_key}"}
    assert httpx.get(f"{server.base}/admin/tenants", headers=headers).status_code == 200

    out = run_cli(data_dir, "tenants", "create", "acme", "Acme Corp", "--tier", "pro",
                  "--model", "smollm2")
    assert "created tenant acme" in out
    key = re.search(r"key:\s+(trk_\S+)", run_cli(
        data_dir, "keys", "create", "acme", "--scope", "chat", "--scope", "ingest",
        "--scope", "admin"))
    assert key, "no key printed"
    ingest_folder(server, data_dir, key.group(1))
    models = httpx.get(f"{server.base}/v1/models",
                       headers={"Authorization": f"Bearer {key.group(1)}"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "smollm2"
    answer = ask(server, key.group(1), "Which door does the GIRAFFE badge open?")
    assert answer["citations"][0]["filename"] == "faq.md", answer
    assert answer["usage"]["completion_tokens"] > 0

    assert server.interrupt() == 0, server.log.read_text()
    time.sleep(1)
    assert processes_using(data_dir) == []

    again = DevServer(data_dir)  # no settings at all: starts its own vLLM server
    assert again.wait_ready() == admin_key
    assert "generation server:   http://127.0.0.1:" in again.log.read_text()
    assert "acme" in run_cli(data_dir, "tenants", "list")
    assert httpx.get(f"{again.base}/v1/models",
                     headers={"Authorization": f"Bearer {key.group(1)}"}).status_code == 200
    answer = ask(again, key.group(1), "Which door does the GIRAFFE badge open?")
    assert answer["citations"] and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert again.interrupt() == 0
    time.sleep(1)
    assert processes_using(data_dir) == []


def test_dev_stack_secrets_are_its_own_so_public_default_tokens_are_refused(
    data_dir: Path,
) -> None:
    server = DevServer(data_dir, LLM_START_LOCAL="false")  # no generation needed here
    admin = {"Authorization": f"Bearer {server.wait_ready()}"}
    tenant = httpx.post(f"{server.base}/admin/tenants", headers=admin,
                        json={"slug": "acme", "name": "Acme", "tier": "pro"}).json()
    key = re.search(r"key:\s+(trk_\S+)", run_cli(data_dir, "keys", "create", "acme",
                                                   "--scope", "chat", "--scope", "admin"))
    assert key, "no key printed"  # minted by another process: it hashes with the same pepper
    backend = {"Authorization": f"Bearer {key.group(1)}"}
    key_id = httpx.get(f"{server.base}/admin/tenants/{tenant['id']}/keys",
                       headers=admin).json()["data"][0]["id"]
    kb = httpx.post(f"{server.base}/v1/knowledge-bases", headers=backend,
                    json={"name": "help"}).json()["id"]
    minted = httpx.post(f"{server.base}/v1/embed-tokens", headers=backend,
                        json={"user": "ann", "knowledge_base_ids": [kb]})
    assert minted.status_code == 201, minted.text
    browser = {"Authorization": f"Bearer {minted.json()['token']}"}
    assert httpx.get(f"{server.base}/v1/models", headers=browser).status_code == 200
    # A token signed with the key the source code used to default to is a forgery now.
    public = EmbedTokenSigner(hashlib.sha256(b"embed-tokens:" + DEV_KEY_PEPPER.encode()).digest())
    forged, _ = public.mint(uuid.UUID(tenant["id"]), uuid.UUID(key_id), "ann",
                            [uuid.UUID(kb)], timedelta(minutes=5))
    resp = httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status_code == 401 and "signature" in resp.json()["detail"], resp.text
    assert server.interrupt() == 0
    # The restart reuses the folder's secrets: the key and the token still work.
    again = DevServer(data_dir, LLM_START_LOCAL="false")
    again.wait_ready()
    assert httpx.get(f"{again.base}/v1/models", headers=backend).status_code == 200
    assert httpx.get(f"{again.base}/v1/models", headers=browser).status_code == 200
    assert again.interrupt() == 0
