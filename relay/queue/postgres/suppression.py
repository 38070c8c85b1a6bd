"""The suppression list of a cluster, in PostgreSQL (table `suppressions`, schema version 3).

Each change takes `nextval('suppression_seq')`. Sequence values are handed out when asked,
not when committed, so two writers could commit out of order and a process following
`changes(after)` would step over the earlier one; every write therefore holds a
transaction-level advisory lock first, which makes seq order the commit order (writes are
an operator's or a provider event's, a few a second at most). A removal leaves a tombstone
(removed, a new seq, `expires` a day later) that `purge` deletes with the expired entries
(the sequence never goes back, so nothing purged can make a cursor point past a new row).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from relay.queue.base import Suppression, SuppressionStore, split_suppression_cursor

T = TypeVar("T")
Run = Callable[[Callable[[asyncpg.Connection], Awaitable[T]]], Awaitable[T]]

TOMBSTONE_AGE = 86400.0
# Any constant will do: it only orders the writers of the suppression list.
WRITE_LOCK = 0x7375707072657373

_COLUMNS = "address, scope, reason, source, created, expires, detail"


def _entry(row: asyncpg.Record) -> Suppression:
    return Suppression(
        row["address"],
        row["scope"],
        row["reason"],
        row["source"],
        row["created"],
        row["expires"],
        row["detail"],
    )


class PostgresSuppressions(SuppressionStore):
    def __init__(self, run: Run[Any]) -> None:
        # `run(fn)`: fn(conn) in one durable transaction, connection errors as StoreError.
        self._run = run

    async def add(self, entries: list[Suppression]) -> int:
        if not entries:
            return 0
        # One row per (address, scope): the last given wins, as it would one by one.
        latest = {(e.address.lower(), e.scope.lower()): e for e in entries}
        keys = sorted(latest)

        async def run(conn: asyncpg.Connection) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            await conn.execute(
                f"INSERT INTO suppressions ({_COLUMNS}, removed, seq)"
                " SELECT *, false, nextval('suppression_seq') FROM unnest($1::text[],"
                " $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[], $7::text[])"
                " ON CONFLICT (address, scope) DO UPDATE SET reason = excluded.reason,"
                " source = excluded.source, created = excluded.created,"
                " expires = excluded.expires, detail = excluded.detail, removed = false,"
                " seq = excluded.seq",
                [k[0] for k in keys],
                [k[1] for k in keys],
                [latest[k].reason for k in keys],
                [latest[k].source for k in keys],
                [latest[k].created for k in keys],
                [latest[k].expires for k in keys],
                [latest[k].detail for k in keys],
            )
            return len(keys)

        written: int = await self._run(run)
        return written

    async def remove(self, address: str, *, scope: str | None = None) -> int:
        address = address.lower()
        expires = time.time() + TOMBSTONE_AGE

        async def run(conn: asyncpg.Connection) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            status = await conn.execute(
                "UPDATE suppressions SET removed = true, seq = nextval('suppression_seq'),"
                " expires = $3 WHERE address = $1 AND NOT removed"
                " AND ($2::text IS NULL OR scope = $2::text)",
                address,
                None if scope is None else scope.lower(),
                expires,
            )
            return int(status.split()[-1])

        removed: int = await self._run(run)
        return removed

    async def changes(self, after: int) -> tuple[list[Suppression], list[tuple[str, str]], int]:
        async def run(
            conn: asyncpg.Connection,
        ) -> tuple[list[Suppression], list[tuple[str, str]], int]:
            top = int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM suppressions"))
            if top <= after:
                return [], [], max(after, top)
            if after == 0:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM suppressions WHERE NOT removed AND seq <= $1",
                    top,
                )
                return [_entry(r) for r in rows], [], top
            rows = await conn.fetch(
                f"SELECT {_COLUMNS}, removed FROM suppressions"
                " WHERE seq > $1 AND seq <= $2 ORDER BY seq",
                after,
                top,
            )
            added = [_entry(r) for r in rows if not r["removed"]]
            removed = [(r["address"], r["scope"]) for r in rows if r["removed"]]
            return added, removed, top

        result: tuple[list[Suppression], list[tuple[str, str]], int] = await self._run(run)
        return result

    async def list(
        self, *, contains: str | None = None, after: str | None = None, limit: int = 100
    ) -> list[Suppression]:
        address, scope = split_suppression_cursor(after) if after else (None, None)

        async def run(conn: asyncpg.Connection) -> list[Suppression]:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM suppressions WHERE NOT removed"
                # strpos, not LIKE: a "%" or "_" the operator typed is taken literally.
                " AND ($1::text IS NULL OR strpos(address, $1::text) > 0)"
                " AND ($2::text IS NULL OR ($3::text IS NULL AND address > $2::text)"
                "      OR ($3::text IS NOT NULL AND (address, scope) > ($2::text, $3::text)))"
                " ORDER BY address, scope LIMIT $4",
                contains.lower() if contains else None,
                address,
                scope,
                limit,
            )
            return [_entry(r) for r in rows]

        result: list[Suppression] = await self._run(run)
        return result

    async def purge(self, *, now: float) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            status = await conn.execute(
                "DELETE FROM suppressions WHERE expires IS NOT NULL AND expires <= $1",
                now,
            )
            return int(status.split()[-1])

        purged: int = await self._run(run)
        return purged
