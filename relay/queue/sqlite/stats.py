"""Per-minute stats cells for one host, in the shared `routing.db`.

Every worker process of the host adds its points here, so the stats API of any worker
reads the whole host. Like routing state, nothing here must survive a crash, so it shares
the routing database's connection (no fsync per commit).
"""

from __future__ import annotations

import sqlite3

from relay.queue.base import StatPoint, StatsStore, minute_range
from relay.queue.sqlite.routing import SQLiteRouting


class SQLiteStats(StatsStore):
    def __init__(self, routing: SQLiteRouting) -> None:
        self._routing = routing

    async def add(self, points: list[StatPoint]) -> None:
        if not points:
            return
        rows = [(p.minute, p.series, p.label, p.bucket, p.value) for p in points]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO stats (minute, series, label, bucket, value) VALUES (?,?,?,?,?)"
                " ON CONFLICT (minute, series, label, bucket)"
                " DO UPDATE SET value = value + excluded.value",
                rows,
            )

        await self._routing.run(run)

    async def read(
        self, *, since: float, until: float, series: tuple[str, ...] = ()
    ) -> list[StatPoint]:
        first, end = minute_range(since, until)
        sql = (
            "SELECT minute, series, label, bucket, value FROM stats"
            " WHERE minute >= ? AND minute < ?"
        )
        params: list[object] = [first, end]
        if series:
            sql += f" AND series IN ({', '.join('?' * len(series))})"
            params += series
        sql += " ORDER BY minute, series, label, bucket"

        def run(conn: sqlite3.Connection) -> list[StatPoint]:
            return [StatPoint(*r) for r in conn.execute(sql, params)]

        return await self._routing.run(run)

    async def purge(self, *, older_than: float) -> int:
        minute, _ = minute_range(older_than, older_than)

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM stats WHERE minute < ?", (minute,)).rowcount

        return await self._routing.run(run)
