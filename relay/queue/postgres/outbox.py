"""The applications' webhook outbox of a cluster, in PostgreSQL (table `webhook_outbox`,
schema version 3).

Every host claims from the same table. A claim locks the rows it leases with
`FOR UPDATE SKIP LOCKED`, so two hosts claiming at the same moment take different entries,
and one that starts after another's claim committed sees the lease.

Order per message rests on `seq` being the commit order: a bigserial is handed out when
asked, not when committed, so two hosts adding events of one message at once could commit
seq 6 before seq 5 and a claim between the two commits would send 6 first. Each `add`
therefore holds a transaction-level advisory lock (adds are one per batch of events, a few
a second), which makes seq order the commit order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from relay.queue.base import OutboxEntry, WebhookOutbox

T = TypeVar("T")
#: `run(fn)`: fn(conn) in one durable transaction (the engine's `_durably`).
Run = Callable[[Callable[[asyncpg.Connection], Awaitable[T]]], Awaitable[T]]

# Any constant will do: it only orders the writers of the outbox.
ADD_LOCK = 0x6F7574626F78

_COLUMNS = "seq, hook, key, msg_id, body, created, attempts, next_attempt, last_error"

# No waiting entry of the same (hook, msg_id) comes before `o`: it is its message's head.
# The probe runs on the partial index (hook, msg_id, seq) WHERE state = 'waiting'.
_HEAD = (
    "NOT EXISTS (SELECT 1 FROM webhook_outbox p WHERE p.state = 'waiting'"
    " AND p.hook = o.hook AND p.msg_id = o.msg_id AND p.seq < o.seq)"
)


def _entry(row: asyncpg.Record) -> OutboxEntry:
    return OutboxEntry(
        seq=row["seq"],
        hook=row["hook"],
        key=row["key"],
        msg_id=row["msg_id"],
        body=bytes(row["body"]),
        created=row["created"],
        attempts=row["attempts"],
        next_attempt=row["next_attempt"],
        last_error=row["last_error"],
    )


class PostgresOutbox(WebhookOutbox):
    def __init__(self, run: Run[Any]) -> None:
        self._run = run

    async def add(self, entries: list[tuple[str, str, str, bytes]], *, now: float) -> int:
        if not entries:
            return 0

        async def run(conn: asyncpg.Connection) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADD_LOCK)
            # In the given order (WITH ORDINALITY), so a message's events take rising seqs.
            rows = await conn.fetch(
                "INSERT INTO webhook_outbox (hook, key, msg_id, body, created, next_attempt)"
                " SELECT hook, key, msg_id, body, $5, $5 FROM unnest($1::text[], $2::text[],"
                " $3::text[], $4::bytea[]) WITH ORDINALITY AS e(hook, key, msg_id, body, n)"
                " ORDER BY n ON CONFLICT (hook, key) DO NOTHING RETURNING seq",
                [e[0] for e in entries],
                [e[1] for e in entries],
                [e[2] for e in entries],
                [e[3] for e in entries],
                now,
            )
            return len(rows)

        added: int = await self._run(run)
        return added

    async def claim(
        self, *, now: float, owner: str, lease_time: float, limit: int
    ) -> list[OutboxEntry]:
        if limit <= 0:
            return []

        async def run(conn: asyncpg.Connection) -> list[OutboxEntry]:
            rows = await conn.fetch(
                "WITH due AS (SELECT o.seq FROM webhook_outbox o"
                " WHERE o.state = 'waiting' AND o.next_attempt <= $1"
                " AND (o.lease_until IS NULL OR o.lease_until <= $1)"
                f" AND {_HEAD} ORDER BY o.next_attempt, o.seq LIMIT $2"
                " FOR UPDATE SKIP LOCKED)"
                " UPDATE webhook_outbox w SET lease_owner = $3, lease_until = $4"
                f" FROM due WHERE w.seq = due.seq RETURNING {_prefixed('w')}",
                now,
                limit,
                owner,
                now + lease_time,
            )
            return sorted((_entry(row) for row in rows), key=lambda e: (e.next_attempt, e.seq))

        claimed: list[OutboxEntry] = await self._run(run)
        return claimed

    async def done(self, seq: int, *, owner: str) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET state = 'sent', body = ''::bytea, lease_owner = NULL,"
                " lease_until = NULL WHERE seq = $1 AND lease_owner = $2",
                seq,
                owner,
            )
        )

    async def retry(self, seq: int, *, owner: str, next_attempt: float, error: str) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET next_attempt = $1, attempts = attempts + 1,"
                " last_error = $2, lease_owner = NULL, lease_until = NULL"
                " WHERE seq = $3 AND lease_owner = $4 AND state = 'waiting'",
                next_attempt,
                error,
                seq,
                owner,
            )
        )

    async def give_up(self, seq: int, *, owner: str, error: str) -> None:
        await self._run(
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET state = 'dead', last_error = $1,"
                " lease_owner = NULL, lease_until = NULL"
                " WHERE seq = $2 AND lease_owner = $3 AND state = 'waiting'",
                error,
                seq,
                owner,
            )
        )

    async def pending(self) -> dict[str, dict[str, int]]:
        rows: list[asyncpg.Record] = await self._run(
            lambda conn: conn.fetch(
                "SELECT hook, state, count(*) AS n FROM webhook_outbox WHERE state <> 'sent'"
                " GROUP BY hook, state"
            )
        )
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(row["hook"], {"waiting": 0, "dead": 0})[row["state"]] = row["n"]
        return counts

    async def next_due(self) -> float | None:
        # A head's due time; a leased head is due again when its lease ends (an expired
        # lease, from a process that died, is in the past: due now).
        due: float | None = await self._run(
            lambda conn: conn.fetchval(
                "SELECT min(greatest(o.next_attempt, o.lease_until))"
                f" FROM webhook_outbox o WHERE o.state = 'waiting' AND {_HEAD}"
            )
        )
        return due

    async def purge(self, *, older_than: float) -> int:
        rows: list[asyncpg.Record] = await self._run(
            lambda conn: conn.fetch(
                "DELETE FROM webhook_outbox WHERE state IN ('dead', 'sent') AND created < $1"
                " RETURNING seq",
                older_than,
            )
        )
        return len(rows)


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in _COLUMNS.split(","))
