"""The local vLLM CPU server: its OpenAI-compatible API, and its process lifecycle.

The API tests share the session's one real server (``tests.llm_server``). The lifecycle
tests run `LocalVLLM` on a stand-in server script (seconds instead of a 50 s start) that
serves ``/health`` and ``/v1/models`` and, like vLLM, starts a child process of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.devstack.local_vllm import SERVED_MODEL_NAME, LocalVLLM, LocalVLLMError, PreparedVLLM

MESSAGES = [{"role": "user", "content": "Name one colour of the rainbow."}]


@pytest.fixture(scope="module")
def llm(llm_base_url: str) -> Iterator[httpx.Client]:
    """An HTTP client on the server's root (``/v1/...`` and vLLM's own ``/tokenize``)."""
    with httpx.Client(base_url=llm_base_url.removesuffix("/v1"), timeout=120.0) as client:
        yield client


def test_models_lists_smollm2_with_its_context_window(llm: httpx.Client) -> None:
    listing = llm.get("/v1/models")

    assert listing.status_code == 200
    models = {m["id"]: m for m in listing.json()["data"]}
    assert models[SERVED_MODEL_NAME]["max_model_len"] == 2048


def test_chat_completion_reports_usage(llm: httpx.Client) -> None:
    body = {"model": SERVED_MODEL_NAME, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}

    reply = llm.post("/v1/chat/completions", json=body)

    assert reply.status_code == 200, reply.text
    completion = reply.json()
    usage = completion["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    choice = completion["choices"][0]
    assert choice["finish_reason"] in {"stop", "length"}
    assert choice["message"]["role"] == "assistant"


def test_streamed_chat_ends_with_usage_then_done(llm: httpx.Client) -> None:
    body = {
        "model": SERVED_MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    with llm.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        events = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]

    assert events[-1] == "[DONE]"
    chunks: list[dict[str, Any]] = [json.loads(event) for event in events[:-1]]
    last = chunks[-1]
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] in {"stop", "length"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text


def test_tokenize_counts_a_chat_prompt_as_the_completion_does(llm: httpx.Client) -> None:
    counted = llm.post("/tokenize", json={"model": SERVED_MODEL_NAME, "messages": MESSAGES})
    completion = llm.post(
        "/v1/chat/completions",
        json={"model": SERVED_MODEL_NAME, "messages": MESSAGES, "max_tokens": 1},
    )

    assert counted.status_code == 200, counted.text
    tokens = counted.json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["count"] == completion.json()["usage"]["prompt_tokens"]


def test_metrics_are_served(llm: httpx.Client) -> None:
    metrics = llm.get("/metrics")

    assert metrics.status_code == 200
    assert "vllm:" in metrics.text


# --- lifecycle, on a stand-in server -------------------------------------------------

_STAND_IN = """
import argparse, json, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

mode = sys.argv.pop(1)
parser = argparse.ArgumentParser()
for flag in ("-m", "--model", "--host", "--served-model-name"):
    parser.add_argument(flag)
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
if mode == "crash":
    sys.exit("stand-in: no model here")
if mode == "hang":
    time.sleep(600)
# like vLLM's engine core; unlike vLLM, this stand-in leaves it behind when terminated
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        models = {"data": [{"id": args.served_model_name, "max_model_len": 2048}]}
        bodies = {"/health": b"", "/v1/models": json.dumps(models).encode()}
        if self.path not in bodies:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-length", str(len(bodies[self.path])))
        self.end_headers()
        self.wfile.write(bodies[self.path])

HTTPServer((args.host, args.port), Handler).serve_forever()
"""


def _stand_in(folder: Path, mode: str) -> PreparedVLLM:
    """A `PreparedVLLM` whose "python" runs the stand-in server in `mode`."""
    script = folder / "stand_in.py"
    script.write_text(_STAND_IN)
    python = folder / f"python-{mode}"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" {mode} "$@"\n')
    python.chmod(0o755)
    return PreparedVLLM(python=python, model_dir=folder)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_leaves_no_process_behind_and_is_idempotent(tmp_path: Path) -> None:
    server = LocalVLLM(_stand_in(tmp_path, "serve"), tmp_path / "data")

    with server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/v1")
        assert server.pid is not None
        root = psutil.Process(server.pid)
        tree = [root, *root.children(recursive=True)]
        assert len(tree) == 2  # the server and its "engine"
        assert httpx.get(f"{server.base_url}/models").json()["data"][0]["id"] == "smollm2"
        assert server.start() == server.base_url  # already running: same server
        assert server.pid == root.pid
        with pytest.raises(RuntimeError, match="held by another live process"):
            LocalVLLM(server.prepared, server.data_dir).start()  # one server per folder

    assert [p.pid for p in tree if _running(p)] == []
    assert server.pid is None
    server.stop()  # idempotent
    with pytest.raises(LocalVLLMError, match="not started"):
        _ = server.base_url


def test_a_server_that_exits_during_start_raises_with_its_log(tmp_path: Path) -> None:
    server = LocalVLLM(_stand_in(tmp_path, "crash"), tmp_path / "data")

    for _ in range(2):  # the folder lock is released after a failed start
        with pytest.raises(LocalVLLMError, match=r"(?s)exited with status 1.*no model here"):
            server.start()
        assert server.pid is None


def test_a_server_that_never_answers_is_stopped_after_the_timeout(tmp_path: Path) -> None:
    server = LocalVLLM(_stand_in(tmp_path, "hang"), tmp_path / "data", start_timeout_s=1.0)

    with pytest.raises(LocalVLLMError, match="was not ready within 1 s"):
        server.start()

    assert server.pid is None


def test_the_module_command_line_documents_both_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.devstack.local_vllm", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )

    assert "prepare" in done.stdout
    assert "serve" in done.stdout
