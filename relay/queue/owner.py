"""Who holds a lease: `node:pid:start time`, and whether that process still runs.

A pid alone is not an identity: pids are reused, and a killed worker whose parent died
stays a zombie under an init that does not reap, which kill(pid, 0) still reports as alive.
The node part is the host name unless `server.node` names the relay otherwise (containers
that all call themselves the same, or several relays on one machine acting as hosts).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def node_name(configured: str = "") -> str:
    return configured or socket.gethostname()


def owner_id(node: str = "") -> str:
    return f"{node_name(node)}:{os.getpid()}:{_proc_start(os.getpid()) or 0}"


def process_alive(owner: str, *, node: str = "") -> bool:
    """Is the process named in a lease owner id still running? Another node's processes
    can't be seen from here: assume so, and let the lease's expiry decide."""
    host, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != node_name(node) or not pid_text.isdigit():
        return True
    if not Path("/proc/self/stat").exists():  # no procfs: fall back to signal 0
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _proc_start(int(pid_text)) == started
