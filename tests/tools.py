"""External command-line tools some tests need: skipped locally when missing, a failure
in CI (``CI=true``), where ``.ci/run`` installs them."""

from __future__ import annotations

import os
import shutil

import pytest


def required_tool(name: str, install_hint: str) -> str:
    """The path of ``name``; skip the test without it, or fail when running in CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed ({install_hint})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; .ci/run should have installed it")
    pytest.skip(message)
