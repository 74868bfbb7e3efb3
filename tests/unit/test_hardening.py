"""The API and workers refuse inspection by their own user: a document parser (same
user) cannot read their environment, where the database URL and the pepper are."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import app.hardening

NOBODY = 65534
HOLDER = """
import sys, time
print(refuse_inspection("test") if sys.argv[1] == "refuse" else "plain", flush=True)
time.sleep(30)
"""


def environ_readable_by_its_user(refuse: bool) -> bool:
    """Start a process holding a secret as an unprivileged user, then read its
    ``/proc/<pid>/environ`` from another process of that user."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    source = Path(app.hardening.__file__).read_text() + HOLDER
    holder = subprocess.Popen([python, "-c", source, "refuse" if refuse else "plain"],
                              env={"SECRET_PEPPER": "s3cret"}, user=NOBODY, group=NOBODY,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == ("True" if refuse else "plain")
        reader = subprocess.run(
            [python, "-c", f"print(open('/proc/{holder.pid}/environ', 'rb').read())"],
            user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=30)
        if reader.returncode == 0:
            assert "s3cret" in reader.stdout
            return True
        assert "PermissionError" in reader.stderr, reader.stderr
        return False
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs two processes as another user")
def test_a_process_that_refuses_inspection_hides_its_environment_from_its_user() -> None:
    assert environ_readable_by_its_user(refuse=False)  # what Linux allows by default
    assert not environ_readable_by_its_user(refuse=True)
