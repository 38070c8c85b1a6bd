"""The durable queue's storage: one SQLite database in WAL mode with group commit.

Why SQLite and not a file per message: a file per message costs one fsync per message (and
one for its directory), while a WAL commit makes any number of inserts durable with one
fsync. All writes go through one writer thread that takes every request waiting at that
moment and commits them as one transaction (group commit), so twenty concurrent SMTP
sessions share one fsync instead of paying twenty. `synchronous=FULL` makes every durable
commit durable before its futures resolve: "250 queued" is only sent after that. (Claims
and delivery records ask for less, and commit after the durable writes: `Spool.write`.)

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
from relay.queue.sqlite import queries
from relay.queue.sqlite.segments import (
    SegmentFiles,
    SegmentWriter,
    rotate_at_from_env,
    segment_dir,
    segment_seqs,
)

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
-- A body is inline (data) or in a segment file (seg, off, len; data empty): see
-- relay.queue.sqlite.segments. Queues made before segments get the columns when opened.
CREATE TABLE IF NOT EXISTS bodies (
    id   TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    seg  INTEGER,
    off  INTEGER,
    len  INTEGER
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
# Seconds between the writer's looks at its segments (unlink the empty, compact the sparse).
RECLAIM_EVERY = 1.0
# A segment whose live bodies fill less than this share of it is compacted ...
COMPACT_BELOW = 0.5
# ... this many bytes per step (at least one body), so a batch never waits long behind it.
COMPACT_STEP = 4 * 1024 * 1024


class ShardConnection(sqlite3.Connection):
    """A shard's connection, with the segment files its bodies are read from (and, for
    the shard owner's writer, appended to)."""

    segments: SegmentFiles


def connect(
    path: Path, *, readonly: bool = False, segments: SegmentFiles | None = None
) -> sqlite3.Connection:
    """Open the queue database with the pragmas that make commits durable.

    isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so no
    statement ever opens one implicitly behind our back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        timeout=30.0,
        check_same_thread=False,
        factory=ShardConnection,
    )
    conn.segments = segments or SegmentFiles(segment_dir(path))
    conn.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # Checkpoint less often than the default 1000 pages: large messages fill it fast
        # and every checkpoint is another fsync of the main database.
        conn.execute("PRAGMA wal_autocheckpoint = 8192")
        conn.executescript(SCHEMA)
        _add_search_text(conn)
        _add_segment_columns(conn)
    return conn


def _add_segment_columns(conn: sqlite3.Connection) -> None:
    """Give a queue made before segments existed the body locator columns. Its blobs stay
    where they are and read as before; new large bodies go to segments."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(bodies)")}
    if "seg" not in columns:
        try:
            conn.execute("BEGIN IMMEDIATE")
            for column in ("seg", "off", "len"):
                conn.execute(f"ALTER TABLE bodies ADD COLUMN {column} INTEGER")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            conn.execute("ROLLBACK")
            if "duplicate column" not in str(exc):  # another process added them meanwhile
                raise
    # Segment bodies only: inline ones pay nothing for it.
    conn.execute("CREATE INDEX IF NOT EXISTS bodies_seg ON bodies (seg, len) WHERE seg IS NOT NULL")


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
    __slots__ = ("durable", "fn", "future")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        future: asyncio.Future[Any],
        durable: bool = True,
    ) -> None:
        # fn None: reclaim the segments now (Spool.reclaim), after the batch's commit.
        self.fn = fn
        self.future = future
        self.durable = durable


class Spool:
    """Async access to the queue: `write(fn)` is group-committed, `read(fn)` is concurrent.

    Each fn receives a sqlite3 connection and runs in the writer (or reader) thread, never
    on the event loop. A failing fn is rolled back alone (a savepoint each); a failing
    COMMIT fails the whole batch with StoreError, and nothing of it is on disk.
    """

    def __init__(
        self,
        queue_dir: Path,
        *,
        shard: int = 0,
        min_free_disk: int = 0,
        linger: float = 0.0,
        segments: bool = False,
    ) -> None:
        self.queue_dir = queue_dir
        # Whether this writer owns the shard's segment files (appends large bodies to them
        # and reclaims them): the serving worker's writer only, never a writer beside it.
        self.owns_segments = segments
        self.segments: SegmentWriter | None = None
        self._reclaim_at = 0.0
        self._broken_segments: set[int] = set()
        self.compactions = 0
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
        self._synced_commits = True  # the connection's PRAGMA synchronous: FULL or NORMAL

    def start(self) -> None:
        if self.owns_segments:
            self.segments = SegmentWriter(segment_dir(self.path), rotate_at=rotate_at_from_env())
            self.segments.open()
        conn = connect(self.path, segments=self.segments)
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

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """`durable=False`: a write that a power loss may undo without harm (a claim, a
        delivery round's record: at worst the message is tried again). Such writes commit
        without the fsync (the next durable commit's fsync covers them), after the durable
        writes that arrived with them, so a 250 waits neither for their fsync nor for their
        work. A killed process loses neither kind."""
        if self._writer is None:
            raise StoreError("the queue is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._requests.put(_Request(fn, future, durable))
        return await future

    async def reclaim(self) -> int:
        """Run a segment reclaim now in the writer thread (it also runs by itself every
        RECLAIM_EVERY): the compaction steps it took."""
        if self._writer is None:
            raise StoreError("the queue is not open")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._requests.put(_Request(None, future))
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
        reclaim_owed = False
        try:
            while True:
                if self.segments is None:
                    first = self._requests.get()
                else:
                    wait = self._reclaim_at - time.monotonic()
                    # A reclaim step due and a batch waiting: they take turns, so a
                    # compaction of many steps neither holds the writes nor starves.
                    if wait <= 0 and reclaim_owed:
                        reclaim_owed = False
                        self._reclaim(conn, self.segments)
                        continue
                    try:
                        first = (
                            self._requests.get_nowait()
                            if wait <= 0
                            else self._requests.get(timeout=wait)
                        )
                    except queue.Empty:
                        if wait <= 0:
                            self._reclaim(conn, self.segments)
                        continue
                    reclaim_owed = wait <= 0
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
                work = [r for r in batch if r.fn is not None]
                # What a client waits on (a 250, a provider's 200) commits first, on its
                # own: behind claims and delivery records it waited up to 9 ms at p99.
                urgent = [r for r in work if r.durable]
                if urgent and len(urgent) < len(work):
                    self._commit(conn, urgent)
                    self._commit(conn, [r for r in work if not r.durable])
                elif work:
                    self._commit(conn, work)
                if len(work) < len(batch):
                    self._reclaim_on_request(conn, [r for r in batch if r.fn is None])
                if stop:
                    return
        finally:
            conn.close()
            if self.segments is not None:
                self.segments.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        results: list[tuple[_Request, bool, Any]] = []
        try:
            self._set_synced_commits(conn, any(req.durable for req in batch))
            conn.execute("BEGIN IMMEDIATE")
            if len(batch) == 1:
                results.append(self._run_alone(conn, batch[0]))
            else:
                results.extend(self._run_each(conn, batch))
            if len(batch) > 1 or results[0][1]:  # a lone write that failed: rolled back
                if self.segments is not None:
                    self.segments.sync()  # the bodies on disk before the rows naming them
                conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            log.error("queue commit failed, %d writes refused: %s", len(batch), exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = StoreError(f"queue write failed: {exc}")
            results = [(req, False, error) for req in batch]
        self.batches += 1
        self.batched_writes += len(batch)
        loop = batch[0].future.get_loop()
        loop.call_soon_threadsafe(_resolve, results)

    @staticmethod
    def _run_alone(conn: sqlite3.Connection, req: _Request) -> tuple[_Request, bool, Any]:
        """A batch of one needs no savepoint: a failure rolls back the transaction. Two
        statements fewer is two fewer waits for the GIL, which this thread shares with the
        event loop (the write's own work, BEGIN to COMMIT, was p99 2.4 ms at 450 msg/s)."""
        assert req.fn is not None  # reclaim requests never reach a commit
        try:
            return req, True, req.fn(conn)
        except (sqlite3.Error, OSError):
            raise  # the store failed (disk full, I/O): `_commit` refuses it as StoreError
        except Exception as exc:
            conn.execute("ROLLBACK")
            return req, False, exc

    @staticmethod
    def _run_each(
        conn: sqlite3.Connection, batch: list[_Request]
    ) -> list[tuple[_Request, bool, Any]]:
        """Each write in a savepoint of its own, so a failing one is rolled back alone."""
        results: list[tuple[_Request, bool, Any]] = []
        for req in batch:
            assert req.fn is not None
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
        return results

    def _set_synced_commits(self, conn: sqlite3.Connection, durable: bool) -> None:
        """PRAGMA synchronous for the next commits: FULL (fsync'd) or NORMAL (not)."""
        if durable != self._synced_commits:
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._synced_commits = durable

    # -- segment reclaim (writer thread) ---------------------------------------------------

    def _reclaim_on_request(self, conn: sqlite3.Connection, asked: list[_Request]) -> None:
        steps = 0
        if self.segments is not None:
            before = self.compactions
            while True:
                self._reclaim(conn, self.segments)
                if self._reclaim_at > time.monotonic():  # nothing more to move now
                    break
            steps = self.compactions - before
        loop = asked[0].future.get_loop()
        loop.call_soon_threadsafe(_resolve, [(req, True, steps) for req in asked])

    def _reclaim(self, conn: sqlite3.Connection, writer: SegmentWriter) -> None:
        """Unlink the segments no row points to; move a step of the live bodies out of the
        sparsest one. Soon again while there is more to move, else in RECLAIM_EVERY."""
        self._reclaim_at = time.monotonic() + RECLAIM_EVERY
        try:
            sparsest: tuple[float, int] | None = None
            present = segment_seqs(writer.directory)
            writer.forget_missing(present)
            for seq in present:
                if seq in self._broken_segments or not writer.reclaimable(seq):
                    continue
                count, live = queries.segment_usage(conn, seq)
                if count == 0:
                    writer.unlink(seq)
                    continue
                share = live / max(writer.file_size(seq), 1)
                if share < COMPACT_BELOW and (sparsest is None or share < sparsest[0]):
                    sparsest = (share, seq)
            if sparsest is not None and self._compact_step(conn, writer, sparsest[1]):
                self._reclaim_at = time.monotonic()
        except (sqlite3.Error, OSError, StoreError) as exc:
            log.error("reclaiming message body segments failed, retried later: %s", exc)

    def _compact_step(self, conn: sqlite3.Connection, writer: SegmentWriter, seq: int) -> bool:
        """Copy up to COMPACT_STEP bytes of a segment's live bodies to the active segment and
        point their rows at the copies, in one transaction committed after the copies are
        synced; the old file goes (next look) once no row names it. True: more to move."""
        log.info("compacting message body segment %s", writer.path(seq))
        # Durable, whatever the last batch was: once this commits, the old file may go,
        # and a row still naming it after a power loss would have lost its body.
        self._set_synced_commits(conn, True)
        conn.execute("BEGIN IMMEDIATE")
        try:
            moved = 0
            rows = queries.segment_bodies(conn, seq, limit=256)
            for msg_id, offset, length in rows:
                if moved and moved + length > COMPACT_STEP:
                    break
                try:
                    data = writer.read(seq, offset, length)
                except StoreError as exc:
                    self._broken_segments.add(seq)
                    log.error("cannot compact %s: %s", writer.path(seq), exc)
                    break
                new = writer.append(data)
                queries.move_body(conn, msg_id, old=(seq, offset), new=new)
                moved += length
            writer.sync()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self.compactions += 1
        return seq not in self._broken_segments


def _resolve(results: list[tuple[_Request, bool, Any]]) -> None:
    for req, ok, value in results:
        if req.future.done():
            continue
        if ok:
            req.future.set_result(value)
        else:
            req.future.set_exception(value)
