"""The PostgreSQL engine: one queue for a cluster of relay hosts.

- Durability: what the relay promises is durable is committed with `synchronous_commit =
  on`: new work (before 250/200) and operator actions. Concurrent inserts are grouped
  (`InsertBatcher`) into shared commits, as the SQLite writer does, so twenty sessions
  share one WAL flush. The dispatcher's own bookkeeping (claims, a round's record,
  recovery, routing state) commits without waiting for the flush (PostgreSQL's WAL writer
  makes it durable within `wal_writer_delay`): a database crash can lose the last fraction
  of a second of it, which means an attempt is made again (at-least-once, invariant 2),
  never that a message is lost. That saves two WAL flushes per message.
- Bodies live in the database (bytea): any host can send any message.
- Claiming: `FOR UPDATE SKIP LOCKED`, so hosts never wait for each other's rows; the lease
  names the owner (node:pid:start) and its expiry; any host recovers an expired lease.
- Wake-ups: inserts and operator actions `NOTIFY relay_work, '<kind>'` in their
  transaction; every process LISTENs and wakes its dispatcher. Polling stays as fallback.
- An unreachable database raises StoreError everywhere: SMTP answers 451, HTTP 503,
  dispatch pauses and resumes by itself; the pool reconnects when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from relay.message import Claimed, Envelope, EventType, Kind, NewMessage, Status
from relay.queue.base import (
    NO_UPSTREAM,
    DeliveryRecord,
    MessageQuery,
    MessageRow,
    Queue,
    QueueActionError,
    Round,
    RoutingStore,
    StatsStore,
    StoreError,
    SuppressionStore,
    WebhookOutbox,
    provider_keys,
    round_meta,
)
from relay.queue.postgres import schema, statements
from relay.queue.postgres.batcher import InsertBatcher
from relay.queue.postgres.outbox import PostgresOutbox
from relay.queue.postgres.routing import PostgresRouting
from relay.queue.postgres.stats import PostgresStats
from relay.queue.postgres.suppression import PostgresSuppressions

log = logging.getLogger("relay.queue")

T = TypeVar("T")
CONNECT_TIMEOUT = 3.0
# Errors that mean "the database can't be reached or used right now", not a bug of ours.
# Errors after which a connection cannot be trusted with another statement.
_BROKEN_CONNECTION = (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection left mid-operation by a lost server
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.DiskFullError,
    asyncpg.InsufficientResourcesError,
)


def _redact(dsn: str) -> str:
    """The DSN without its password, for logs and /readyz."""
    scheme, sep, rest = dsn.partition("://")
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        rest = f"{creds.split(':', 1)[0]}@{host}"
    return f"{scheme}{sep}{rest}"


async def _session_kept(_conn: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's reset query (a round trip on every
    release). Nothing here changes session state: no SET, no LISTEN (that has a connection
    of its own), advisory locks only within transactions; an open transaction is still
    rolled back by asyncpg before this is called."""


class PostgresQueue(Queue):
    def __init__(
        self, dsn: str, *, owner: str, pool_size: int = 4, auto_migrate: bool = True
    ) -> None:
        super().__init__()
        self.dsn = dsn
        self.owner = owner
        self.describe = _redact(dsn)
        self.pool_size = pool_size
        self.auto_migrate = auto_migrate
        self._pool: asyncpg.Pool | None = None
        self._batcher: InsertBatcher | None = None
        self._listen_task: asyncio.Task[None] | None = None
        # Server pids of this process's pooled connections: their NOTIFYs need no wake-up.
        self._own_backends: set[int] = set()
        self._routing = PostgresRouting(self._transaction, owner=owner)
        self._stats = PostgresStats(self._transaction)
        self._suppressions: SuppressionStore = PostgresSuppressions(self._durably)
        self._outbox: WebhookOutbox = PostgresOutbox(self._durably)

    # -- lifecycle ---------------------------------------------------------------------

    async def _open(self, *, min_size: int) -> asyncpg.Pool:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=min_size,
                    max_size=self.pool_size,
                    command_timeout=30,
                    # A database that is shutting down can take a connection and never
                    # answer: give up soon, so SMTP clients get their 451 in time.
                    timeout=CONNECT_TIMEOUT,
                    # See the module docstring: durable writes ask for the flush themselves.
                    server_settings={"synchronous_commit": "off", "application_name": "relay"},
                    reset=_session_kept,
                    init=self._remember_backend,
                )
            except _UNAVAILABLE as exc:
                raise StoreError(f"cannot reach PostgreSQL at {self.describe}: {exc}") from None
            except asyncpg.PostgresError as exc:
                raise StoreError(f"PostgreSQL at {self.describe} refused: {exc}") from None
        return self._pool

    async def connect(self) -> None:
        await self._open(min_size=0)

    async def start(self) -> None:
        await self._open(min_size=1)
        if self.auto_migrate:
            said = await self.migrate()
            log.info("%s", said)
        else:
            await self.check()
        self._batcher = InsertBatcher(self._durably)
        self._listen_task = asyncio.create_task(self._listen(), name="queue-listen")

    async def close(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.gather(self._listen_task, return_exceptions=True)
            self._listen_task = None
        if self._batcher is not None:
            await self._batcher.close()
            self._batcher = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
            self._pool = None

    async def check(self) -> str:
        version = await self._with_conn(schema.require_current)
        return f"{self.describe} (schema version {version})"

    async def migrate(self) -> str:
        applied = await self._with_conn(schema.migrate)
        if not applied:
            return f"{self.describe}: queue schema is current (version {schema.LATEST})"
        return f"{self.describe}: queue schema migrated to version {applied[-1]}"

    def check_accepting(self) -> None:
        """Nothing to know ahead: an unreachable database fails the insert itself (451)."""

    async def problems(self) -> list[str]:
        try:
            await asyncio.wait_for(self._with_conn(lambda c: c.fetchval("SELECT 1")), 3)
        except (StoreError, TimeoutError) as exc:
            return [f"the queue database is unavailable: {exc or 'timed out'}"]
        return []

    async def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnect when the database comes back."""
        delay = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(statements.CHANNEL, self._notified)
                delay = 0.5
                # Work that arrived while nobody listened is found by the pollers; wake
                # them now rather than at their next poll.
                for kind in Kind:
                    self._work_arrived(kind)
                while not lost.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                    if not lost.is_set():
                        await conn.execute("SELECT 1")  # notices a dead peer
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("queue listener: %s", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _notified(self, _conn: object, pid: int, _channel: str, payload: str) -> None:
        if pid in self._own_backends:
            return  # our own insert or action: this process was woken already, locally
        with contextlib.suppress(ValueError):
            self._work_arrived(Kind(payload))

    async def _remember_backend(self, conn: asyncpg.Connection) -> None:
        self._own_backends.add(conn.get_server_pid())

    # -- running statements ----------------------------------------------------------------

    async def _with_conn(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        pool = await self._open(min_size=0)
        try:
            async with pool.acquire() as conn:
                try:
                    return await fn(conn)
                except (asyncio.CancelledError, *_BROKEN_CONNECTION):
                    # Interrupted mid-operation (cancelled, or the server went away under
                    # it), the connection may still be in that operation; released as is
                    # (the pool runs no reset query, see _session_kept) the next statement
                    # on it fails with "another operation is in progress", and so on for
                    # as long as it lives. Closed, the pool opens a fresh one instead.
                    conn.terminate()
                    raise
        except _UNAVAILABLE as exc:
            raise StoreError(
                f"cannot reach PostgreSQL at {self.describe}: {type(exc).__name__}: {exc}"
            ) from None
        except asyncpg.PostgresError as exc:
            log.error("queue statement failed: %s: %s", type(exc).__name__, exc)
            raise StoreError(f"queue write failed: {exc}") from None

    async def _transaction(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, durable: bool = False
    ) -> T:
        async def run(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                if durable:
                    await conn.execute("SET LOCAL synchronous_commit = on")
                return await fn(conn)

        return await self._with_conn(run)

    async def _durably(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """fn in a transaction whose COMMIT returns only once the WAL is flushed: for the
        writes behind a 250. BEGIN and the setting share one round trip."""

        async def run(conn: asyncpg.Connection) -> T:
            await conn.execute("BEGIN; SET LOCAL synchronous_commit = on")
            try:
                result = await fn(conn)
            except BaseException:
                if not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
            return result

        return await self._with_conn(run)

    # -- the delivery path ---------------------------------------------------------------

    async def insert(self, msg: NewMessage) -> bool:
        if self._batcher is None:
            return (await self._durably(lambda c: statements.insert_batch(c, [msg])))[0]
        inserted = await self._batcher.submit(msg)
        if inserted:
            self._work_arrived(msg.kind)  # no need to wait for our own NOTIFY
        return inserted

    async def claim(
        self, kind: Kind, *, now: float, lease_time: float, limit: int
    ) -> list[Claimed]:
        rows = await self._with_conn(
            lambda c: c.fetch(
                "WITH due AS (SELECT id FROM messages WHERE kind = $1"
                " AND state IN ('queued', 'deferred') AND next_attempt <= $2"
                " ORDER BY next_attempt LIMIT $3 FOR UPDATE SKIP LOCKED)"
                " UPDATE messages m SET state = 'sending', lease_owner = $4, lease_until = $5"
                " FROM due WHERE m.id = due.id"
                " RETURNING m.id, m.mail_from, m.rcpts, m.created, m.attempts, m.meta,"
                " (SELECT data FROM bodies b WHERE b.id = m.id) AS data",
                kind.value,
                now,
                limit,
                self.owner,
                now + lease_time,
            )
        )
        claimed = []
        for r in sorted(rows, key=lambda r: r["id"]):
            meta = json.loads(r["meta"])
            env = Envelope(
                r["mail_from"],
                tuple(json.loads(r["rcpts"])),
                smtputf8=bool(meta.get("smtputf8")),
                body_8bit=bool(meta.get("8bit")),
                crlf_only=bool(meta.get("crlf")),
                queue_id=r["id"],
            )
            claimed.append(
                Claimed(r["id"], kind, env, r["data"] or b"", r["created"], r["attempts"], meta)
            )
        return claimed

    async def record_round(self, item: Claimed, *, now: float, rounds: int, rnd: Round) -> bool:
        events = list(rnd.events)
        meta_patch, rcpts_done = round_meta(rnd, now=now)
        if rnd.delivered and (rnd.retry or rnd.failure):
            events.append((EventType.NOTE, now, {"partial": True, "delivered": rnd.delivered}))
        rcpts: str | None = None  # None: unchanged
        next_attempt: float | None = None
        if rnd.retry:
            state, rcpts, next_attempt, error = (
                Status.DEFERRED,
                statements.dumps(list(rnd.pending)),
                rnd.next_attempt,
                rnd.reason,
            )
            detail = {"reason": rnd.reason, "next_attempt": rnd.next_attempt}
            events.append((EventType.DEFERRED, now, {**detail, **rnd.defer_detail}))
        elif rnd.failure is not None:
            state, error = Status.FAILED, rnd.failure
            events.append((EventType.FAILED, now, {"reason": rnd.failure, **rnd.fail_detail}))
        else:
            state, rcpts, error = Status.SENT, "[]", None
            events.append((EventType.SENT, now, rnd.sent_detail))
        # The upstreams' ids of this round's hand-overs, for their event webhooks.
        keys = [k for d in rnd.delivered for k in provider_keys(d.get("provider_id"))]
        # One statement, so one round trip: the state change only while the lease holds,
        # and the events, the provider ids and the body's removal only if it did.
        updated = await self._with_conn(
            lambda c: c.fetchval(
                "WITH upd AS (UPDATE messages SET state = $5, updated = $2, attempts = $3,"
                " meta = meta || $6::jsonb || CASE WHEN $14::jsonb = '{}' THEN '{}'::jsonb"
                " ELSE jsonb_build_object('rcpts_done',"
                " COALESCE(meta->'rcpts_done', '{}'::jsonb) || $14::jsonb) END,"
                " rcpts = COALESCE($7::jsonb, rcpts),"
                " next_attempt = COALESCE($8, next_attempt), last_error = $9,"
                " lease_owner = NULL, lease_until = NULL"
                " WHERE id = $1 AND state = 'sending' AND lease_owner = $4 RETURNING id),"
                " del AS (DELETE FROM bodies WHERE $10 AND id IN (SELECT id FROM upd)),"
                " ev AS (INSERT INTO events (msg_id, type, at, detail)"
                " SELECT upd.id, e.type, e.at, e.detail FROM upd, unnest($11::text[],"
                " $12::float8[], $13::text[]) WITH ORDINALITY AS e(type, at, detail, n)"
                " ORDER BY e.n),"
                " pid AS (INSERT INTO provider_ids (key, msg_id)"
                " SELECT DISTINCT k, upd.id FROM upd, unnest($15::text[]) AS k"
                " ON CONFLICT DO NOTHING)"
                " SELECT count(*) FROM upd",
                item.id,
                now,
                rounds,
                self.owner,
                state.value,
                statements.dumps(meta_patch),
                rcpts,
                next_attempt,
                error,
                state is Status.SENT and not rnd.keep_body,
                [t.value for t, _, _ in events],
                [at for _, at, _ in events],
                [statements.dumps(d) for _, _, d in events],
                statements.dumps(rcpts_done),
                keys,
            )
        )
        return bool(updated)

    async def add_event(
        self, msg_id: str, type_: EventType, at: float, detail: dict[str, Any]
    ) -> None:
        await self._with_conn(lambda c: statements.add_events(c, [(msg_id, type_, at, detail)]))

    async def recover(self, *, now: float, alive: Callable[[str], bool]) -> list[str]:
        async def run(conn: asyncpg.Connection) -> list[str]:
            owners = [
                r["lease_owner"]
                for r in await conn.fetch(
                    "SELECT DISTINCT lease_owner FROM messages WHERE state = 'sending'"
                )
            ]
            dead = [o for o in owners if o and not alive(o)]
            rows = await conn.fetch(
                "UPDATE messages SET state = 'queued', next_attempt = $1, updated = $1,"
                " lease_owner = NULL, lease_until = NULL"
                " WHERE id IN (SELECT id FROM messages WHERE state = 'sending'"
                " AND (lease_until <= $1 OR lease_owner = ANY($2::text[]))"
                " FOR UPDATE SKIP LOCKED)"
                " RETURNING id, kind",
                now,
                dead,
            )
            await statements.add_events(
                conn,
                [
                    (
                        r["id"],
                        EventType.RECOVERED,
                        now,
                        {"reason": "the lease was abandoned (process stopped or crashed)"},
                    )
                    for r in rows
                ],
            )
            for kind in {r["kind"] for r in rows}:
                await conn.execute("SELECT pg_notify($1, $2)", statements.CHANNEL, kind)
            return [r["id"] for r in rows]

        done = await self._transaction(run)
        if done:
            self._wake_all()  # the NOTIFY reaches the others; this process wakes itself
        return done

    async def next_due(self, kind: Kind) -> float | None:
        due: float | None = await self._with_conn(
            lambda c: c.fetchval(
                "SELECT min(next_attempt) FROM messages"
                " WHERE kind = $1 AND state IN ('queued', 'deferred')",
                kind.value,
            )
        )
        return due

    async def purge_history(self, *, state: Status, older_than: float) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            ids = [
                r["id"]
                for r in await conn.fetch(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
                    " WHERE state = $2 AND updated < $1 LIMIT 5000) RETURNING id",
                    older_than,
                    state.value,
                )
            ]
            if ids:
                await conn.execute("DELETE FROM events WHERE msg_id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM bodies WHERE id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM message_look WHERE id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM provider_ids WHERE msg_id = ANY($1::text[])", ids)
                await conn.execute("DELETE FROM delivery_keys WHERE msg_id = ANY($1::text[])", ids)
            return len(ids)

        return await self._transaction(run)

    # -- reading -------------------------------------------------------------------------

    async def get(self, msg_id: str) -> MessageRow | None:
        r = await self._with_conn(
            lambda c: c.fetchrow(f"SELECT {statements.COLUMNS} FROM messages WHERE id = $1", msg_id)
        )
        return statements.row_of(r) if r else None

    async def timeline(self, msg_id: str) -> list[dict[str, Any]]:
        return await self._with_conn(lambda c: statements.timeline(c, msg_id))

    async def body(self, msg_id: str) -> bytes | None:
        data: bytes | None = await self._with_conn(
            lambda c: c.fetchval("SELECT data FROM bodies WHERE id = $1", msg_id)
        )
        return data

    async def search(
        self, *, state: str | None = None, kind: str | None = None, limit: int = 1000
    ) -> list[MessageRow]:
        rows = await self._with_conn(
            lambda c: c.fetch(
                f"SELECT {statements.COLUMNS} FROM messages WHERE ($1::text IS NULL OR state = $1)"
                " AND ($2::text IS NULL OR kind = $2) ORDER BY id LIMIT $3",
                state,
                kind,
                limit,
            )
        )
        return [statements.row_of(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._with_conn(
            lambda c: c.fetch("SELECT state, count(*) AS n FROM messages GROUP BY state")
        )
        return {r["state"]: r["n"] for r in rows}

    async def find(self, query: MessageQuery) -> list[MessageRow]:
        return await self._with_conn(lambda c: statements.find(c, query))

    async def oldest(self, *, states: tuple[str, ...]) -> float | None:
        found: float | None = await self._with_conn(
            lambda c: c.fetchval(
                # Ids sort by arrival: the first match from the oldest, not every row.
                "SELECT created FROM messages WHERE state = ANY($1::text[]) ORDER BY id LIMIT 1",
                list(states),
            )
        )
        return found

    async def dedupe_owner(self, dedupe: str, *, since: float) -> str | None:
        async def run(conn: asyncpg.Connection) -> str | None:
            row = await conn.fetchrow(
                "SELECT id, created FROM messages WHERE dedupe = $1 FOR UPDATE", dedupe
            )
            if row is None:
                return None
            if row["created"] >= since:
                return str(row["id"])
            await conn.execute("UPDATE messages SET dedupe = NULL WHERE id = $1", row["id"])
            return None

        return await self._transaction(run, durable=True)

    # -- operator actions --------------------------------------------------------------------

    async def _act(
        self, msg_id: str, fn: Callable[[asyncpg.Connection, MessageRow], Awaitable[None]]
    ) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            r = await conn.fetchrow(
                f"SELECT {statements.COLUMNS} FROM messages WHERE id = $1 FOR UPDATE", msg_id
            )
            if r is None:
                raise QueueActionError(f"no message {msg_id} in the queue")
            row = statements.row_of(r)
            if row.state == Status.SENDING:
                raise QueueActionError(
                    f"message {msg_id} is being delivered right now; try again once the"
                    " attempt ends"
                )
            await fn(conn, row)

        await self._transaction(run, durable=True)

    async def hold(self, msg_id: str, *, now: float, actor: str) -> None:
        async def run(conn: asyncpg.Connection, row: MessageRow) -> None:
            if row.state not in (Status.QUEUED, Status.DEFERRED):
                raise QueueActionError(
                    f"message {msg_id} is {row.state}; only queued or deferred messages can be held"
                )
            await conn.execute(
                "UPDATE messages SET state = 'held', updated = $2,"
                " meta = meta || jsonb_build_object('held_from', state) WHERE id = $1",
                msg_id,
                now,
            )
            await statements.add_events(conn, [(msg_id, EventType.HELD, now, {"by": actor})])

        await self._act(msg_id, run)

    async def release(self, msg_id: str, *, now: float, actor: str) -> None:
        async def run(conn: asyncpg.Connection, row: MessageRow) -> None:
            if row.state != Status.HELD:
                raise QueueActionError(f"message {msg_id} is {row.state}, not held")
            await conn.execute(
                "UPDATE messages SET state = 'queued', next_attempt = $2, updated = $2"
                " WHERE id = $1",
                msg_id,
                now,
            )
            await statements.add_events(conn, [(msg_id, EventType.RELEASED, now, {"by": actor})])
            await conn.execute("SELECT pg_notify($1, $2)", statements.CHANNEL, row.kind)

        await self._act(msg_id, run)
        self._wake_all()

    async def retry(self, msg_id: str, *, now: float, actor: str) -> None:
        await self._act(msg_id, lambda c, row: statements.retry(c, row, now=now, actor=actor))
        self._wake_all()

    async def retry_failed(self, *, now: float, actor: str) -> list[str]:
        async def run(conn: asyncpg.Connection) -> list[str]:
            done = []
            for r in await conn.fetch(
                f"SELECT {statements.COLUMNS} FROM messages WHERE state = 'failed' FOR UPDATE"
            ):
                async with conn.transaction():  # a savepoint: one refusal skips one message
                    try:
                        await statements.retry(conn, statements.row_of(r), now=now, actor=actor)
                    except QueueActionError:
                        continue
                done.append(r["id"])
            return done

        done = await self._transaction(run, durable=True)
        if done:
            self._wake_all()  # the NOTIFY reaches the others; this process wakes itself
        return done

    async def delete(self, msg_id: str, *, actor: str) -> None:
        async def run(conn: asyncpg.Connection, row: MessageRow) -> None:
            await conn.execute("DELETE FROM bodies WHERE id = $1", msg_id)
            await conn.execute("DELETE FROM events WHERE msg_id = $1", msg_id)
            await conn.execute("DELETE FROM message_look WHERE id = $1", msg_id)
            await conn.execute("DELETE FROM provider_ids WHERE msg_id = $1", msg_id)
            await conn.execute("DELETE FROM delivery_keys WHERE msg_id = $1", msg_id)
            await conn.execute("DELETE FROM messages WHERE id = $1", msg_id)

        await self._act(msg_id, run)

    async def flush(
        self, *, now: float, actor: str, waiting_for_upstream: bool = False
    ) -> list[str]:
        async def run(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch(
                "UPDATE messages SET next_attempt = $1 WHERE state = 'deferred'"
                " AND next_attempt > $1 AND ($2 = '' OR left(last_error, length($2)) = $2)"
                " RETURNING id, kind",
                now,
                NO_UPSTREAM if waiting_for_upstream else "",
            )
            await statements.add_events(
                conn, [(r["id"], EventType.FLUSHED, now, {"by": actor}) for r in rows]
            )
            for kind in {r["kind"] for r in rows}:
                await conn.execute("SELECT pg_notify($1, $2)", statements.CHANNEL, kind)
            return [r["id"] for r in rows]

        done = await self._transaction(run, durable=True)
        if done:
            self._wake_all()  # the NOTIFY reaches the others; this process wakes itself
        return done

    # -- provider events ------------------------------------------------------------------
    # What a webhook has answered 200 for must survive a crash (the provider won't send it
    # again): these commit durably.

    async def find_by_provider_id(self, provider_id: str) -> str | None:
        keys = provider_keys(provider_id)
        if not keys:
            return None
        return await self._with_conn(lambda c: statements.find_by_provider_id(c, keys))

    async def record_delivery(self, rec: DeliveryRecord) -> bool:
        return await self._durably(lambda c: statements.record_delivery(c, rec))

    async def requeue(
        self, msg_id: str, rcpts: list[str], *, exclude: str, now: float, reason: str, key: str
    ) -> bool:
        kind = await self._durably(
            functools.partial(
                statements.requeue,
                msg_id=msg_id,
                rcpts=rcpts,
                exclude=exclude,
                now=now,
                reason=reason,
                key=key,
            )
        )
        if kind is None:
            return False
        self._work_arrived(Kind(kind))  # the NOTIFY wakes the others
        return True

    async def drop_bodies(self, *, sent_before: float) -> int:
        dropped = 0
        while True:
            n = await self._transaction(
                functools.partial(statements.drop_bodies, sent_before=sent_before)
            )
            dropped += n
            if n < statements.DROP_BATCH:
                return dropped

    async def first_use(self, key: str, *, now: float, expires: float) -> bool:
        return await self._durably(
            functools.partial(statements.first_use, key=key, now=now, expires=expires)
        )

    async def forget_use(self, key: str) -> None:
        await self._durably(functools.partial(statements.forget_use, key=key))

    @property
    def suppressions(self) -> SuppressionStore:
        return self._suppressions

    @property
    def outbox(self) -> WebhookOutbox:
        return self._outbox

    @property
    def routing(self) -> RoutingStore:
        return self._routing

    @property
    def stats(self) -> StatsStore:
        return self._stats

    # -- export / import -------------------------------------------------------------------

    async def export(self) -> AsyncIterator[dict[str, Any]]:
        after = ""
        while True:
            batch = await self._with_conn(functools.partial(statements.export_batch, after=after))
            if not batch:
                return
            for record in batch:
                yield record
            after = batch[-1]["id"]

    async def import_record(self, record: dict[str, Any]) -> bool:
        return await self._transaction(lambda c: statements.import_record(c, record), durable=True)
