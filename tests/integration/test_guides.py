"""The guides' examples run as written (docs/tenant-admin.md, docs/chat-ui.md and the
operator API part of docs/operations.md): their ``sh``, ``python`` and ``js`` blocks,
against the real app over HTTP, with a fake vLLM server generating. The lines that set
TENANTRAG_URL, TENANTRAG_API_KEY and TENANTRAG_ADMIN_KEY are replaced by the test's own
values; curl fails on any HTTP error. (``bash`` blocks are deployment commands: Docker,
kubectl, pg_dump; not run here.)"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.inference.dispatcher import Dispatcher
from app.settings import Settings
from tests.fake_openai import FakeConfig, FakeServer
from tests.support import (
    PLATFORM_KEY,
    bearer,
    create_key,
    create_tenant,
    install_dispatcher,
    one_pool,
    remove_dispatcher,
    served_over_http,
)
from tests.tools import required_tool

Client = AsyncTestClient[Litestar]
DOCS = Path(__file__).resolve().parents[2] / "docs"
_FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
_SETUP = re.compile(r"^export TENANTRAG_(URL|API_KEY|ADMIN_KEY)=.*$", re.M)
# In the scripts: any HTTP error fails the command (and the script).
_STRICT_CURL = 'curl() { command curl --fail-with-body "$@"; }\n'
FAQ = ("# Password reset\n\nOpen Settings > Security and choose \"Reset password\". "
       "A link is sent to your work email.\n")


def code_blocks(guide: str, language: str) -> str:
    """The guide's blocks in ``language``, in order, as one script."""
    text = (DOCS / guide).read_text()
    found = [body for lang, body in _FENCE.findall(text) if lang == language]
    assert found, f"{guide} has no {language} example"
    return _SETUP.sub("", "\n".join(found))


async def run(command: list[str], script: str, env: dict[str, str],
              cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` on ``command``'s standard input (the app serves meanwhile)."""
    full_env = {**os.environ, **env}
    return await asyncio.to_thread(
        subprocess.run, command, input=script, env=full_env, cwd=cwd, capture_output=True,
        text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def fake_vllm() -> Iterator[FakeServer]:
    """A fast generation server speaking vLLM's API."""
    server = FakeServer(FakeConfig(model="smollm2", completion_tokens=12)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def base_url(app: Litestar, client: Client, settings: Settings,
                   fake_vllm: FakeServer) -> AsyncIterator[str]:
    """The app over real HTTP, generating with the fake server."""
    before: Dispatcher | None = app.state.dispatcher
    d = await install_dispatcher(app, client, one_pool(fake_vllm.base_url), settings)
    try:
        async with served_over_http(app, client) as url:
            yield url
    finally:
        await remove_dispatcher(app, client, d)
        app.state.dispatcher = before


async def test_the_tenant_admin_guide_runs_top_to_bottom(
    client: Client, admin_headers: dict[str, str], base_url: str, tmp_path: Path,
) -> None:
    tenant = await create_tenant(client, admin_headers)
    key = (await create_key(client, admin_headers, tenant["id"],
                            ["admin", "chat", "ingest"]))["key"]
    script = "set -euo pipefail\n" + _STRICT_CURL + code_blocks("tenant-admin.md", "sh")
    result = await run(["bash"], script, {"TENANTRAG_URL": base_url,
                                          "TENANTRAG_API_KEY": key}, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "ready\n" in out  # the upload was processed (the loop echoes its status)
    assert "Reset password" in out  # the search found the uploaded FAQ
    assert "\nPassword reset\n" in out  # the FAQ's extracted text, sliced by offsets
    assert "user,requests" in out  # the CSV usage report's header
    assert "id,created_at,tenant_id,actor,action" in out  # the CSV audit log's header
    assert out.count(",key.revoked,api_key,") == 1  # the guide's revoke, in that CSV
    # What the guide changed is really there.
    auth = bearer(key)
    prompt = (await client.get("/v1/tenant/system-prompt", headers=auth)).json()
    assert prompt["text"].startswith("You are the Acme HR assistant") and prompt["version"]
    keys = (await client.get("/v1/keys", headers=auth)).json()["data"]
    revoked = {k["name"]: k["revoked_at"] is not None for k in keys}
    assert revoked == {"test": False, "chat backend": False, "nightly sync": True}
    chat_keys = [k for k in keys if k["name"] == "chat backend"]  # rotated: old and new
    assert sorted(k["expires_at"] is None for k in chat_keys) == [False, True]
    rules = (await client.get("/v1/tenant/content-rules", headers=auth)).json()
    assert rules["blocked_terms"] == ["Project Falcon"] and rules["disclaimer"]
    assert rules["blocked_patterns"] == [r"\b\d{3}-\d{2}-\d{4}\b"]
    origins = (await client.get("/v1/tenant/embed", headers=auth)).json()["cors_origins"]
    assert origins == ["http://localhost:5173", "https://intranet.acme.example"]


async def chat_tenant(client: Client, admin_headers: dict[str, str]) -> str:
    """A tenant whose knowledge base holds the FAQ (ready); its chat key."""
    tenant = await create_tenant(client, admin_headers)
    admin = bearer((await create_key(client, admin_headers, tenant["id"], ["admin"]))["key"])
    kb = (await client.post("/v1/knowledge-bases", json={"name": "help"},
                            headers=admin)).json()["id"]
    upload = await client.post(f"/v1/knowledge-bases/{kb}/documents", headers=admin,
                               files={"file": ("faq.md", FAQ.encode(), "text/markdown")})
    doc = upload.json()["data"][0]["id"]
    for _ in range(300):
        status = (await client.get(f"/v1/knowledge-bases/{kb}/documents/{doc}",
                                   headers=admin)).json()["status"]
        if status == "ready":
            break
        await asyncio.sleep(0.1)
    assert status == "ready"
    key: str = (await create_key(client, admin_headers, tenant["id"], ["chat"]))["key"]
    return key


async def test_the_chat_ui_guide_examples_answer_with_citations(
    client: Client, admin_headers: dict[str, str], base_url: str, tmp_path: Path,
) -> None:
    env = {"TENANTRAG_URL": base_url, "TENANTRAG_API_KEY": await chat_tenant(client,
                                                                            admin_headers)}
    python = await run([sys.executable, "-"], code_blocks("chat-ui.md", "python"), env, tmp_path)
    assert python.returncode == 0, python.stderr[-3000:]
    assert "] faq.md, page None, characters" in python.stdout  # a printed citation
    assert "sources: ['faq.md']" in python.stdout  # the stream's first chunk
    assert "tokens]" in python.stdout and "messages in this one" in python.stdout

    shell = await run(["bash"], "set -euo pipefail\n" + _STRICT_CURL
                      + code_blocks("chat-ui.md", "sh"), env, tmp_path)
    assert shell.returncode == 0, shell.stderr[-3000:]
    assert '"citations":[{' in shell.stdout and shell.stdout.rstrip().endswith("data: [DONE]")
    assert "embed answer: stop ['faq.md']" in shell.stdout  # a browser's token chatted

    node = required_tool("node", "apt-get install nodejs")
    js = await run([node, "--input-type=module"], code_blocks("chat-ui.md", "js"), env,
                   tmp_path)
    assert js.returncode == 0, js.stderr[-3000:]
    assert "sources: faq.md" in js.stdout


async def test_the_operator_guide_api_examples_run(base_url: str, tmp_path: Path) -> None:
    script = "set -euo pipefail\n" + _STRICT_CURL + code_blocks("operations.md", "sh")
    result = await run(["bash"], script, {"TENANTRAG_URL": base_url,
                                          "TENANTRAG_ADMIN_KEY": PLATFORM_KEY}, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    patched, suspended, activated, pools, usage, audit, quarantine = json_values(result.stdout)
    assert patched["slug"] == "initech" and suspended["id"] == patched["id"]
    assert patched["tier"] == "enterprise" and patched["allow_spillover"] is True
    assert patched["monthly_token_budget"] == 50_000_000
    assert (suspended["status"], activated["status"]) == ("suspended", "active")
    assert [p["name"] for p in pools] == ["default"]  # the test's pool of the fake server
    assert usage["group_by"] == "tenant"
    assert [e["action"] for e in audit["data"]] == [
        "tenant.activated", "tenant.suspended", "tenant.updated", "tenant.created"]
    assert isinstance(quarantine["data"], list) and "next_before" in quarantine


def json_values(text: str) -> list[Any]:
    """The JSON documents printed one after another (curl adds no newline)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values
