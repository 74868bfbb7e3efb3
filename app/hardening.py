"""Process hardening at start-up: no same-user process may read this one.

The API and the workers hold the database URL, the key pepper and the store keys in
their environment and memory. Uploaded documents are parsed in child processes
(ingestion/isolated.py) that run as the same operating-system user: a parser exploited
by a hostile file could read ``/proc/<our pid>/environ`` or our memory, which Linux
allows a process of the same user. Marking this process non-dumpable (``prctl
PR_SET_DUMPABLE 0``) hands those files to root and refuses ``ptrace`` to everyone but
root; it also turns off core dumps (which would hold the same secrets). Children that
``exec`` (the parser helpers, PostgreSQL, vLLM) start dumpable again, which is harmless:
their environments hold none of our secrets.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4  # <linux/prctl.h>


def refuse_inspection(who: str) -> bool:
    """Make this process non-dumpable; True if it now is. Off Linux, or where the call
    is refused, it logs a warning once and returns False (the process still starts)."""
    if not sys.platform.startswith("linux"):
        log.warning("%s: not on Linux; other processes of this user may read its memory",
                    who)
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("%s: prctl(PR_SET_DUMPABLE) refused (errno %d): processes of this "
                    "user (document parsers) may read its environment", who,
                    ctypes.get_errno())
        return False
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
