"""Ids that must be unique, not secret: request, response and lease ids.

``uuid.uuid4()`` reads the operating system's randomness (a system call) for each; these
come from the process's seeded generator (reseeded in a forked child), 128 random bits
as 32 hex digits, at a fraction of the cost. Nothing that guards access uses them (API
keys and embed tokens come from :mod:`secrets`).
"""

from __future__ import annotations

import random


def new_id() -> str:
    """32 random hex digits (the module's generator, which a forked child reseeds)."""
    return f"{random.getrandbits(128):032x}"
