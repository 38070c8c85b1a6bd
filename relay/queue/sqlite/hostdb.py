"""A small SQLite file every worker process of a host shares, beside the shards.

`routing.db` (breakers, health, counters: they heal if lost, so no fsync) and `shared.db`
(suppression list, webhook outbox, replay guard: they must survive a crash) are both this:
one connection per process, one transaction at a time, run off the event loop, a SQLite
error reported as StoreError naming the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from relay.queue.base import StoreError
from relay.queue.sqlite.store import transaction

T = TypeVar("T")


def use_wal(conn: sqlite3.Connection, tries: int = 50) -> None:
    """WAL mode is a property of the file: the first process sets it. Workers starting
    together race for the lock that setting it takes, and SQLite answers "locked" at once
    instead of waiting, so try again for a moment."""
    for _ in range(tries):
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            time.sleep(0.02)  # another process holds the lock for a moment
    conn.execute("PRAGMA journal_mode = WAL")  # the last try raises what it finds


class HostDatabase:
    def __init__(
        self, path: Path, *, schema: str, synchronous: Literal["OFF", "FULL"], what: str
    ) -> None:
        self.path = path
        self.schema = schema
        self.synchronous = synchronous
        self.what = what  # how errors name it: "shared routing state"
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 30000")
            use_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.executescript(self.schema)
            self._conn = conn
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(conn) in a transaction of its own, off the event loop."""

        def run() -> T:
            with self._lock:
                return transaction(self._connection(), fn)

        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.what} ({self.path.name}): {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
