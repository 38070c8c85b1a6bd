"""The applications' webhook outbox of one host, in shared.db (table `webhook_outbox`,
relay.queue.sqlite.shared).

Every process of the host claims from the same table; shared.db's writers are serialised
(BEGIN IMMEDIATE), so a claim sees every lease taken before it and two processes never
lease one entry. `seq` is the insertion order, which is the commit order here (one writer
at a time), so "the lowest waiting seq of its (hook, msg_id)" is the message's oldest event.

Only the head of a message's waiting entries may be claimed: a later event of the message
waits, however due, until the head is delivered (state 'sent', kept without its body until
purged, so a repeated event is not posted again) or given up (state 'dead').
"""

from __future__ import annotations

import sqlite3
from typing import Any

from relay.queue.base import OutboxEntry, WebhookOutbox
from relay.queue.sqlite.shared import SharedDB

_COLUMNS = "seq, hook, key, msg_id, body, created, attempts, next_attempt, last_error"

# No waiting entry of the same (hook, msg_id) comes before `o`: it is its message's head.
# The probe runs on the partial index (hook, msg_id, seq) WHERE state = 'waiting'.
_HEAD = (
    "NOT EXISTS (SELECT 1 FROM webhook_outbox p WHERE p.state = 'waiting'"
    " AND p.hook = o.hook AND p.msg_id = o.msg_id AND p.seq < o.seq)"
)


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    seq, hook, key, msg_id, body, created, attempts, next_attempt, last_error = row
    return OutboxEntry(
        seq=seq,
        hook=hook,
        key=key,
        msg_id=msg_id,
        body=bytes(body),
        created=created,
        attempts=attempts,
        next_attempt=next_attempt,
        last_error=last_error,
    )


class SQLiteOutbox(WebhookOutbox):
    def __init__(self, shared: SharedDB) -> None:
        self._shared = shared

    async def add(self, entries: list[tuple[str, str, str, bytes]], *, now: float) -> int:
        if not entries:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO webhook_outbox (hook, key, msg_id, body, created, next_attempt)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hook, key) DO NOTHING",
                [(hook, key, msg_id, body, now, now) for hook, key, msg_id, body in entries],
            )
            return conn.total_changes - before

        return await self._shared.run(run)

    async def claim(
        self, *, now: float, owner: str, lease_time: float, limit: int
    ) -> list[OutboxEntry]:
        if limit <= 0:
            return []

        def run(conn: sqlite3.Connection) -> list[OutboxEntry]:
            # Walk the due entries in due order (the partial index on next_attempt); a
            # follower of a message whose head is not due is skipped by the head probe.
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM webhook_outbox o"
                " WHERE o.state = 'waiting' AND o.next_attempt <= ?"
                " AND (o.lease_until IS NULL OR o.lease_until <= ?)"
                f" AND {_HEAD} ORDER BY o.next_attempt, o.seq LIMIT ?",
                (now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE webhook_outbox SET lease_owner = ?, lease_until = ? WHERE seq = ?",
                [(owner, now + lease_time, row[0]) for row in rows],
            )
            return [_entry(row) for row in rows]

        return await self._shared.run(run)

    async def done(self, seq: int, *, owner: str) -> None:
        await self._shared.run(
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET state = 'sent', body = x'', lease_owner = NULL,"
                " lease_until = NULL WHERE seq = ? AND lease_owner = ?",
                (seq, owner),
            )
        )

    async def retry(self, seq: int, *, owner: str, next_attempt: float, error: str) -> None:
        await self._shared.run(
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET next_attempt = ?, attempts = attempts + 1,"
                " last_error = ?, lease_owner = NULL, lease_until = NULL"
                " WHERE seq = ? AND lease_owner = ? AND state = 'waiting'",
                (next_attempt, error, seq, owner),
            )
        )

    async def give_up(self, seq: int, *, owner: str, error: str) -> None:
        await self._shared.run(
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET state = 'dead', last_error = ?,"
                " lease_owner = NULL, lease_until = NULL"
                " WHERE seq = ? AND lease_owner = ? AND state = 'waiting'",
                (error, seq, owner),
            )
        )

    async def pending(self) -> dict[str, dict[str, int]]:
        def run(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            counts: dict[str, dict[str, int]] = {}
            for hook, state, n in conn.execute(
                "SELECT hook, state, count(*) FROM webhook_outbox WHERE state <> 'sent'"
                " GROUP BY hook, state"
            ):
                counts.setdefault(hook, {"waiting": 0, "dead": 0})[state] = n
            return counts

        return await self._shared.run(run)

    async def next_due(self) -> float | None:
        # A head's due time; a leased head is due again when its lease ends (an expired
        # lease, from a process that died, is in the past: due now).
        def run(conn: sqlite3.Connection) -> float | None:
            (due,) = conn.execute(
                "SELECT min(max(o.next_attempt, coalesce(o.lease_until, o.next_attempt)))"
                f" FROM webhook_outbox o WHERE o.state = 'waiting' AND {_HEAD}"
            ).fetchone()
            return None if due is None else float(due)

        return await self._shared.run(run)

    async def purge(self, *, older_than: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM webhook_outbox WHERE state IN ('dead', 'sent') AND created < ?",
                (older_than,),
            )
            return cursor.rowcount

        return await self._shared.run(run)
