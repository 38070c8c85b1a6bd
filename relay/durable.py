"""Files that are complete on disk before anyone is told they exist.

Used wherever the relay hands a message (or a key) to the file system: the maildir
upstream, the inbound maildir and directory destinations, and `relay dkim keygen`. A
file is created exclusively (never replacing one), written in full and fsynced; Maildir
delivery then renames it from tmp/ into new/ and fsyncs new/, so a reader never sees half
a message and a crash leaves nothing in new/.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
from pathlib import Path

_HOST = socket.gethostname().replace("/", "_").replace(":", "_")
_deliveries = itertools.count(1)


def write_new(path: Path, data: bytes, *, mode: int = 0o640) -> None:
    """Create `path` (FileExistsError if it exists), write all of `data`, fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a new name in `directory` (a create, rename or link) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def deliver_to_maildir(maildir: Path, data: bytes) -> str:
    """Write `data` into the Maildir `maildir` (which must exist); returns the file name,
    unique by time, process, a counter and randomness (the Maildir convention)."""
    name = f"{time.time_ns()}.P{os.getpid()}Q{next(_deliveries)}R{secrets.token_hex(4)}.{_HOST}"
    write_new(maildir / "tmp" / name, data)
    os.rename(maildir / "tmp" / name, maildir / "new" / name)
    fsync_dir(maildir / "new")
    return name
