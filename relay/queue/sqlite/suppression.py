"""The suppression list of one host, in shared.db (table `suppressions`, relay.queue.sqlite.shared).

Every change takes the next `seq` (max + 1 inside the write transaction; shared.db's
writers are serialised by BEGIN IMMEDIATE, so seqs commit in order and a process that
follows `changes(after)` never skips one). A removal keeps the row as a tombstone
(removed = 1, a new seq, `expires` = a day later) so the other processes learn of it;
`purge` deletes tombstones and expired entries, but never the row holding the highest seq,
so the next seq never goes back below a cursor some process already holds.
"""

from __future__ import annotations

import sqlite3
import time

from relay.queue.base import Suppression, SuppressionStore, split_suppression_cursor
from relay.queue.sqlite.shared import SharedDB

#: How long a removal is remembered: a process further behind than that reloads nothing
#: it needs (it polls every few seconds).
TOMBSTONE_AGE = 86400.0

_COLUMNS = "address, scope, reason, source, created, expires, detail"


def _entry(row: tuple[str, str, str, str, float, float | None, str]) -> Suppression:
    return Suppression(*row)


def _next_seq(conn: sqlite3.Connection) -> int:
    (top,) = conn.execute("SELECT coalesce(max(seq), 0) FROM suppressions").fetchone()
    return int(top) + 1


class SQLiteSuppressions(SuppressionStore):
    def __init__(self, shared: SharedDB) -> None:
        self._shared = shared

    async def add(self, entries: list[Suppression]) -> int:
        if not entries:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            seq = _next_seq(conn)
            conn.executemany(
                f"INSERT OR REPLACE INTO suppressions ({_COLUMNS}, removed, seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                [
                    (
                        e.address.lower(),
                        e.scope.lower(),
                        e.reason,
                        e.source,
                        e.created,
                        e.expires,
                        e.detail,
                        seq + i,
                    )
                    for i, e in enumerate(entries)
                ],
            )
            return len(entries)

        return await self._shared.run(run)

    async def remove(self, address: str, *, scope: str | None = None) -> int:
        address = address.lower()
        now = time.time()

        def run(conn: sqlite3.Connection) -> int:
            where = "address = ? AND removed = 0"
            params: tuple[str, ...] = (address,)
            if scope is not None:
                where += " AND scope = ?"
                params += (scope.lower(),)
            scopes = [
                r[0] for r in conn.execute(f"SELECT scope FROM suppressions WHERE {where}", params)
            ]
            seq = _next_seq(conn)
            conn.executemany(
                "UPDATE suppressions SET removed = 1, seq = ?, expires = ?"
                " WHERE address = ? AND scope = ?",
                [(seq + i, now + TOMBSTONE_AGE, address, s) for i, s in enumerate(scopes)],
            )
            return len(scopes)

        return await self._shared.run(run)

    async def changes(self, after: int) -> tuple[list[Suppression], list[tuple[str, str]], int]:
        def run(conn: sqlite3.Connection) -> tuple[list[Suppression], list[tuple[str, str]], int]:
            (top,) = conn.execute("SELECT coalesce(max(seq), 0) FROM suppressions").fetchone()
            if top <= after:
                return [], [], max(after, int(top))
            if after == 0:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM suppressions WHERE removed = 0"
                ).fetchall()
                return [_entry(r) for r in rows], [], int(top)
            added: list[Suppression] = []
            removed: list[tuple[str, str]] = []
            for *fields, gone in conn.execute(
                f"SELECT {_COLUMNS}, removed FROM suppressions WHERE seq > ? ORDER BY seq",
                (after,),
            ):
                if gone:
                    removed.append((fields[0], fields[1]))
                else:
                    added.append(_entry(tuple(fields)))
            return added, removed, int(top)

        return await self._shared.run(run)

    async def list(
        self, *, contains: str | None = None, after: str | None = None, limit: int = 100
    ) -> list[Suppression]:
        where = ["removed = 0"]
        params: list[object] = []
        if contains:
            # instr, not LIKE: a "%" or "_" in what the operator typed is taken literally.
            where.append("instr(address, ?) > 0")
            params.append(contains.lower())
        if after:
            address, scope = split_suppression_cursor(after)
            if scope is None:
                where.append("address > ?")
                params.append(address)
            else:
                where.append("(address > ? OR (address = ? AND scope > ?))")
                params += [address, address, scope]
        params.append(limit)
        sql = (
            f"SELECT {_COLUMNS} FROM suppressions WHERE {' AND '.join(where)}"
            " ORDER BY address, scope LIMIT ?"
        )

        def run(conn: sqlite3.Connection) -> list[Suppression]:
            return [_entry(r) for r in conn.execute(sql, params)]

        return await self._shared.run(run)

    async def purge(self, *, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM suppressions WHERE expires IS NOT NULL AND expires <= ?"
                " AND seq < (SELECT max(seq) FROM suppressions)",
                (now,),
            )
            return cur.rowcount

        return await self._shared.run(run)
