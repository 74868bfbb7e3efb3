"""``tenantrag ingest``: push a folder into a knowledge base over the HTTP API.

It uses the public API with a tenant key (``ingest`` or ``admin`` scope), so it works the
same against ``make run`` and a remote deployment. Progress is shown with rich; the
summary lists what was ingested, skipped as a duplicate, or failed and why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

POLL_INTERVAL_S = 0.5


@dataclass
class IngestReport:
    """What happened to each file."""

    done: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def files_in(folder: Path) -> list[Path]:
    """Every non-hidden regular file under ``folder``, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class FolderIngester:
    """Uploads files one by one, then waits for each to be ready or failed."""

    def __init__(self, client: httpx.Client, kb_id: str, timeout_s: float) -> None:
        self.client = client
        self.docs_url = f"/v1/knowledge-bases/{kb_id}/documents"
        self.timeout_s = timeout_s

    def run(self, folder: Path, console: Console) -> IngestReport:
        """Upload all files under ``folder`` and wait for their processing."""
        report, pending = IngestReport(), {}
        files = files_in(folder)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            sent = progress.add_task("uploading", total=len(files))
            for path in files:
                name = str(path.relative_to(folder))
                outcome = self._upload(path, name)
                if isinstance(outcome, str):
                    report.failed.append((name, outcome))
                elif outcome["duplicate"]:
                    report.duplicates.append(name)
                else:
                    pending[outcome["id"]] = name
                progress.advance(sent)
            ready = progress.add_task("processing", total=len(pending))
            for name, status, error in self._wait(pending):
                (report.done.append(name) if status == "ready"
                 else report.failed.append((name, error or status)))
                progress.advance(ready)
        return report

    def _upload(self, path: Path, name: str) -> dict[str, Any] | str:
        try:
            with path.open("rb") as f:
                resp = self.client.post(self.docs_url, files={"file": (name, f)})
        except httpx.HTTPError as exc:
            return f"upload failed: {exc}"
        if resp.status_code in (200, 202):
            result: dict[str, Any] = resp.json()["data"][0]
            return result
        return _problem(resp)

    def _wait(self, pending: dict[str, str]) -> Iterator[tuple[str, str, str | None]]:
        deadline = time.monotonic() + self.timeout_s
        while pending:
            for doc_id, name in list(pending.items()):
                resp = self.client.get(f"{self.docs_url}/{doc_id}")
                doc = resp.json() if resp.status_code == 200 else {"status": _problem(resp)}
                if doc["status"] not in ("queued", "processing"):
                    del pending[doc_id]
                    yield name, doc["status"], doc.get("error")
            if pending and time.monotonic() > deadline:
                for name in pending.values():
                    yield name, "timed out waiting for processing", None
                return
            time.sleep(POLL_INTERVAL_S)


def print_summary(report: IngestReport, console: Console) -> None:
    """The final tally, and each failure with its reason."""
    console.print(f"[green]done: {len(report.done)}[/]  "
                  f"[yellow]skipped as duplicate: {len(report.duplicates)}[/]  "
                  f"[red]failed: {len(report.failed)}[/]")
    if report.failed:
        table = Table("file", "reason", title="failed")
        for name, reason in report.failed:
            table.add_row(name, reason)
        console.print(table)


def _problem(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return f"{resp.status_code} {body.get('code', '')}: {body.get('detail', '')}".strip()
    except ValueError:
        return f"HTTP {resp.status_code}"
