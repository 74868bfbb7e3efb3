"""Parsing in child processes: hostile files end in a clear refusal, within the time and
memory limits, and the parser keeps serving other files meanwhile and afterwards."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from ingestion import (
    CorruptDocumentError,
    IngestionError,
    IsolatedParser,
    ParsedDocument,
    ProcessLimits,
    UnsafeDocumentError,
    parse_document,
    parse_worker,
)
from tests.files import make_blank_pdf, make_docx_bomb, make_pdf_bomb, make_spinning_pdf
from tests.unit.test_ingestion_samples import SAMPLES

SMALL = b"The LEMUR room is on floor 3.\n\nBook it at the front desk.\n"


@pytest.fixture
def parser() -> Iterator[IsolatedParser]:
    """A parser with a short deadline and the default memory limit (1024 MiB)."""
    isolated = IsolatedParser(process_limits=ProcessLimits(timeout_s=3), max_processes=2)
    yield isolated
    isolated.close()


_OTHERS: set[int] = set()  # helpers of other parsers in this process (the suite's app)


def _all_helpers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children()
            if "ingestion.parse_worker" in " ".join(p.cmdline())]


@pytest.fixture(autouse=True)
def _others_helpers() -> None:
    """Helpers that existed before the test are not its parser's (in a full run, the
    session's app has a parser of its own)."""
    _OTHERS.clear()
    _OTHERS.update(p.pid for p in _all_helpers())


def helper_processes() -> list[psutil.Process]:
    """The helper processes of the parser under test."""
    return [p for p in _all_helpers() if p.pid not in _OTHERS]


def parsing_child(within_s: float = 10) -> psutil.Process:
    """The process parsing a file right now (a child of one of our helpers)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for helper in helper_processes():
            if children := helper.children():
                return children[0]
        time.sleep(0.02)
    raise AssertionError("no file is being parsed")


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_parses_exactly_as_in_process(parser: IsolatedParser, name: str) -> None:
    data, fmt = SAMPLES[name]
    assert parser.parse(data, fmt) == parse_document(data, fmt)


def test_files_parse_concurrently_and_helpers_are_reused(parser: IsolatedParser) -> None:
    files = [(f"Room {i} is on floor {i % 7}.".encode(), "text") for i in range(40)]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda f: parser.parse(*f).text, files))
    assert texts == [data.decode() for data, _ in files]
    assert 1 <= len(helper_processes()) <= 2  # max_processes, not one per file


def test_refusals_of_the_parsers_come_back_unchanged(parser: IsolatedParser) -> None:
    with pytest.raises(CorruptDocumentError, match="unreadable PDF"):
        parser.parse(b"%PDF-1.7\n" + b"\x13\x37garbage" * 100, "pdf")
    with pytest.raises(UnsafeDocumentError, match="inflate"):
        parser.parse(make_docx_bomb(), "docx")
    with pytest.raises(UnsafeDocumentError, match="nested deeper than 400"):
        parser.parse(("<div>" * 100_000 + "deep" + "</div>" * 100_000).encode(), "html")
    with pytest.raises(UnsafeDocumentError, match="3000 pages; the limit is 2000"):
        parser.parse(make_blank_pdf(3000), "pdf")


def test_a_pdf_compression_bomb_stops_at_the_memory_limit() -> None:
    bomb = make_pdf_bomb()  # 20 pages of 70 MiB each, from a file of about 1.4 MB
    assert len(bomb) < 2 * 2**20
    isolated = IsolatedParser()  # the defaults: 60 s, 1024 MiB
    try:
        started = time.monotonic()
        with pytest.raises(UnsafeDocumentError, match="parsing needed more than 1024 MiB"):
            isolated.parse(bomb, "pdf")
        assert time.monotonic() - started < 30  # stopped by memory, long before the deadline
        assert isolated.parse(SMALL, "text").text.startswith("The LEMUR room")
    finally:
        isolated.close()


def test_html_that_balloons_in_libxml2_stops_at_the_memory_limit() -> None:
    isolated = IsolatedParser(process_limits=ProcessLimits(memory_bytes=256 * 2**20))
    try:  # 3 million empty paragraphs: 9 MB of HTML, several hundred MiB of tree
        with pytest.raises(UnsafeDocumentError, match="needed more than 256 MiB"):
            isolated.parse(b"<html><body>" + b"<p>" * 3_000_000, "html")
    finally:
        isolated.close()


def test_a_pdf_that_makes_the_parser_spin_is_killed_at_the_deadline(
    parser: IsolatedParser,
) -> None:
    spinning = make_spinning_pdf()  # 2000 pages of empty text operators: hours of work
    assert len(spinning) < 2**20
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        parse = pool.submit(parser.parse, spinning, "pdf")
        child = parsing_child()
        helpers = {helper.pid for helper in helper_processes()}
        with pytest.raises(UnsafeDocumentError, match="parsing took longer than 3 s"):
            parse.result()
    assert 3 <= time.monotonic() - started < 3 + 2
    assert not child.is_running()  # killed and reaped, not left spinning or a zombie
    assert {helper.pid for helper in helper_processes()} == helpers  # the helper stays
    assert parser.parse(SMALL, "text").text.startswith("The LEMUR room")


def test_other_files_are_served_while_one_spins(parser: IsolatedParser) -> None:
    with ThreadPoolExecutor(1) as spinner:
        stuck = spinner.submit(parser.parse, make_spinning_pdf(), "pdf")
        parsing_child()
        started = time.monotonic()
        for i in range(10):
            assert parser.parse(f"Note {i}".encode(), "text").text == f"Note {i}"
        assert time.monotonic() - started < 2 and not stuck.done()
        with pytest.raises(UnsafeDocumentError, match="longer than 3 s"):
            stuck.result()


def test_the_parsing_child_is_the_first_the_kernel_kills_when_memory_runs_out(
    parser: IsolatedParser,
) -> None:
    with ThreadPoolExecutor(1) as pool:
        parse = pool.submit(parser.parse, make_spinning_pdf(), "pdf")
        child = parsing_child()
        with open(f"/proc/{child.pid}/oom_score_adj") as adj:
            assert adj.read().strip() == "1000"
        with open(f"/proc/{child.parent().pid}/oom_score_adj") as adj:  # type: ignore[union-attr]
            assert adj.read().strip() != "1000"  # the helper, which outlives the file
        with pytest.raises(UnsafeDocumentError):
            parse.result()


@pytest.mark.parametrize(("sent", "reason"), [
    (signal.SIGSEGV, r"the parser crashed on this file \(SIGSEGV\)"),
    (signal.SIGKILL, "parsing needed more than 1024 MiB"),  # what the OOM killer sends
])  # fmt: skip
def test_a_parser_process_that_dies_fails_the_file_with_a_reason(
    parser: IsolatedParser, sent: signal.Signals, reason: str
) -> None:
    with ThreadPoolExecutor(1) as pool:
        parse = pool.submit(parser.parse, make_spinning_pdf(), "pdf")
        parsing_child().send_signal(sent)
        with pytest.raises(IngestionError, match=reason):
            parse.result(timeout=10)
    assert parser.parse(SMALL, "text").text.startswith("The LEMUR room")


@pytest.mark.parametrize("name", ["pdf", "docx", "html"])
def test_damaged_files_are_parsed_or_refused_never_anything_else(
    parser: IsolatedParser, name: str
) -> None:
    data, fmt = SAMPLES[name]
    rng = random.Random(name)  # noqa: S311 - reproducible damage, not secrets
    refused = 0
    for _ in range(40):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 30)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        damaged = damaged[: rng.randint(len(damaged) // 2, len(damaged))]
        try:
            assert isinstance(parser.parse(bytes(damaged), fmt), ParsedDocument)
        except IngestionError:
            refused += 1
    assert refused > 0  # the damage was real


def test_close_ends_the_helper_processes() -> None:
    isolated = IsolatedParser(max_processes=3)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: isolated.parse(SMALL, "text"), range(9)))
    helpers = helper_processes()
    assert helpers
    isolated.close()
    assert not any(helper.is_running() for helper in helpers)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ProcessLimits(timeout_s=0)
    with pytest.raises(ValueError, match="at least 1"):
        IsolatedParser(max_processes=0)


# --- the sandbox: no settings, no network, no pickle ----------------------------------

OUR_SECRETS = {"DATABASE_URL": "postgresql://owner:hunter2@db/app",
               "AUTH_KEY_PEPPER": "pepper-" * 6, "QDRANT_API_KEY": "qdrant-secret",
               "AUTH_EMBED_SIGNING_KEY": "embed-" * 6}


def test_parsing_children_get_none_of_our_settings(
    parser: IsolatedParser, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in OUR_SECRETS.items():
        monkeypatch.setenv(name, value)
    with ThreadPoolExecutor(1) as pool:
        parse = pool.submit(parser.parse, make_spinning_pdf(), "pdf")
        child = parsing_child()
        seen = {"child": child.environ(), "helper": child.parent().environ()}  # type: ignore[union-attr]
        with pytest.raises(UnsafeDocumentError):
            parse.result()
    for who, env in seen.items():
        assert set(env) <= {"PYTHONPATH", "PATH", "LC_ALL", "PYTHONNOUSERSITE", "TMPDIR"}, who
        assert not any(v in value for v in OUR_SECRETS.values() for value in env.values())


def test_parsing_children_cannot_reach_the_network(
    parser: IsolatedParser, caplog: pytest.LogCaptureFixture,
) -> None:
    if subprocess.run(["unshare", "-n", "true"], check=False).returncode != 0:
        pytest.skip("this kernel refuses network namespaces here (see the degraded test)")
    listener = socket.create_server(("127.0.0.1", 0))  # something to reach on our side
    port = listener.getsockname()[1]
    probe = (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); "
             "print('connected')")
    with caplog.at_level(logging.INFO, "ingestion.isolated"), listener, \
            ThreadPoolExecutor(2) as pool:
        parse = pool.submit(parser.parse, make_spinning_pdf(), "pdf")
        child = parsing_child()
        ours, theirs = (os.readlink(f"/proc/{pid}/ns/net") for pid in ("self", child.pid))
        assert ours != theirs
        # A connection from the child's network namespace: loopback there is down.
        inside = subprocess.run(["nsenter", f"--net=/proc/{child.pid}/ns/net", sys.executable,
                                 "-c", probe], capture_output=True, text=True, check=False)
        outside = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                 text=True, check=False)
        assert outside.stdout.strip() == "connected"
        assert inside.returncode != 0 and "Network is unreachable" in inside.stderr
        list(pool.map(lambda _: parser.parse(SMALL, "text"), range(6)))
        with pytest.raises(UnsafeDocumentError):
            parse.result()
    said = [r.getMessage() for r in caplog.records if "network" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("document parsers have no network")


def test_where_the_kernel_refuses_a_namespace_parsing_goes_on_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def refused(_: int) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(parse_worker, "_unshare", refused)
    sandbox = parse_worker.cut_off_network()
    assert not sandbox.network_isolated and "Operation not permitted" in sandbox.detail
    isolated = IsolatedParser()
    with caplog.at_level(logging.INFO, "ingestion.isolated"):
        for _ in range(3):
            isolated._log_sandbox(sandbox)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "NOT cut off from the network" in caplog.records[0].getMessage()


class _Exploit:
    """What a parser taken over by a hostile file could send: unpickling it runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_forged_pickle_on_the_result_pipe_is_refused_not_run(
    parser: IsolatedParser, tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    forged = pickle.dumps(_Exploit(marker))
    with ThreadPoolExecutor(1) as pool:
        parse = pool.submit(parser.parse, make_spinning_pdf(), "pdf")
        helper = parsing_child().parent()
        assert helper is not None
        results_fd = helper.cmdline()[-1]  # the helper's end of the results pipe
        # Write on that pipe as the helper would: a length-prefixed message.
        pipe = os.open(f"/proc/{helper.pid}/fd/{results_fd}", os.O_WRONLY)
        try:
            os.write(pipe, struct.pack("!i", len(forged)) + forged)
        finally:
            os.close(pipe)
        with pytest.raises(CorruptDocumentError, match="unreadable answer"):
            parse.result(timeout=10)
    assert not marker.exists()
    assert not helper.is_running()  # a helper that sent that gets no further file
    assert parser.parse(SMALL, "text").text.startswith("The LEMUR room")
