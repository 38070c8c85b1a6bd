"""The durable queue's storage: one SQLite database in WAL mode with group commit.

Why SQLite and not a file per message: a file per message costs one fsync per message (and
one for its directory), while a WAL commit makes any number of inserts durable with one
fsync. All writes go through one writer thread that takes every request waiting at that
moment and commits them as one transaction (group commit), so twenty concurrent SMTP
sessions share one fsync instead of paying twenty. `synchronous=FULL` makes every commit
durable before its futures resolve: "250 queued" is only sent after that.

SQLite also gives the CLI (`relay queue ...`) safe concurrent access while the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from relay.queue.base import StoreError, StoreFull

log = logging.getLogger("relay.queue")

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL,
    mail_from    TEXT NOT NULL,
    rcpts        TEXT NOT NULL,          -- JSON list: recipients still to be delivered
    size         INTEGER NOT NULL,
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_owner  TEXT,
    lease_until  REAL,
    last_error   TEXT,
    dedupe       TEXT,                   -- inbound: the SES message id, for idempotency
    meta         TEXT NOT NULL DEFAULT '{}',
    look         TEXT                    -- the search text (relay.queue.base.look_text)
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (kind, state, next_attempt);
-- Per state in arrival order: the newest of a state for the operator's search, the
-- oldest waiting one, the finished ones to purge. (It replaced (state, updated), which
-- made "newest deferred first" read and sort every deferred message.)
CREATE INDEX IF NOT EXISTS messages_state_id ON messages (state, id);
DROP INDEX IF EXISTS messages_state;
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedupe ON messages (dedupe)
    WHERE dedupe IS NOT NULL;
CREATE TABLE IF NOT EXISTS bodies (
    id   TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY,
    msg_id TEXT NOT NULL,
    at     REAL NOT NULL,
    type   TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_msg ON events (msg_id, seq);
-- Provider events (relay.events): an upstream's message ids, indexed at hand-over so its
-- webhooks find the message (relay.queue.base.provider_keys) ...
CREATE TABLE IF NOT EXISTS provider_ids (
    key    TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    PRIMARY KEY (key, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS provider_ids_msg ON provider_ids (msg_id);
-- ... and the events recorded on a timeline, by their stable key: a provider's retry of
-- the same event (or a second requeue for it) adds nothing.
CREATE TABLE IF NOT EXISTS delivery_keys (
    key    TEXT PRIMARY KEY,
    msg_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivery_keys_msg ON delivery_keys (msg_id);
"""

# A batch this large already amortises the fsync; bigger ones only add latency.
MAX_BATCH = 512


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the queue database with the pragmas that make commits durable.

    isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so no
    statement ever opens one implicitly behind our back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # Checkpoint less often than the default 1000 pages: large messages fill it fast
        # and every checkpoint is another fsync of the main database.
        conn.execute("PRAGMA wal_autocheckpoint = 8192")
        conn.executescript(SCHEMA)
        _add_search_text(conn)
    return conn


# The operator's search scans this index, not the table: narrow, in id (arrival) order,
# and only ever appended to (ids grow, `look` never changes), so an insert adds one entry
# at its right-hand edge and claims and rounds don't touch it.
SEARCH_INDEX = "CREATE INDEX IF NOT EXISTS messages_look ON messages (id, look)"


def _add_search_text(conn: sqlite3.Connection) -> None:
    """Give a queue made before the search text existed its `look` column, filled in."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(messages)")}
    if "look" not in columns:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ALTER TABLE messages ADD COLUMN look TEXT")
            # ASCII lower-casing here (SQLite's lower()); new messages get Python's.
            conn.execute(
                "UPDATE messages SET look = lower(mail_from || char(1) || coalesce((SELECT"
                " group_concat(value, char(2)) FROM json_each(meta, '$.rcpts_original')), '')"
                " || char(1) || coalesce(json_extract(meta, '$.subject'), ''))"
            )
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            conn.execute("ROLLBACK")
            # "duplicate column": another process added it meanwhile, nothing left to do.
            if "duplicate column" not in str(exc):
                raise
    conn.execute(SEARCH_INDEX)


def db_path(queue_dir: Path, shard: int = 0) -> Path:
    """Shard 0 is queue.db; with `server.workers = N` worker i owns queue-i.db."""
    return queue_dir / ("queue.db" if shard == 0 else f"queue-{shard}.db")


def shard_paths(queue_dir: Path) -> list[Path]:
    """Every shard database present, shard 0 first."""
    found = [p for p in queue_dir.glob("queue-*.db") if p.stem.split("-", 1)[1].isdigit()]
    found.sort(key=lambda p: int(p.stem.split("-", 1)[1]))
    main = queue_dir / "queue.db"
    return ([main] if main.exists() else []) + found


def shard_of(path: Path) -> int:
    return 0 if path.stem == "queue" else int(path.stem.split("-", 1)[1])


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run fn in its own write transaction (the CLI's path: no batching needed)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class _Request:
    __slots__ = ("fn", "future")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]
    ) -> None:
        self.fn = fn
        self.future = future


class Spool:
    """Async access to the queue: `write(fn)` is group-committed, `read(fn)` is concurrent.

    Each fn receives a sqlite3 connection and runs in the writer (or reader) thread, never
    on the event loop. A failing fn is rolled back alone (a savepoint each); a failing
    COMMIT fails the whole batch with StoreError, and nothing of it is on disk.
    """

    def __init__(
        self, queue_dir: Path, *, shard: int = 0, min_free_disk: int = 0, linger: float = 0.0
    ) -> None:
        self.queue_dir = queue_dir
        # Seconds a batch waits for more writes before it commits: 0 for the shard's own
        # writer (a 250 waits on it); a little for a writer beside another process's, so
        # it takes that shard's write lock (and makes its owner wait) less often.
        self.linger = linger
        self.path = db_path(queue_dir, shard)
        self.min_free_disk = min_free_disk
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._free_checked_at = 0.0
        self._free_ok = True
        self.batches = 0
        self.batched_writes = 0

    def start(self) -> None:
        conn = connect(self.path)
        self._reader_conn = connect(self.path, readonly=True)
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="relay-spool-writer", daemon=True
        )
        self._writer.start()

    async def close(self) -> None:
        if self._writer is not None:
            self._requests.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None

    def check_free_space(self) -> None:
        """Raise StoreFull when the disk is nearly full (checked at most once a second)."""
        if not self.min_free_disk:
            return
        now = time.monotonic()
        if now - self._free_checked_at > 1.0:
            self._free_checked_at = now
            self._free_ok = shutil.disk_usage(self.queue_dir).free >= self.min_free_disk
        if not self._free_ok:
            raise StoreFull(f"less than {self.min_free_disk} bytes free under {self.queue_dir}")

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreError("the queue is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._requests.put(_Request(fn, future))
        return await future

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader_conn
        if conn is None:
            raise StoreError("the queue is not open")

        def run() -> T:
            with self._reader_lock:
                return fn(conn)

        return await asyncio.to_thread(run)

    # -- writer thread -------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._requests.get()
                if first is None:
                    return
                if self.linger:
                    time.sleep(self.linger)
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        results: list[tuple[_Request, bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for req in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = req.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((req, False, exc))
                else:
                    conn.execute("RELEASE op")
                    results.append((req, True, value))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("queue commit failed, %d writes refused: %s", len(batch), exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = StoreError(f"queue write failed: {exc}")
            results = [(req, False, error) for req in batch]
        self.batches += 1
        self.batched_writes += len(batch)
        loop = batch[0].future.get_loop()
        loop.call_soon_threadsafe(_resolve, results)


def _resolve(results: list[tuple[_Request, bool, Any]]) -> None:
    for req, ok, value in results:
        if req.future.done():
            continue
        if ok:
            req.future.set_result(value)
        else:
            req.future.set_exception(value)
