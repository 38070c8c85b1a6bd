"""The host's durable shared state: `shared.db` beside the shards.

Unlike `routing.db` (breakers and counters, which heal if lost, so it skips the fsync),
what lives here must survive a crash: the suppression list, the applications' webhook
outbox, the webhook replay guard. Every worker process of the host reads and writes it,
so the web server in worker 0 and the dispatchers in the others share one list and one
outbox. Commits are few (an event, an operator's change), so `synchronous = FULL` costs
nothing that shows.

Each store module brings its own tables (`schemas`), created when the file is opened.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from relay.queue.base import StoreError
from relay.queue.sqlite.routing import _use_wal
from relay.queue.sqlite.store import transaction

T = TypeVar("T")


class SharedDB:
    def __init__(self, path: Path, *, schemas: tuple[str, ...]) -> None:
        self.path = path
        self.schemas = schemas
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 30000")
            _use_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            for schema in self.schemas:
                conn.executescript(schema)
            self._conn = conn
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(conn) in one durable transaction, off the event loop."""

        def run() -> T:
            with self._lock:
                return transaction(self._connection(), fn)

        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise StoreError(f"shared state ({self.path.name}): {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
