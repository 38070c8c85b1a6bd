"""Tell systemd (`Type=notify`) where the relay is: ready, reloading, stopping.

With `Type=notify` systemd considers the service started only when it says `READY=1`, so
`systemctl start relay` returns (and units ordered after it start) once the SMTP port
answers, not when the process merely exists. The protocol (sd_notify(3)): newline-separated
`KEY=VALUE` lines in one datagram to the unix socket named by `$NOTIFY_SOCKET`; a name
starting with "@" is in the abstract namespace (a leading NUL byte). Without the variable
(a shell, a container, the tests) every call here does nothing.

Who sends: the process systemd started (the unit says `NotifyAccess=main`). With several
workers that is the supervisor, which says READY=1 once every worker is listening; workers
drop the variable at fork so that none of them can speak for the whole relay.

A notification that cannot be delivered is logged and otherwise ignored: systemd going
away must never stop the relay from serving mail.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("relay.app")

ENV = "NOTIFY_SOCKET"


def notify(*lines: str) -> bool:
    """Send `lines` ("READY=1", "STATUS=...") as one notification; False if none was sent."""
    address = os.environ.get(ENV)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        log.warning("cannot notify systemd through %s: %s", os.environ.get(ENV), exc)
        return False
    return True


def forget() -> None:
    """Stop this process (a worker) and its children from notifying for the service."""
    os.environ.pop(ENV, None)


def ready(status: str = "") -> bool:
    """Startup, or a reload, is complete: the relay serves with its (new) config."""
    return notify("READY=1", *_status(status))


def reloading(status: str = "") -> bool:
    """A reload begins. systemd (253+) needs the monotonic time with RELOADING=1 to match
    it with the `systemctl reload` that asked for it; send `ready()` when it is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))


def stopping(status: str = "") -> bool:
    """Shutdown has begun (the drain may take a while: systemd shows "deactivating")."""
    return notify("STOPPING=1", *_status(status))


def status(text: str) -> bool:
    """A one-line state for `systemctl status`."""
    return notify(*_status(text))


def _status(text: str) -> list[str]:
    # One line only: a newline would start a new KEY=VALUE assignment.
    return [f"STATUS={' '.join(text.split())}"] if text else []
